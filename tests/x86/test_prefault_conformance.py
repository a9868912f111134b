"""KVM_PRE_FAULT_MEMORY conformance: the kernel selftest's behaviour, the errnos and the
partial-progress ABI (Documentation/virt/kvm/api.rst 4.143; virt/kvm/kvm_main.c:
kvm_vcpu_pre_fault_memory(); arch/x86/kvm/mmu/mmu.c: kvm_arch_vcpu_pre_fault_memory(),
kvm_tdp_map_page(); tools/testing/selftests/kvm/pre_fault_memory_test.c)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

import asyncvm
from asyncvm import TaskGroup, uapi
from asyncvm.kvm.kvm import Kvm
from asyncvm.kvm.vcpu import GuestAccess, Vcpu
from asyncvm.runtime import Completion
from asyncvm.x86.mmu.prefault import kvm_arch_vcpu_pre_fault_memory
from asyncvm.x86.mmu.tdp_mmu import PG_LEVEL_2M, PG_LEVEL_4K

from .helpers import (
    PAGE,
    SZ_2M,
    add_slot,
    assert_clean,
    delete_slot,
    pre_fault,
    run_guest,
    run_once,
    set_private,
)

# -- the selftest, written afresh -------------------------------------------------------------

#: pre_fault_memory_test.c: TEST_SIZE, TEST_NPAGES, TEST_SLOT
TEST_SIZE = SZ_2M + PAGE
TEST_NPAGES = TEST_SIZE // PAGE
TEST_SLOT = 10
#: The model has no CPUID; the test gives the guest a typical 46-bit physical address space.
GUEST_PHYS_BITS = 46
MAX_GFN = (1 << (GUEST_PHYS_BITS - 12)) - 1
#: __test_pre_fault_memory(): the slot sits at the top of guest physical space, aligned down to 2 MiB
TEST_GPA = (MAX_GFN - TEST_NPAGES) * PAGE & ~(SZ_2M - 1)

VM_SHAPES = {
    "default": (uapi.KVM_X86_DEFAULT_VM, False),
    "sw_protected_shared": (uapi.KVM_X86_SW_PROTECTED_VM, False),
    "sw_protected_private": (uapi.KVM_X86_SW_PROTECTED_VM, True),
}


async def _selftest_pre_fault_memory(
    vcpu: Vcpu, base_gpa: int, offset: int, size: int, expected_left: int, private: bool, worker: bool
) -> None:
    """pre_fault_memory(): the ioctl loop, with the slot deleted and re-created concurrently
    (delete_slot_worker()) when `worker` is set."""
    vm = vcpu.vm
    r = uapi.PreFaultMemory(base_gpa + offset, size)
    recreate = Completion("recreate_slot")
    worker_exited = Completion("slot_worker_exited")

    async def delete_slot_worker() -> None:
        await delete_slot(vm, TEST_SLOT)
        await recreate.wait()
        await add_slot(vm, TEST_SLOT, base_gpa, TEST_SIZE, private=private)
        await worker_exited.complete_all()

    async def prefault() -> None:
        slot_recreated = not worker
        err = 0
        while True:
            prev = r.size
            err = await pre_fault(vcpu, r)
            # success means progress, failure means none
            assert (r.size < prev) ^ (err != 0), f"progress {prev - r.size} with errno {err}"
            if err == uapi.EINTR:
                continue
            if not slot_recreated:
                # let the worker re-create the slot and join it (pthread_join())
                await recreate.complete()
                await worker_exited.wait_shared()
                slot_recreated = True
                if r.size:
                    continue
            if not r.size or err:
                break
        assert r.size == expected_left, f"completed with {r.size} bytes left, expected {expected_left}"
        if not expected_left:
            assert err == 0, f"errno {err} although nothing is left"
        else:
            assert err == uapi.ENOENT, f"errno {err}, expected ENOENT (no memslot: RET_PF_EMULATE)"

    if not worker:
        await prefault()
        return
    async with TaskGroup() as tg:
        tg.spawn(delete_slot_worker, name="delete_slot_worker")
        tg.spawn(prefault, name="vcpu0")


async def selftest(kvm: Kvm, shape: str, worker: bool = False) -> None:
    """__test_pre_fault_memory(): set up the slot, the three calls, then the guest reads it all."""
    vm_type, private = VM_SHAPES[shape]
    vm = await kvm.create_vm(vm_type)
    vcpu = await vm.create_vcpu(0)
    gpa = TEST_GPA
    await add_slot(vm, TEST_SLOT, gpa, TEST_SIZE, private=private)
    if private:
        await set_private(vm, gpa, TEST_SIZE)
    await _selftest_pre_fault_memory(vcpu, gpa, 0, SZ_2M, 0, private, worker)
    await _selftest_pre_fault_memory(vcpu, gpa, SZ_2M, PAGE * 2, PAGE, private, worker)
    await _selftest_pre_fault_memory(vcpu, gpa, TEST_SIZE, PAGE, PAGE, private, worker)
    reads = await run_guest(vcpu, [GuestAccess.read(gpa + i * PAGE) for i in range(TEST_NPAGES)])
    assert reads == [bytes(8)] * TEST_NPAGES  # guest_code(): every page readable (UCALL_DONE)


@pytest.mark.parametrize("shape", list(VM_SHAPES))
def test_selftest_prefault_then_guest_reads_every_page(shape: str) -> None:
    """pre_fault_memory_test.c (6.11 form): (gpa, 2M) leaves 0; (gpa+2M, 8K) leaves 4K with
    ENOENT; (gpa+TEST_SIZE, 4K) leaves 4K with ENOENT; EINTR from signal draws is retried; the
    guest then reads every page. Signals are left at their default probability."""
    assert_clean(run_once(selftest, data_probs={}, shape=shape))


@pytest.mark.parametrize("shape", list(VM_SHAPES))
def test_selftest_with_concurrent_memslot_delete(shape: str) -> None:
    """pre_fault_memory_test.c ([~6.18] form): delete_slot_worker() deletes TEST_SLOT while the
    vCPU pre-faults; EAGAIN (or ENOENT/EFAULT once the slot is gone) is tolerated until the slot
    is re-created, after which the retry completes with the expected bytes left."""
    report = asyncvm.explore(selftest, strategy="pct", runs=4, seed=7, params={"shape": shape, "worker": True})
    assert report.ok, report.summary()


# -- argument checks: kvm_vcpu_pre_fault_memory() ----------------------------------------------

SLOT_GPA = 1 << 30


async def _one_vcpu(kvm: Kvm, vm_type: int = uapi.KVM_X86_DEFAULT_VM, npages: int = 4) -> Vcpu:
    vm = await kvm.create_vm(vm_type)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, SLOT_GPA, npages * PAGE)
    return vcpu


async def expect_errno(kvm: Kvm, gpa: int, size: int, flags: int, errno: int, out: dict[str, Any]) -> None:
    vcpu = await _one_vcpu(kvm)
    r = uapi.PreFaultMemory(gpa, size, flags)
    got = await pre_fault(vcpu, r)
    assert got == errno, f"errno {got}, expected {errno}"
    out["range"] = (r.gpa, r.size)


def _check_errno(gpa: int, size: int, errno: int, flags: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    assert_clean(run_once(expect_errno, gpa=gpa, size=size, flags=flags, errno=errno, out=out))
    return out


def test_size_zero_is_einval() -> None:
    """kvm_vcpu_pre_fault_memory(): gpa + size <= gpa rejects size 0 (the RFC's "return 0" was
    dropped so buggy userspace cannot spin; lore: "[PATCH v3] KVM: Add KVM_PRE_FAULT_MEMORY")."""
    assert _check_errno(SLOT_GPA, 0, uapi.EINVAL)["range"] == (SLOT_GPA, 0)


def test_nonzero_flags_is_einval() -> None:
    """kvm_vcpu_pre_fault_memory(): flags must be 0."""
    _check_errno(SLOT_GPA, PAGE, uapi.EINVAL, flags=1)


@pytest.mark.parametrize(("gpa", "size"), [(SLOT_GPA + 1, PAGE), (SLOT_GPA, PAGE + 8)], ids=["gpa", "size"])
def test_unaligned_gpa_or_size_is_einval(gpa: int, size: int) -> None:
    """kvm_vcpu_pre_fault_memory(): !PAGE_ALIGNED(gpa) || !PAGE_ALIGNED(size) -> -EINVAL."""
    _check_errno(gpa, size, uapi.EINVAL)


@pytest.mark.parametrize("gpa", [uapi.U64_MAX + 1 - PAGE, -PAGE], ids=["top_of_u64", "negative_is_u64"])
def test_range_that_wraps_is_einval(gpa: int) -> None:
    """kvm_vcpu_pre_fault_memory(): gpa + size wrapping past 2^64 -> -EINVAL; the fields are __u64,
    so a negative gpa is the same huge value and is written back as such."""
    out = _check_errno(gpa, 2 * PAGE, uapi.EINVAL)
    assert out["range"] == (gpa & uapi.U64_MAX, 2 * PAGE)


async def padding_is_ignored(kvm: Kvm) -> None:
    vcpu = await _one_vcpu(kvm)
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE, padding=(1, 2, 3, 4, 5))
    assert await pre_fault(vcpu, r) == 0 and r.size == 0


def test_padding_is_not_checked() -> None:
    """include/uapi/linux/kvm.h: padding[5] is not validated (kvm-core.md 1.1)."""
    assert_clean(run_once(padding_is_ignored))


def test_gpa_without_memslot_is_enoent() -> None:
    """kvm_tdp_map_page(): no memslot -> RET_PF_EMULATE -> -ENOENT, range untouched."""
    assert _check_errno(SLOT_GPA + 64 * PAGE, PAGE, uapi.ENOENT)["range"] == (SLOT_GPA + 64 * PAGE, PAGE)


async def signal_first(kvm: Kvm) -> None:
    vcpu = await _one_vcpu(kvm)
    r = uapi.PreFaultMemory(SLOT_GPA, 4 * PAGE)
    assert await pre_fault(vcpu, r) == uapi.EINTR
    assert (r.gpa, r.size) == (SLOT_GPA, 4 * PAGE)


def test_signal_before_any_progress_is_eintr_with_range_untouched() -> None:
    """kvm_vcpu_pre_fault_memory(): signal_pending() before the first step -> -EINTR, no progress."""
    assert_clean(run_once(signal_first, data_probs={"signal": 1.0}))


# -- EOPNOTSUPP: no TDP, guest mode, CoCo before finalization ---------------------------------


async def shadow_paging(kvm: Kvm) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vm.arch.tdp_enabled = False
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, SLOT_GPA, PAGE)
    assert vm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE)
    assert await pre_fault(vcpu, r) == uapi.EOPNOTSUPP
    assert r.size == PAGE


def test_shadow_paging_is_eopnotsupp() -> None:
    """kvm_tdp_map_page(): mmu->page_fault != kvm_tdp_page_fault (tdp_enabled=0) -> -EOPNOTSUPP."""
    assert_clean(run_once(shadow_paging))


async def guest_mode(kvm: Kvm) -> None:
    vcpu = await _one_vcpu(kvm)
    vcpu.arch.mmu.guest_mode = True
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE)
    assert await pre_fault(vcpu, r) == uapi.EOPNOTSUPP
    assert r.size == PAGE


def test_guest_mode_is_eopnotsupp() -> None:
    """kvm_tdp_map_page(): an L2 under nested EPT/NPT runs on the shadow guest_mmu -> -EOPNOTSUPP
    (api.rst: "including a nested guest with nested paging")."""
    assert_clean(run_once(guest_mode))


def _require_backend(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.xfail(f"{module} (the vendor back end) is not written yet")


async def tdx_before_finalize(kvm: Kvm) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
    await vm.tdx_init_vm(uapi.TdxInitVm())
    vcpu = await vm.create_vcpu(0)
    await vcpu.tdx_init_vcpu()
    await add_slot(vm, 0, SLOT_GPA, PAGE, private=True)
    await set_private(vm, SLOT_GPA, PAGE)
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE)
    assert await pre_fault(vcpu, r) == uapi.EOPNOTSUPP
    assert r.size == PAGE


def test_tdx_vm_before_finalize_is_eopnotsupp() -> None:
    """kvm_arch_vcpu_pre_fault_memory(): pre_fault_allowed is false until tdx_td_finalize()."""
    _require_backend("asyncvm.x86.tdx.tdx")
    assert_clean(run_once(tdx_before_finalize))


async def snp_before_launch_finish(kvm: Kvm) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_SNP_VM)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, SLOT_GPA, PAGE, private=True)
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE)
    assert await pre_fault(vcpu, r) == uapi.EOPNOTSUPP
    assert r.size == PAGE


def test_snp_vm_before_launch_finish_is_eopnotsupp() -> None:
    """svm.c: svm_vm_init() leaves pre_fault_allowed false for SNP until sev.c: snp_launch_finish()
    (lore: "KVM: x86: disallow pre-fault for SNP VMs before initialization", 6.11-rc)."""
    _require_backend("asyncvm.x86.sev.snp")
    assert_clean(run_once(snp_before_launch_finish))


# -- EIO: a dead VM -----------------------------------------------------------------------------


async def dead_vm(kvm: Kvm, out: dict[str, Any]) -> None:
    vcpu = await _one_vcpu(kvm)
    vcpu.vm.kvm_bug("test: KVM_BUG_ON")
    r = uapi.PreFaultMemory(SLOT_GPA, PAGE)
    out["errno"] = await pre_fault(vcpu, r)
    out["size"] = r.size


def test_dead_vm_is_eio() -> None:
    """kvm_vcpu_ioctl(): a bugged/dead VM fails every vCPU ioctl with -EIO; the KVM_BUG_ON itself
    is what the execution then reports."""
    out: dict[str, Any] = {}
    result = run_once(dead_vm, out=out)
    assert out == {"errno": uapi.EIO, "size": PAGE}
    assert result.failure is not None and result.failure.kind == "kvm_bug", str(result.failure)


# -- progress is reported by the level actually mapped ------------------------------------------


async def arch_step(
    kvm: Kvm, vm_type: int, private: bool, page_size: int, offset: int, size: int, out: dict[str, Any]
) -> None:
    """One kvm_arch_vcpu_pre_fault_memory() step (under kvm->srcu, as the generic loop calls it),
    then the leaf it left behind."""
    vm = await kvm.create_vm(vm_type)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, SLOT_GPA, 2 * SZ_2M, private=private, page_size=page_size)
    if private:
        await set_private(vm, SLOT_GPA, 2 * SZ_2M)
    idx = await vm.srcu.read_lock()
    try:
        out["step"] = await kvm_arch_vcpu_pre_fault_memory(vcpu, SLOT_GPA + offset, size)
    finally:
        await vm.srcu.read_unlock(idx)
    hit = vcpu.arch.mmu.root_for(private).leaf_at((SLOT_GPA + offset) // PAGE)
    out["level"], out["accessed"] = hit[0], hit[1].accessed


def _arch_step(**params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    assert_clean(run_once(arch_step, out=out, **params))
    return out


def test_shared_2m_host_page_prefaults_2m_in_one_step() -> None:
    """kvm_arch_vcpu_pre_fault_memory(): shared memory backed by a 2 MiB host page in a 2 MiB
    aligned slot maps at PG_LEVEL_2M, and the step reports all 2 MiB (kvm-core.md 1.6)."""
    out = _arch_step(vm_type=uapi.KVM_X86_DEFAULT_VM, private=False, page_size=SZ_2M, offset=0, size=2 * SZ_2M)
    assert out["step"] == SZ_2M and out["level"] == PG_LEVEL_2M


def test_step_inside_a_2m_mapping_reports_up_to_its_end() -> None:
    """kvm_arch_vcpu_pre_fault_memory(): end = (gpa & HPAGE_MASK(level)) + HPAGE_SIZE(level); the
    step is min(size, end - gpa), so a start 5 pages into a 2 MiB mapping covers the rest of it."""
    out = _arch_step(vm_type=uapi.KVM_X86_DEFAULT_VM, private=False, page_size=SZ_2M, offset=5 * PAGE, size=2 * SZ_2M)
    assert out["step"] == SZ_2M - 5 * PAGE and out["level"] == PG_LEVEL_2M


def test_step_is_clipped_to_the_requested_size() -> None:
    """kvm_arch_vcpu_pre_fault_memory(): a 2 MiB mapping may be larger than requested, but the
    step never reports more than range->size."""
    out = _arch_step(vm_type=uapi.KVM_X86_DEFAULT_VM, private=False, page_size=SZ_2M, offset=0, size=PAGE)
    assert out["step"] == PAGE and out["level"] == PG_LEVEL_2M


def test_shared_4k_host_pages_prefault_4k_per_step() -> None:
    """host_pfn_mapping_level(): with 4 KiB host pages the mapping (and the step) is 4 KiB."""
    out = _arch_step(vm_type=uapi.KVM_X86_DEFAULT_VM, private=False, page_size=PAGE, offset=0, size=SZ_2M)
    assert out["step"] == PAGE and out["level"] == PG_LEVEL_4K


def test_private_memory_prefaults_4k_per_step() -> None:
    """guest_memfd reports max_order 0 in mainline, so private pre-faults map 4 KiB and each step
    covers one page (kvm-core.md 1.6)."""
    out = _arch_step(vm_type=uapi.KVM_X86_SW_PROTECTED_VM, private=True, page_size=PAGE, offset=0, size=SZ_2M)
    assert out["step"] == PAGE and out["level"] == PG_LEVEL_4K


def test_prefault_does_not_set_accessed() -> None:
    """spte.c: make_spte(prefetch=true) leaves the Accessed bit clear (api.rst: pre-faulted PTEs
    are not marked Accessed)."""
    out = _arch_step(vm_type=uapi.KVM_X86_DEFAULT_VM, private=False, page_size=PAGE, offset=0, size=PAGE)
    assert out["accessed"] is False


async def partial_progress(kvm: Kvm) -> None:
    vcpu = await _one_vcpu(kvm, npages=4)
    # two pages in the slot, then two with no memslot
    r = uapi.PreFaultMemory(SLOT_GPA + 2 * PAGE, 4 * PAGE)
    assert await pre_fault(vcpu, r) == 0, "any progress makes the ioctl succeed"
    assert (r.gpa, r.size) == (SLOT_GPA + 4 * PAGE, 2 * PAGE), "gpa/size describe what is left"
    # re-issued as is, the rest fails without progress and keeps the range
    assert await pre_fault(vcpu, r) == uapi.ENOENT
    assert (r.gpa, r.size) == (SLOT_GPA + 4 * PAGE, 2 * PAGE)


def test_partial_progress_returns_zero_and_writes_back_the_rest() -> None:
    """kvm_vcpu_pre_fault_memory(): returns full_size == range->size ? r : 0, and kvm_vcpu_ioctl()
    always copies gpa/size back, so a range running off the slot succeeds with the rest left."""
    assert_clean(run_once(partial_progress))


async def run_after_prefault(kvm: Kvm) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = await vm.create_vcpu(0)
    hva, _ = await add_slot(vm, 0, SLOT_GPA, 2 * PAGE)
    await kvm.mm.write(hva + PAGE + 16, b"prefault")
    r = uapi.PreFaultMemory(SLOT_GPA, 2 * PAGE)
    assert await pre_fault(vcpu, r) == 0 and r.size == 0
    reads = await run_guest(vcpu, [GuestAccess.read(SLOT_GPA + PAGE + 16, 8)])
    assert reads == [b"prefault"]


def test_guest_reads_what_the_vmm_wrote_through_a_prefaulted_mapping() -> None:
    """api.rst: pre-fault maps "as if the vCPU generated a stage-2 read page fault": the mapping is
    the VMM's page, so the guest sees the VMM's data."""
    assert_clean(run_once(run_after_prefault))
