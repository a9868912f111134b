"""SEV-SNP scenarios: LAUNCH_UPDATE and the guest_memfd paths around it."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime.failures import Violation
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import (
    convert_on_fault,
    expect_prefault_refused,
    guest_reads_during_conversion,
    pages_param,
    pre_fault,
    private_vm,
    run_guest,
    vcpus_param,
)

POLICY = 1 << 17  # the reserved-must-be-one bit


# KVM_SEV_SNP_LAUNCH_UPDATE turns a first-page -EINTR into -EIO: signals would only end runs early.
@asyncvm.scenario(name="snp_launch_update_vs_fallocate", params={"pages": pages_param(4)}, data={"signal": 0.0})
async def snp_launch_update_vs_fallocate(kvm: Any, pages: int = 4) -> None:
    """fallocate() of the image's guest_memfd racing KVM_SEV_SNP_LAUNCH_UPDATE of it.

    The mailing-list thread: under the 6.10 profile fallocate zeroes and *prepares* (RMP-assigns)
    the folios, so a LAUNCH_UPDATE that comes after it fails with -EIO; from 6.11 fallocate only
    allocates and the launch succeeds whatever the order. Hunts that, double population (-EEXIST),
    and folios marked uptodate before they were prepared. Watched by snp_double_launch,
    rmp_host_write, rmp_freed_private and the launch completing.
    """
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SNP_VM, pages)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=POLICY))
    src = await kvm.mm.mmap(pages * PAGE_SIZE)
    await kvm.mm.write(src, b"\x5a" * (pages * PAGE_SIZE))

    async def launch() -> None:
        update = uapi.SevSnpLaunchUpdate(0, src, pages * PAGE_SIZE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        while update.len:
            await vm.snp_launch_update(update)

    async def allocate() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, pages * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(launch, name="launch_update")
        tg.spawn(allocate, name="fallocate")
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    r = uapi.PreFaultMemory(0, pages * PAGE_SIZE)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            if e.errno != uapi.EINTR:
                raise


async def _launched_vm(kvm: Any, pages: int) -> tuple[Any, Any, int]:
    """An SNP VM after LAUNCH_START with a private guest_memfd slot and a source image in kvm.mm."""
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SNP_VM, pages)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=POLICY))
    src = await kvm.mm.mmap(pages * PAGE_SIZE)
    await kvm.mm.write(src, b"".join(bytes([0x40 + i]) * PAGE_SIZE for i in range(pages)))
    return vm, gmem, src


async def _launch_update(vm: Any, src: int, gfn: int, pages: int) -> None:
    """KVM_SEV_SNP_LAUNCH_UPDATE until len == 0 (success may be partial progress)."""
    update = uapi.SevSnpLaunchUpdate(gfn, src + gfn * PAGE_SIZE, pages * PAGE_SIZE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    while update.len:
        await vm.snp_launch_update(update)


@asyncvm.scenario(name="snp_launch_update_vs_punch_hole", params={"pages": pages_param(4)}, data={"signal": 0.0})
async def snp_launch_update_vs_punch_hole(kvm: Any, pages: int = 4) -> None:
    """PUNCH_HOLE over part of the image while KVM_SEV_SNP_LAUNCH_UPDATE launches it; then FINISH and
    a guest that reads every page.

    Hunts: a folio truncated between the RMP check, the copy, rmp_make_private() and
    SNP_LAUNCH_UPDATE (kvm_gmem_populate() holds the invalidate lock, sev.c: snp_launch_update());
    a launched page freed while still assigned (sev_gmem_invalidate() must return it to shared).
    The guest must read each page's launched contents, or zeros where the hole was punched after
    the launch. Watched by rmp_host_write, rmp_freed_private, snp_double_launch, rmp_guest_shared
    and the memory-model oracles.
    """
    vm, gmem, src = await _launched_vm(kvm, pages)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, PAGE_SIZE, 2 * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(_launch_update, vm, src, 0, pages, name="launch_update")
        tg.spawn(punch, name="punch_hole")
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    reads = await run_guest(vcpu, [GuestAccess.read(i * PAGE_SIZE, 8) for i in range(pages)])
    for i, got in enumerate(reads):
        if got not in (bytes([0x40 + i]) * 8, bytes(8)):
            raise Violation(
                "guest_data",
                f"the guest read {got.hex()} from gfn {i:#x}: neither its launched contents nor zeros",
                signature="guest_data:snp_launch",
                gfn=i,
            )


@asyncvm.scenario(name="snp_launch_update_vs_prefault", params={"pages": pages_param(4)}, data={"signal": 0.0})
async def snp_launch_update_vs_prefault(kvm: Any, pages: int = 4) -> None:
    """KVM_PRE_FAULT_MEMORY on a vCPU while LAUNCH_UPDATE builds the image; then FINISH and pre-fault
    again.

    Hunts the reason pre-fault is refused before LAUNCH_FINISH ("KVM: x86: disallow pre-fault for
    SNP VMs before initialization"): a fault would RMP-assign a page (sev_gmem_prepare()) and make
    its LAUNCH_UPDATE fail. Before FINISH the pre-fault must fail with -EOPNOTSUPP (errno oracle);
    after it, it maps everything. Watched by snp_prepare_before_finish and the RMP oracles.
    """
    vm, _gmem, src = await _launched_vm(kvm, pages)
    vcpu = await vm.create_vcpu(0)

    async def prefault() -> None:
        await expect_prefault_refused(vcpu, pages * PAGE_SIZE, "on an SNP VM before LAUNCH_FINISH")

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(_launch_update, vm, src, 0, pages, name="launch_update")
        tg.spawn(prefault, name="vcpu0")
    await vm.snp_launch_finish()
    await pre_fault(vcpu, 0, pages * PAGE_SIZE)


# The launch in the set-up would turn a signal into -EIO (KVM_SEV_SNP_LAUNCH_UPDATE collapses -EINTR).
@asyncvm.scenario(
    name="snp_post_launch_faults_vs_conversion", params={"pages": pages_param(4, low=2)}, data={"signal": 0.0}
)
async def snp_post_launch_faults_vs_conversion(kvm: Any, pages: int = 4) -> None:
    """After LAUNCH_FINISH a vCPU faults every page in (as its attributes say) while userspace converts
    half of them, launched page included, to shared.

    Hunts: a private NPT mapping surviving the conversion, a private fault that maps a page the RMP
    does not assign to the guest (sev_gmem_prepare() on every private fault), a shared mapping of
    guest-owned memory. The VMM answers KVM_EXIT_MEMORY_FAULT by converting the page back, as
    private_mem_conversions_test does. Watched by attribute_mismatch, rmp_guest_shared,
    stale_install and the balance oracle.
    """
    vm, _gmem, src = await _launched_vm(kvm, pages)
    await _launch_update(vm, src, 0, 1)
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    await guest_reads_during_conversion(vm, vcpu, pages)


# KVM_SEV_SNP_LAUNCH_UPDATE turns a first-page -EINTR into -EIO, which here would look like a refusal.
@asyncvm.scenario(name="snp_launch_update_vs_conversion", params={"pages": pages_param(4, low=2)}, data={"signal": 0.0})
async def snp_launch_update_vs_conversion(kvm: Any, pages: int = 4) -> None:
    """KVM_SEV_SNP_LAUNCH_UPDATE of the whole image while userspace converts gfn 1 to shared
    (KVM_SET_MEMORY_ATTRIBUTES); then LAUNCH_FINISH.

    Hunts a launch that encrypts and RMP-assigns a page the VMM has just made shared:
    guest_memfd.c: kvm_gmem_populate() must refuse a gfn that is not PRIVATE (-EINVAL, which
    sev.c: snp_launch_update() returns as -EIO on the first page of a call). The VMM skips the
    refused page, which must be gfn 1 and shared by then. Watched by populate_shared (the
    kvm_gmem_populate tracepoint checks the attributes), the errno oracle and the RMP oracles.
    """
    vm, _gmem, src = await _launched_vm(kvm, pages)

    async def launch() -> None:
        update = uapi.SevSnpLaunchUpdate(0, src, pages * PAGE_SIZE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        while update.len:
            try:
                await vm.snp_launch_update(update)
            except KvmError as e:
                if e.errno != uapi.EIO or update.gfn_start != 1 or vm.mem_is_private(1):
                    raise
                update.gfn_start += 1  # the converted page: the VMM leaves it out of the image
                update.uaddr += PAGE_SIZE
                update.len -= PAGE_SIZE

    async def to_shared() -> None:
        await vm.set_memory_attributes(uapi.MemoryAttributes(PAGE_SIZE, PAGE_SIZE, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(launch, name="launch_update")
        tg.spawn(to_shared, name="attr_flip")
    await vm.snp_launch_finish()


@asyncvm.scenario(name="snp_faults_race", params={"vcpus": vcpus_param(2), "pages": pages_param(2, low=2)})
async def snp_faults_race(kvm: Any, vcpus: int = 2, pages: int = 2) -> None:
    """After LAUNCH_FINISH (no image) the vCPUs fault the same private pages at once while userspace
    punches a hole in gfn 1: each vCPU writes its own 8 bytes of gfn 0, reads gfn 1, and reads
    its bytes back.

    Hunts a first private fault zeroing and preparing (sev_gmem_prepare(): RMP-assign) a folio
    that another fault is preparing too, or that the hole punch truncates: guest_memfd.c:
    kvm_gmem_get_pfn() must hold the folio lock across the uptodate check, the zeroing and the
    arch prepare hook. A second zeroing loses the other vCPU's write, a second RMPUPDATE fails
    the fault. Watched by the read-back check (guest_data), the errno oracle, rmp_guest_shared,
    rmp_freed_private and the stale-mapping oracles.
    """
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SNP_VM, pages)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=POLICY))
    await vm.snp_launch_finish()
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    slots = PAGE_SIZE // 8

    async def guest(vcpu: Any) -> None:
        off = vcpu.vcpu_id % slots * 8
        mark = (vcpu.vcpu_id + 1).to_bytes(8, "little")
        program = [
            GuestAccess.write(off, mark, private=True),
            GuestAccess.read(PAGE_SIZE, private=True),
            GuestAccess.read(off, private=True),
        ]
        got = (await run_guest(vcpu, program, convert=convert_on_fault(vm)))[-1]
        writer = int.from_bytes(got, "little") - 1
        # vCPUs beyond the page's 512 slots share one: any of their writes may be the last
        if not (0 <= writer < vcpus and writer % slots == vcpu.vcpu_id % slots):
            raise Violation(
                "guest_data",
                f"vcpu{vcpu.vcpu_id} read {got.hex()} back from gpa {off:#x}: its write was lost",
                signature="guest_data:snp_faults_race",
                gpa=off,
            )

    async with asyncvm.TaskGroup() as tg:
        for v in cpus:
            tg.spawn(guest, v, name=f"vcpu{v.vcpu_id}")
        tg.spawn(
            gmem.fallocate,
            uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE,
            PAGE_SIZE,
            PAGE_SIZE,
            name="punch_hole",
        )
