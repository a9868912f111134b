"""Every TDX ioctl errno row of kvm-coco.md section 1 (1.4-1.9 and the 1.10 errno-by-state table),
one behaviour per test, in both TDX flows: "6.18" ([T16], the default) and "7.0" ([T19]: the
state-changing ioctls take "all the locks" first, then run the same checks)."""

from __future__ import annotations

import hashlib

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.x86.tdx.tdx import to_kvm_tdx

from .helpers import MEASURE, PAGE, TDX_SHARED_BIT, build_td, errno_of, gmem_vm, run_once, source

PROFILES = pytest.mark.parametrize("profile", ["6.18", "7.0"])


# -- 1.4 KVM_TDX_INIT_VM --------------------------------------------------------------------------


@PROFILES
def test_init_vm_twice_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_init(): state != UNINITIALIZED -> -EINVAL (1.10: INIT_VM in INITIALIZED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        await vm.tdx_init_vm()
        assert await errno_of(vm.tdx_init_vm()) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_init_vm_after_finalize_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_init(): RUNNABLE is not UNINITIALIZED -> -EINVAL (1.10: INIT_VM in RUNNABLE)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.tdx_finalize_vm()
        assert await errno_of(td.vm.tdx_init_vm()) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_init_vm_with_flags_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_init(): cmd->flags != 0 -> -EINVAL; the TD stays UNINITIALIZED."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        assert await errno_of(vm.tdx_init_vm(flags=1)) == uapi.EINVAL
        await vm.tdx_init_vm()

    run_once(body, profile=profile)


@PROFILES
def test_init_vm_with_too_many_cpuid_entries_is_e2big(profile: str) -> None:
    """tdx.c: tdx_td_init(): cpuid.nent > KVM_MAX_CPUID_ENTRIES -> -E2BIG."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        params = uapi.TdxInitVm(cpuid=uapi.Cpuid2(nent=uapi.KVM_MAX_CPUID_ENTRIES + 1))
        assert await errno_of(vm.tdx_init_vm(params)) == uapi.E2BIG

    run_once(body, profile=profile)


@PROFILES
def test_init_vm_with_reserved_bytes_set_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_init(): non-zero reserved bytes of struct kvm_tdx_init_vm -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        params = uapi.TdxInitVm(reserved=(1,) + (0,) * 11)
        assert await errno_of(vm.tdx_init_vm(params)) == uapi.EINVAL

    run_once(body, profile=profile)


# -- 1.5 KVM_CREATE_VCPU / KVM_TDX_INIT_VCPU --------------------------------------------------------


@PROFILES
def test_create_vcpu_before_init_vm_is_eio(profile: str) -> None:
    """tdx.c: tdx_vcpu_create(): TD not INITIALIZED -> -EIO (1.10: KVM_CREATE_VCPU, UNINITIALIZED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        assert await errno_of(vm.create_vcpu(0)) == uapi.EIO
        await vm.tdx_init_vm()  # and the failed creation left nothing behind (no -EBUSY)
        await vm.create_vcpu(0)

    run_once(body, profile=profile)


@PROFILES
def test_create_vcpu_after_finalize_is_eio(profile: str) -> None:
    """tdx.c: tdx_vcpu_create(): RUNNABLE is not INITIALIZED -> -EIO (1.10: KVM_CREATE_VCPU, RUNNABLE)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.tdx_finalize_vm()
        assert await errno_of(td.vm.create_vcpu(1)) == uapi.EIO

    run_once(body, profile=profile)


@PROFILES
def test_init_vcpu_twice_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_init(): vCPU not UNINITIALIZED -> -EINVAL (1.10: INIT_VCPU, vCPU init)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        assert await errno_of(td.vcpus[0].tdx_init_vcpu()) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_init_vcpu_with_flags_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_init(): cmd->flags != 0 -> -EINVAL; the vCPU stays UNINITIALIZED."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        await vm.tdx_init_vm()
        vcpu = await vm.create_vcpu(0)
        assert await errno_of(vcpu.tdx_init_vcpu(flags=1)) == uapi.EINVAL
        await vcpu.tdx_init_vcpu()

    run_once(body, profile=profile)


@PROFILES
def test_init_vcpu_after_finalize_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_ioctl()/tdx_vcpu_unlocked_ioctl() gate: RUNNABLE -> -EINVAL, even for a vCPU
    created before FINALIZE and never initialized (1.10: INIT_VCPU, RUNNABLE)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        late = await td.vm.create_vcpu(1)
        await td.vm.tdx_finalize_vm()
        assert await errno_of(late.tdx_init_vcpu()) == uapi.EINVAL
        assert await errno_of(td.vcpus[0].tdx_init_vcpu()) == uapi.EINVAL

    run_once(body, profile=profile)


# -- 1.6 KVM_TDX_INIT_MEM_REGION --------------------------------------------------------------------


@PROFILES
def test_init_mem_region_on_uninitialized_vcpu_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_init_mem_region(): the calling vCPU must be INITIALIZED, else -EINVAL
    (1.10: INIT_MEM_REGION, vCPU uninit); nothing is added and the struct is not touched."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        raw = await td.vm.create_vcpu(1)
        region = uapi.TdxInitMemRegion(td.src, 0, 2)
        assert await errno_of(raw.tdx_init_mem_region(region, MEASURE)) == uapi.EINVAL
        assert region == uapi.TdxInitMemRegion(td.src, 0, 2)
        assert not td.vm.tdx_module.sept

    run_once(body, profile=profile)


@PROFILES
def test_init_mem_region_after_finalize_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_init_mem_region(): "initial memory is fixed once finalized" -> -EINVAL
    (1.10: INIT_MEM_REGION, RUNNABLE)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.tdx_finalize_vm()
        region = uapi.TdxInitMemRegion(td.src, 0, 1)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region)) == uapi.EINVAL
        assert region.nr_pages == 1
        assert not td.vm.tdx_module.sept

    run_once(body, profile=profile)


@PROFILES
def test_init_mem_region_with_unknown_flags_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_init_mem_region(): any flag but KVM_TDX_MEASURE_MEMORY_REGION -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        region = uapi.TdxInitMemRegion(td.src, 0, 1)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region, MEASURE | 2)) == uapi.EINVAL
        assert region.nr_pages == 1

    run_once(body, profile=profile)


BAD_REGIONS = {
    "unaligned_source": lambda src: uapi.TdxInitMemRegion(src + 8, 0, 1),
    "unaligned_gpa": lambda src: uapi.TdxInitMemRegion(src, 0x10, 1),
    "nr_pages_zero": lambda src: uapi.TdxInitMemRegion(src, 0, 0),
    "gpa_range_wraps": lambda src: uapi.TdxInitMemRegion(src, uapi.U64_MAX + 1 - PAGE, 2),
    "shared_bit_first_byte": lambda src: uapi.TdxInitMemRegion(src, TDX_SHARED_BIT, 1),
    "shared_bit_last_byte": lambda src: uapi.TdxInitMemRegion(src, TDX_SHARED_BIT - PAGE, 2),
}


@PROFILES
@pytest.mark.parametrize("case", sorted(BAD_REGIONS))
def test_init_mem_region_with_bad_region_is_einval(profile: str, case: str) -> None:
    """tdx.c: tdx_vcpu_init_mem_region(): source_addr or gpa not page aligned, nr_pages == 0,
    gpa + nr_pages*4K wrapping, or the first or last byte not a private GPA
    (vt_is_tdx_private_gpa(): shared bit 47 with GPAW 48) -> -EINVAL before any page is touched,
    and the struct is returned as given."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        region = BAD_REGIONS[case](td.src)
        given = uapi.TdxInitMemRegion(region.source_addr, region.gpa, region.nr_pages)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region, MEASURE)) == uapi.EINVAL
        assert region == given
        assert not td.vm.tdx_module.sept

    run_once(body, profile=profile)


@PROFILES
def test_init_mem_region_outside_any_guest_memfd_slot_is_einval(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): the GFN's memslot has no guest_memfd (here: no memslot
    at all) -> -EINVAL on the first page; the struct is still copied back, unadvanced."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, slot_pages=4)
        region = uapi.TdxInitMemRegion(td.src, 8 * PAGE, 1)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region)) == uapi.EINVAL
        assert region == uapi.TdxInitMemRegion(td.src, 8 * PAGE, 1)

    run_once(body, profile=profile)


@PROFILES
def test_init_mem_region_of_a_shared_gfn_is_einval(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): the GFN's memory attribute is not PRIVATE -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))
        region = uapi.TdxInitMemRegion(td.src + PAGE, PAGE, 1)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region)) == uapi.EINVAL
        assert region.nr_pages == 1
        assert not td.vm.tdx_module.sept

    run_once(body, profile=profile)


@PROFILES
def test_init_mem_region_from_an_unmapped_source_is_efault(profile: str) -> None:
    """tdx.c: tdx_gmem_post_populate() ([T16]; [G20] gmem) GUP of an unmapped source -> -EFAULT."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        gone = kvm.mm.mmap(PAGE)
        await kvm.mm.munmap(gone, PAGE)
        region = uapi.TdxInitMemRegion(int(gone), 0, 1)
        assert await errno_of(td.vcpus[0].tdx_init_mem_region(region)) == uapi.EFAULT
        assert region.nr_pages == 1

    run_once(body, profile=profile)


@pytest.mark.parametrize(
    ("profile", "errno"),
    [("6.18", uapi.EEXIST), ("7.0", uapi.EIO)],
    ids=["6.18-EEXIST", "7.0-EIO"],
)
def test_init_mem_region_failing_on_the_second_page_writes_back_the_progress(profile: str, errno: int) -> None:
    """tdx.c: tdx_vcpu_init_mem_region() copies the struct back unconditionally: a call whose 2nd
    page was already added fails with that page's errno and the struct starts at the failing page
    (source_addr, gpa advanced by one page; nr_pages one less). [G11] the uptodate folio gives
    -EEXIST (kvm_gmem_populate()); [G20]+[T19] the re-map finds the present mirror SPTE,
    RET_PF_SPURIOUS != RET_PF_FIXED -> -EIO (kvm_tdp_mmu_map_private_pfn(); kvm-coco.md 3.4)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=3)
        vcpu = td.vcpus[0]
        await vcpu.tdx_init_mem_region(uapi.TdxInitMemRegion(td.src + PAGE, PAGE, 1))
        region = uapi.TdxInitMemRegion(td.src, 0, 3)
        assert await errno_of(vcpu.tdx_init_mem_region(region, MEASURE)) == errno
        assert region == uapi.TdxInitMemRegion(td.src + PAGE, PAGE, 2)
        assert sorted(td.vm.tdx_module.sept) == [0, 1]
        assert not td.vm.dead, "a refused double populate must not bug the VM"
        # userspace skips the page and carries on; the image is complete and FINALIZE works
        region.source_addr += PAGE
        region.gpa += PAGE
        region.nr_pages -= 1
        await vcpu.tdx_init_mem_region(region, MEASURE)
        await td.vm.tdx_finalize_vm()

    run_once(body, profile=profile)


# -- 1.7 KVM_TDX_FINALIZE_VM -------------------------------------------------------------------------


@PROFILES
def test_finalize_before_init_vm_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_finalize(): no HKID -> -EINVAL (1.10: FINALIZE_VM, UNINITIALIZED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        assert await errno_of(vm.tdx_finalize_vm()) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_finalize_twice_is_einval(profile: str) -> None:
    """tdx.c: tdx_td_finalize(): state == RUNNABLE -> -EINVAL (1.10: FINALIZE_VM, RUNNABLE)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 1), MEASURE)
        await td.vm.tdx_finalize_vm()
        mrtd = td.vm.tdx_module.mrtd
        assert await errno_of(td.vm.tdx_finalize_vm()) == uapi.EINVAL
        assert td.vm.tdx_module.mrtd == mrtd

    run_once(body, profile=profile)


@PROFILES
def test_finalize_with_an_empty_image_is_accepted(profile: str) -> None:
    """tdx.c: tdx_td_finalize(): zero pages added is not rejected by KVM; hw_error = 0 and MRTD is
    the SHA-384 of nothing."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.tdx_finalize_vm()
        assert td.vm.tdx_hw_error == 0
        assert td.vm.tdx_module.mrtd == hashlib.sha384().digest()

    run_once(body, profile=profile)


# -- 1.8 KVM_TDX_GET_CPUID ----------------------------------------------------------------------------


@PROFILES
def test_get_cpuid_works_while_the_td_is_built(profile: str) -> None:
    """tdx.c: tdx_vcpu_get_cpuid() is allowed while INITIALIZED, on an initialized or uninitialized
    vCPU (1.10: GET_CPUID ok); a too-small nent -> -E2BIG with nent updated."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        raw = await td.vm.create_vcpu(1)
        small = uapi.Cpuid2(nent=0)
        assert await errno_of(td.vcpus[0].tdx_get_cpuid(small)) == uapi.E2BIG
        assert small.nent > 0
        for vcpu in (td.vcpus[0], raw):
            cpuid = uapi.Cpuid2(nent=small.nent)
            await vcpu.tdx_get_cpuid(cpuid)

    run_once(body, profile=profile)


@PROFILES
def test_get_cpuid_after_finalize_is_einval(profile: str) -> None:
    """tdx.c: tdx_vcpu_ioctl() gate: state == RUNNABLE -> -EINVAL for GET_CPUID too (1.8, 1.10)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vm.tdx_finalize_vm()
        assert await errno_of(td.vcpus[0].tdx_get_cpuid(uapi.Cpuid2(nent=64))) == uapi.EINVAL

    run_once(body, profile=profile)


# -- 1.9 pre-fault and KVM_RUN ----------------------------------------------------------------------------


@PROFILES
def test_pre_fault_before_finalize_is_eopnotsupp(profile: str) -> None:
    """mmu.c: kvm_arch_vcpu_pre_fault_memory(): !pre_fault_allowed -> -EOPNOTSUPP, both before and
    after INIT_MEM_REGION (1.10: PRE_FAULT_MEMORY, INITIALIZED); nothing is mapped and r is
    unchanged."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        r = uapi.PreFaultMemory(0, 4 * PAGE)
        assert await errno_of(td.vcpus[0].pre_fault_memory(r)) == uapi.EOPNOTSUPP
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 1))
        assert await errno_of(td.vcpus[0].pre_fault_memory(r)) == uapi.EOPNOTSUPP
        assert (r.gpa, r.size) == (0, 4 * PAGE)
        assert sorted(td.vm.tdx_module.sept) == [0]
        assert to_kvm_tdx(td.vm).nr_premapped == 0

    run_once(body, profile=profile)


@PROFILES
def test_pre_fault_after_finalize_augs_pending_pages(profile: str) -> None:
    """tdx.c: tdx_td_finalize() sets pre_fault_allowed after RUNNABLE; a pre-fault then goes through
    the TDP fault -> TDH.MEM.PAGE.AUG, leaving the pages PENDING until the guest accepts them
    (1.9); the PAGE.ADDed page is untouched (RET_PF_SPURIOUS)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 1))
        await td.vm.tdx_finalize_vm()
        r = uapi.PreFaultMemory(0, 3 * PAGE)
        await td.vcpus[0].pre_fault_memory(r)
        assert r.size == 0
        sept = td.vm.tdx_module.sept
        assert (sept[0].state, sept[0].added) == ("MAPPED", True)
        assert [(sept[g].state, sept[g].added) for g in (1, 2)] == [("PENDING", False)] * 2
        # the guest accepts on first touch and reads zeros from the AUGed page
        td.vcpus[0].load_program([GuestAccess.read(PAGE, 16), GuestAccess.read(0, 16)])
        assert await td.vcpus[0].run() == [bytes(16), td.image[:16]]
        assert sept[1].state == "MAPPED"

    run_once(body, profile=profile)


@PROFILES
def test_kvm_run_before_finalize_is_refused(profile: str) -> None:
    """tdx.c: tdx_vcpu_pre_run(): KVM_RUN needs an INITIALIZED vCPU and a RUNNABLE TD, else -EINVAL
    (1.9, 1.10: KVM_RUN refused while INITIALIZED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 1))
        td.vcpus[0].load_program([GuestAccess.read(0, 8)])
        assert await errno_of(td.vcpus[0].run()) == uapi.EINVAL
        assert td.vcpus[0].pc == 0

    run_once(body, profile=profile)


@PROFILES
def test_kvm_run_of_an_uninitialized_vcpu_is_refused_after_finalize(profile: str) -> None:
    """tdx.c: tdx_vcpu_pre_run(): a vCPU that never had KVM_TDX_INIT_VCPU cannot run, even in a
    RUNNABLE TD (-EINVAL); an initialized one can."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm)
        raw = await td.vm.create_vcpu(1)
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 1))
        await td.vm.tdx_finalize_vm()
        raw.load_program([GuestAccess.read(0, 8)])
        assert await errno_of(raw.run()) == uapi.EINVAL
        td.vcpus[0].load_program([GuestAccess.read(0, 8)])
        assert await td.vcpus[0].run() == [td.image[:8]]

    run_once(body, profile=profile)


# -- ioctls of the wrong VM type ---------------------------------------------------------------------


def test_tdx_vm_ioctls_on_a_non_tdx_vm_are_enotty() -> None:
    """vmx/main.c: vt_mem_enc_ioctl(): !is_td(kvm) -> -ENOTTY; svm: sev_mem_enc_ioctl() has no TDX
    sub-commands either: INIT_VM and FINALIZE_VM on a default or an SNP VM -> -ENOTTY."""

    async def body(kvm: asyncvm.Kvm) -> None:
        for vm_type in (uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SNP_VM):
            vm = await kvm.create_vm(vm_type)
            assert await errno_of(vm.tdx_init_vm()) == uapi.ENOTTY
            assert await errno_of(vm.tdx_finalize_vm()) == uapi.ENOTTY
            assert vm.tdx_hw_error == 0

    run_once(body)


def test_tdx_vcpu_ioctls_on_an_snp_vcpu_are_enotty() -> None:
    """x86.c: kvm_arch_vcpu_ioctl(KVM_MEMORY_ENCRYPT_OP): no vcpu_mem_enc_ioctl in svm_x86_ops ->
    -ENOTTY for INIT_VCPU, INIT_MEM_REGION and GET_CPUID on an SNP vCPU."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await gmem_vm(kvm, uapi.KVM_X86_SNP_VM, 4)
        vcpu = await vm.create_vcpu(0)
        src = await source(kvm, bytes(PAGE))
        assert await errno_of(vcpu.tdx_init_vcpu()) == uapi.ENOTTY
        assert await errno_of(vcpu.tdx_init_mem_region(uapi.TdxInitMemRegion(src, 0, 1))) == uapi.ENOTTY
        assert await errno_of(vcpu.tdx_get_cpuid(uapi.Cpuid2(nent=8))) == uapi.ENOTTY

    run_once(body)
