"""The host-mapping oracles (asyncvm/check/gmem_mmap.py) and lockdep with mm->mmap_lock in it:
each fires on an injected mistake and stays clean on the correct model; plus the in-place
conversion design's ABI (refused while mapped or pinned, error_offset)."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, SigBus, uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.profile import PROFILES, design, register
from asyncvm.runtime.sync import cond_resched

from .helpers import PAGE, run_failing, run_once

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
INPLACE = "gmem-inplace-conversion"

# The conversion design's switches under discussion, each flipped (test-only design profiles).
if "test-inplace-keep-mapped" not in PROFILES:
    keep_mapped = "test: mapped pages refuse the conversion"
    register(design("test-inplace-keep-mapped", INPLACE, keep_mapped, gmem_conversion_unmaps_host=False))
    register(
        design(
            "test-inplace-618-populate",
            INPLACE,
            "test: in-place conversion on 6.18's whole-call populate lock",
            gmem_populate_per_page_lock=False,
            gmem_prepare_tracking=True,
            gmem_populate_eexist=True,
            tdx_flow="T16",
        )
    )


async def mapped(kvm: asyncvm.Kvm, flags: int, vm_type: int = uapi.KVM_X86_DEFAULT_VM, pages: int = 4) -> tuple:
    vm = await kvm.create_vm(vm_type)
    gmem = await vm.create_guest_memfd(size=pages * PAGE, flags=flags)
    mem = await kvm.mm.mmap(pages * PAGE, fd=gmem, shared=True)
    return vm, gmem, mem


async def inplace_slot(kvm: asyncvm.Kvm, vm_type: int, pages: int = 2) -> tuple:
    """mapped() with MMAP|INIT_SHARED, bound as the VM's only memslot (gpa 0, the mapping as its
    userspace address): the in-place conversion design's guest memory."""
    vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, vm_type, pages)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, pages * PAGE, mem, 0, gmem)
    )
    return vm, gmem, mem


# -- gmem_host_private ------------------------------------------------------------------------


def test_private_fault_fires_when_the_init_shared_check_is_skipped() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, _gmem, mem = await mapped(kvm, MMAP)
        await kvm.mm.write(mem, b"x")

    failure = run_failing(body, bugs=["gmem_fault_ignores_init_shared"])
    assert failure.signature == "gmem_host_private:fault", failure


def test_private_fault_clean_is_sigbus() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP)
        with pytest.raises(SigBus):
            await kvm.mm.write(mem, b"x")
        assert gmem.inode.folios.get(0) is None  # refused before any folio was allocated

    run_once(body)


def test_conversion_leaving_a_host_pte_fires() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        await kvm.mm.write(mem, b"x")
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))

    failure = run_failing(body, profile=INPLACE, bugs=["gmem_convert_skips_unmap"])
    assert failure.signature == "gmem_host_private:pte", failure


def test_conversion_clean_unmaps_the_host_then_sigbus() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        await kvm.mm.write(mem, b"x" * 8)
        seq = vm.mmu_invalidate_seq
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))
        assert kvm.mm.ptes.get(mem // PAGE) is None
        with pytest.raises(SigBus):
            await kvm.mm.read(mem, 1)
        assert await kvm.mm.read(mem + PAGE, 1) == b"\x00"  # the other pages stay shared
        # back to shared: the host maps the same folio again, data kept (in-place)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, 0))
        assert await kvm.mm.read(mem, 8) == b"x" * 8
        assert vm.mmu_invalidate_in_progress == 0 and vm.mmu_invalidate_seq >= seq

    run_once(body, profile=INPLACE)


def test_conversion_refused_while_pinned_with_error_offset() -> None:
    """[design] kvm_gmem_is_safe_for_conversion(): a GUP pin keeps the page shared (-EAGAIN,
    error_offset = the pinned page); after unpinning the conversion goes through."""

    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        folio, _pfn = await kvm.mm.get_user_page(mem + 2 * PAGE)
        req = uapi.MemoryAttributes2(0, 4 * PAGE, PRIVATE)
        with pytest.raises(KvmError) as e:
            await gmem.set_memory_attributes2(req)
        assert e.value.errno == uapi.EAGAIN and req.error_offset == 2 * PAGE
        kvm.allocator.put(folio)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, 4 * PAGE, PRIVATE))

    run_once(body, profile=INPLACE)


def test_conversion_refused_while_mapped_when_it_does_not_unmap() -> None:
    """[design switch gmem_conversion_unmaps_host off] a page the host still maps refuses."""

    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        await kvm.mm.write(mem + PAGE, b"y")
        req = uapi.MemoryAttributes2(0, 2 * PAGE, PRIVATE)
        with pytest.raises(KvmError) as e:
            await gmem.set_memory_attributes2(req)
        assert e.value.errno == uapi.EAGAIN and req.error_offset == PAGE
        await kvm.mm.munmap(mem, 4 * PAGE)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, 2 * PAGE, PRIVATE))

    run_once(body, profile="test-inplace-keep-mapped")


@pytest.mark.parametrize(
    "attrs",
    [
        uapi.MemoryAttributes2(0, PAGE, PRIVATE, flags=1),
        uapi.MemoryAttributes2(0, PAGE, PRIVATE, error_offset=PAGE),
        uapi.MemoryAttributes2(0, PAGE, 1 << 2),
        uapi.MemoryAttributes2(0, 0, PRIVATE),
        uapi.MemoryAttributes2(1, PAGE, PRIVATE),
        uapi.MemoryAttributes2(4 * PAGE, PAGE, PRIVATE),
        uapi.MemoryAttributes2(3 * PAGE, 2 * PAGE, PRIVATE),
    ],
    ids=["flags", "error_offset_in", "unknown_attr", "zero_size", "unaligned", "at_size", "past_size"],
)
def test_conversion_bad_input_is_einval(attrs: uapi.MemoryAttributes2) -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, _mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        with pytest.raises(KvmError) as e:
            await gmem.set_memory_attributes2(attrs)
        assert e.value.errno == uapi.EINVAL

    run_once(body, profile=INPLACE)


def test_conversion_ioctl_needs_the_design() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, _mem = await mapped(kvm, MMAP | INIT_SHARED)
        with pytest.raises(KvmError) as e:
            await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, 0))
        assert e.value.errno == uapi.ENOTTY

    run_once(body)


def test_inplace_design_allows_init_shared_on_private_vms() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        for vm_type in (uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_TDX_VM, uapi.KVM_X86_SNP_VM):
            vm = await kvm.create_vm(vm_type)
            assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
            gmem = await vm.create_guest_memfd(size=PAGE, flags=MMAP)
            mem = await kvm.mm.mmap(PAGE, fd=gmem, shared=True)
            with pytest.raises(SigBus):  # created private: no host access until converted
                await kvm.mm.read(mem, 1)

    run_once(body, profile=INPLACE)


# -- gmem_host_freed --------------------------------------------------------------------------


def test_truncate_leaving_a_host_pte_fires() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED)
        await kvm.mm.write(mem, b"x")
        await gmem.fallocate(PUNCH, 0, PAGE)

    failure = run_failing(body, bugs=["punch_hole_skips_unmap_mapping"])
    assert failure.signature == "gmem_host_freed:pte", failure


def test_truncate_clean_refaults_a_fresh_folio() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, gmem, mem = await mapped(kvm, MMAP | INIT_SHARED)
        await kvm.mm.write(mem, b"x")
        old = gmem.inode.folios.get(0)
        await gmem.fallocate(PUNCH, 0, 2 * PAGE)
        assert old is not None and old.freed
        assert await kvm.mm.read(mem, 1) == b"\x00"
        assert gmem.inode.folios.get(0) is not old

    run_once(body)


def test_fault_racing_truncate_fires_when_the_folio_is_unlocked_early() -> None:
    """gmem_fault_unlocks_early: only some interleavings lose the race; a small campaign finds one
    and the oracle names it (a host PTE set on a folio already truncated)."""
    report = asyncvm.explore(
        "gmem_host_write_vs_prefault_vs_punch_hole",
        bugs=["gmem_fault_unlocks_early"],
        strategy="pct",
        runs=300,
        seed=0,
        stop_on_first_failure=True,
    )
    assert report.failures and report.failures[0].signature.startswith("gmem_host_freed"), report.summary()


def test_fault_racing_truncate_clean() -> None:
    report = asyncvm.explore("gmem_host_write_vs_prefault_vs_punch_hole", strategy="pct", runs=300, seed=0)
    assert report.ok, report.summary()


def test_conversion_racing_a_host_fault_fires_without_the_lock() -> None:
    report = asyncvm.explore(
        "gmem_conversion_vs_host_fault",
        profile=INPLACE,
        bugs=["gmem_fault_skips_invalidate_lock"],
        strategy="pct",
        runs=300,
        seed=0,
        stop_on_first_failure=True,
    )
    assert report.failures and report.failures[0].signature.startswith("gmem_host_private"), report.summary()


def test_conversion_racing_a_host_fault_clean() -> None:
    report = asyncvm.explore("gmem_conversion_vs_host_fault", profile=INPLACE, strategy="pct", runs=300, seed=0)
    assert report.ok, report.summary()


# -- lockdep with mm->mmap_lock ----------------------------------------------------------------


async def _host_fault_then_snp_populate(kvm: asyncvm.Kvm) -> None:
    """A host fault on a mappable guest_memfd, then SNP LAUNCH_UPDATE reading its source."""
    vm = await kvm.create_vm(uapi.KVM_X86_SNP_VM)
    shared = await vm.create_guest_memfd(size=PAGE, flags=vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS))
    mem = await kvm.mm.mmap(PAGE, fd=shared, shared=True)
    try:
        await kvm.mm.write(mem, b"s")
    except SigBus:
        pass
    gmem = await vm.create_guest_memfd(size=PAGE)
    hva = await kvm.mm.mmap(PAGE)
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGE, hva, 0, gmem))
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGE, PRIVATE))
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
    src = await kvm.mm.mmap(PAGE)
    await kvm.mm.write(src, b"\x5a" * PAGE)
    await vm.snp_launch_update(uapi.SevSnpLaunchUpdate(0, src, PAGE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL))


def test_lockdep_sees_mmap_lock_against_the_invalidate_lock() -> None:
    """The in-place conversion fault takes the invalidate lock under mmap_lock; 6.18's populate
    reads its source (mmap_lock) under the invalidate lock: the cycle the series must avoid."""
    failure = run_failing(_host_fault_then_snp_populate, profile="test-inplace-618-populate")
    assert failure.kind == "lockdep", failure
    assert "mm->mmap_lock" in failure.signature and "mapping->invalidate_lock" in failure.signature


def test_lockdep_clean_on_6_18() -> None:
    """6.18's host fault takes only the folio lock under mmap_lock: no cycle."""
    run_once(_host_fault_then_snp_populate)


# -- mm->mmap_lock: an rwsem with writer preference, in lockdep's graph ------------------------


def test_host_fault_orders_mmap_lock_before_the_folio_lock() -> None:
    """mm/memory.c: a fault runs under mmap_lock (read) and guest_memfd takes the folio lock in it."""

    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, _gmem, mem = await mapped(kvm, MMAP | INIT_SHARED)
        await kvm.mm.write(mem, b"x")

    result = run_once(body)
    pairs = {(e.before, e.after) for e in result.lockdep_edges}
    assert ("mm->mmap_lock", "folio_lock") in pairs
    assert ("mm->mmap_lock", "mapping->invalidate_lock") not in pairs  # 6.18: no invalidate lock


def test_inplace_host_fault_orders_mmap_lock_before_the_invalidate_lock() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, _gmem, mem = await mapped(kvm, MMAP | INIT_SHARED, uapi.KVM_X86_SW_PROTECTED_VM)
        await kvm.mm.write(mem, b"x")

    result = run_once(body, profile=INPLACE)
    pairs = {(e.before, e.after) for e in result.lockdep_edges}
    assert ("mm->mmap_lock", "mapping->invalidate_lock") in pairs


def _mmap_lock_read_twice(recurse: bool) -> object:
    async def body(kvm: asyncvm.Kvm) -> None:
        _vm, _gmem, mem = await mapped(kvm, MMAP | INIT_SHARED)
        other = await kvm.mm.mmap(PAGE)
        lock = kvm.mm.mmap_lock

        async def reader() -> None:
            await lock.down_read()
            try:
                # A GUP from inside a section that already holds mmap_lock for read (the
                # recursion mm/ forbids: a queued writer blocks the second down_read).
                if recurse:
                    folio, _pfn = await kvm.mm.get_user_page(mem)
                    kvm.allocator.put(folio)
                else:
                    await cond_resched()
            finally:
                await lock.up_read()

        async def unmapper() -> None:
            await kvm.mm.munmap(other, PAGE)  # down_write

        async with asyncvm.TaskGroup() as tg:
            tg.spawn(reader, name="vmm_reader")
            tg.spawn(unmapper, name="munmap")

    return body


def test_mmap_lock_writer_preference_deadlocks_a_recursive_reader() -> None:
    """rwsem writer preference: reader holds mmap_lock, munmap queues for write, the reader's
    second down_read waits behind the writer: some schedule deadlocks, and the runtime says so."""
    report = asyncvm.explore(_mmap_lock_read_twice(True), strategy="random", runs=200, seed=0)
    assert report.failures and report.failures[0].kind == "deadlock", report.summary()


def test_mmap_lock_reader_and_writer_clean() -> None:
    report = asyncvm.explore(_mmap_lock_read_twice(False), strategy="random", runs=200, seed=0)
    assert report.ok, report.summary()


# -- invalidation balance across the new paths (invariants.py's begin/end rule) ---------------


def test_conversion_without_invalidate_end_fires_the_balance_rule() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=PAGE, flags=MMAP | INIT_SHARED)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGE, 0, 0, gmem))
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))

    failure = run_failing(body, profile=INPLACE, bugs=["gmem_convert_skips_invalidate_end"])
    assert failure.kind == "invalidate_balance", failure


def test_conversion_and_host_truncation_unmap_balanced() -> None:
    """Conversion, truncation's host unmap (MMU notifiers) and the host fault leave every VM with
    no invalidation in progress."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, gmem, mem = await inplace_slot(kvm, uapi.KVM_X86_SW_PROTECTED_VM)
        await kvm.mm.write(mem, b"x" * 2 * PAGE)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))
        await gmem.fallocate(PUNCH, 0, 2 * PAGE)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, 0))
        assert vm.mmu_invalidate_in_progress == 0 and vm.mn_active_invalidate_count == 0

    run_once(body, profile=INPLACE)


def test_inplace_conversion_is_seen_by_guest_faults_and_keeps_the_data() -> None:
    """[design] kvm_mem_is_private() follows guest_memfd: after shared->private the guest's
    private access maps the same folio the host wrote (conversion in place), the host gets SIGBUS;
    back to shared, the host sees what the guest wrote privately."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, gmem, mem = await inplace_slot(kvm, uapi.KVM_X86_SW_PROTECTED_VM)
        assert not vm.mem_is_private(0)
        await kvm.mm.write(mem, b"host" * 2)
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.read(0, 8)])
        assert await vcpu.run() == [b"host" * 2]
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))
        assert vm.mem_is_private(0) and not vm.mem_is_private(1)
        vcpu.load_program([GuestAccess.read(0, 8), GuestAccess.write(0, b"guest!!!")])
        assert await vcpu.run() == [b"host" * 2]
        with pytest.raises(SigBus):
            await kvm.mm.read(mem, 8)
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, 0))
        assert not vm.mem_is_private(0)
        assert await kvm.mm.read(mem, 8) == b"guest!!!"

    run_once(body, profile=INPLACE)


# -- private in hardware: the SNP RMP ----------------------------------------------------------


async def _snp_inplace(kvm: asyncvm.Kvm) -> tuple:
    """An SNP guest (launched, no image) whose only memslot is an MMAP|INIT_SHARED guest_memfd."""
    vm, gmem, mem = await inplace_slot(kvm, uapi.KVM_X86_SNP_VM)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
    await vm.snp_launch_finish()
    return vm, gmem, mem


def test_host_access_to_an_rmp_private_page_fires() -> None:
    """The mistake injected directly: the pfn behind a host mapping is RMP-assigned to the guest
    (what a conversion that forgot to unmap the host, or to check, would leave)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, gmem, mem = await _snp_inplace(kvm)
        await kvm.mm.write(mem, b"x")
        folio = gmem.inode.folios.get(0)
        assert await vm.snp_firmware.rmpupdate_private(folio.pfn, 0, immutable=False) == 0
        await kvm.mm.read(mem, 1)

    failure = run_failing(body, profile=INPLACE)
    assert failure.signature == "gmem_host_private:access", failure


def test_snp_conversion_round_trip_returns_the_page_to_the_host() -> None:
    """[design] shared -> private (a private guest access RMP-assigns the page) -> shared: the
    conversion gives the page back in the RMP (kvm_gmem_invalidate()) before the host maps it."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, gmem, mem = await _snp_inplace(kvm)
        await kvm.mm.write(mem, b"x")
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, PRIVATE))
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.write(0, b"secret!!")])
        await vcpu.run()
        folio = gmem.inode.folios.get(0)
        assert vm.snp_firmware.lookup(folio.pfn) is not None
        await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE, 0))
        assert vm.snp_firmware.lookup(folio.pfn) is None
        assert len(await kvm.mm.read(mem, 8)) == 8

    run_once(body, profile=INPLACE)
