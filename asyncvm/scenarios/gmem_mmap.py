"""guest_memfd the host can map (6.18 GUEST_MEMFD_FLAG_MMAP / INIT_SHARED) and the in-place
conversion design: the host's page tables, the guest's and the guest_memfd page cache meeting on
one folio."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import SigBus, uapi
from asyncvm.check.errno import expect_errno
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import pre_fault, run_guest

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


async def gmem_only_vm(kvm: Any, vm_type: int, pages: int, flags: int) -> tuple[Any, Any, int]:
    """A VM whose memslot 0 (gpa 0) is backed only by a guest_memfd of `flags`, and the VMM's
    MAP_SHARED mapping of that file (the slot's userspace_addr points into it, as a VMM does)."""
    vm = await kvm.create_vm(vm_type)
    if vm_type == uapi.KVM_X86_TDX_VM:
        await vm.tdx_init_vm()
    gmem = await vm.create_guest_memfd(size=pages * PAGE_SIZE, flags=flags)
    mem = await kvm.mm.mmap(pages * PAGE_SIZE, fd=gmem, offset=0, shared=True)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, pages * PAGE_SIZE, mem, 0, gmem)
    )
    return vm, gmem, mem


@asyncvm.scenario(
    name="gmem_host_write_vs_prefault_vs_punch_hole",
    params={"pages": 4, "hole": 2},
    profiles=("6.18", "7.0", "gmem-inplace-conversion"),  # no GUEST_MEMFD_FLAG_MMAP before 6.18
)
async def gmem_host_write_vs_prefault_vs_punch_hole(kvm: Any, pages: int = 4, hole: int = 2) -> None:
    """The VMM writes guest memory through its mapping of an MMAP|INIT_SHARED guest_memfd while a
    vCPU of a default VM pre-faults the guest_memfd-only slot and userspace punches a hole.

    Hunts: a host PTE outliving PUNCH_HOLE (truncation must unmap the host first), a host fault
    mapping a folio truncated while it was being faulted (the page must stay locked until the PTE
    is set), a shared SPTE left on a truncated folio (the KVM_FILTER_SHARED invalidation). Watched
    by gmem_host_freed, gmem_host_private, stale_spte / mapped_freed_pfn, the sequence rule and
    invalidation balance.
    """
    vm, gmem, mem = await gmem_only_vm(kvm, uapi.KVM_X86_DEFAULT_VM, pages, MMAP | INIT_SHARED)
    vcpu = await vm.create_vcpu(0)
    start = max(0, (pages - hole) // 2)

    async def host() -> None:
        # Each page twice: a write that faults, then one that hits (or refaults after the hole).
        for _round in range(2):
            for i in range(start, min(pages, start + hole)):
                await kvm.mm.write(mem + i * PAGE_SIZE, bytes([0x40 + i]) * 16)

    async def punch() -> None:
        await gmem.fallocate(PUNCH, start * PAGE_SIZE, hole * PAGE_SIZE)

    async def prefault() -> None:
        await pre_fault(vcpu, 0, pages * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(host, name="vmm_write")
        tg.spawn(prefault, name="vcpu0")
        tg.spawn(punch, name="punch_hole")
    # Whatever the order, the host and the file agree on what the hole holds now.
    for i in range(start, min(pages, start + hole)):
        data = await kvm.mm.read(mem + i * PAGE_SIZE, 16)
        assert data in (bytes(16), bytes([0x40 + i]) * 16), data


@asyncvm.scenario(
    name="gmem_mmap_coco_refuses",
    params={"vm": "tdx", "pages": 2},
)
async def gmem_mmap_coco_refuses(kvm: Any, vm: str = "tdx", pages: int = 2) -> None:
    """A TDX or SNP VM and the 6.18 flags: INIT_SHARED is refused (-EINVAL: x86's
    kvm_arch_supports_gmem_init_shared() is false with private memory), MMAP alone is accepted and
    maps, but every host access to the private guest_memfd is SIGBUS, while userspace punches a
    hole and a second host thread retries its access.

    Hunts: a host fault handing out a page of a guest_memfd that was never shared (the INIT_SHARED
    check), GUP of it not failing. Watched by gmem_host_private and the errno oracle.
    """
    if vm not in ("tdx", "snp"):
        raise ValueError(f"gmem_mmap_coco_refuses: vm must be 'tdx' or 'snp', not {vm!r}")
    vm_type = uapi.KVM_X86_TDX_VM if vm == "tdx" else uapi.KVM_X86_SNP_VM
    probe = await kvm.create_vm(vm_type)
    flags = probe.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
    if not flags & MMAP:
        # before 6.18: no flag at all
        try:
            await probe.create_guest_memfd(size=pages * PAGE_SIZE, flags=MMAP)
            raise AssertionError("GUEST_MEMFD_FLAG_MMAP accepted by a kernel without it")
        except KvmError as e:
            expect_errno(e, (uapi.EINVAL,), "KVM_CREATE_GUEST_MEMFD(MMAP) before 6.18")
        return
    if not flags & INIT_SHARED:
        try:
            await probe.create_guest_memfd(size=pages * PAGE_SIZE, flags=MMAP | INIT_SHARED)
            raise AssertionError("INIT_SHARED accepted on a VM with private memory")
        except KvmError as e:
            expect_errno(e, (uapi.EINVAL,), "KVM_CREATE_GUEST_MEMFD(INIT_SHARED) on a confidential VM")
    the_vm, gmem, mem = await gmem_only_vm(kvm, vm_type, pages, MMAP)
    await the_vm.set_memory_attributes(uapi.MemoryAttributes(0, pages * PAGE_SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))

    async def host_touch(i: int) -> None:
        for _try in range(2):
            try:
                await kvm.mm.write(mem + i * PAGE_SIZE, b"\xee" * 8)
                raise AssertionError(f"host wrote private guest_memfd page {i}")
            except SigBus:
                pass
            try:
                await kvm.mm.get_user_page(mem + i * PAGE_SIZE)
                raise AssertionError(f"GUP of private guest_memfd page {i} succeeded")
            except KvmError as e:
                expect_errno(e, (uapi.EFAULT,), "GUP of a private guest_memfd page")

    async def punch() -> None:
        await gmem.fallocate(PUNCH, 0, PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(host_touch, 0, name="vmm0")
        tg.spawn(host_touch, pages - 1, name="vmm1")
        tg.spawn(punch, name="punch_hole")


@asyncvm.scenario(
    name="gmem_conversion_vs_host_fault",
    params={"rounds": 2, "guest": True},
    profiles=("gmem-inplace-conversion",),
)
async def gmem_conversion_vs_host_fault(kvm: Any, rounds: int = 2, guest: bool = True) -> None:
    """[design gmem-inplace-conversion] userspace converts a page of an MMAP|INIT_SHARED
    guest_memfd to private (KVM_SET_MEMORY_ATTRIBUTES2 on the file) while a VMM thread faults the
    same page through its mapping (and, with `guest`, a vCPU reads it as whatever it is now), then
    converts it back; under a kernel profile (no in-place conversion) the file refuses the ioctl
    and the scenario checks only that.

    Hunts: a host fault that checked shareability before the conversion mapping the page after it
    (the check must be under the invalidate lock), a conversion leaving the host mapping a private
    page (it must unmap and refuse while the page is mapped or pinned). Watched by
    gmem_host_private, invalidation balance, and the -EAGAIN/error_offset ABI.
    """
    in_place = kvm.profile.gmem_in_place_conversion
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM if in_place else uapi.KVM_X86_DEFAULT_VM
    the_vm, gmem, mem = await gmem_only_vm(kvm, vm_type, 2, MMAP | INIT_SHARED)
    if not in_place:
        try:
            await gmem.set_memory_attributes2(uapi.MemoryAttributes2(0, PAGE_SIZE, 0))
            raise AssertionError("KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd without in-place conversion")
        except KvmError as e:
            expect_errno(e, (uapi.ENOTTY,), "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd")
        return

    async def convert() -> None:
        for _round in range(rounds):
            for attrs in (uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0):
                for _try in range(3):
                    req = uapi.MemoryAttributes2(0, PAGE_SIZE, attrs)
                    try:
                        await gmem.set_memory_attributes2(req)
                        break
                    except KvmError as e:
                        expect_errno(e, (uapi.EAGAIN,), "KVM_SET_MEMORY_ATTRIBUTES2 shared->private")
                        assert req.error_offset == 0, req.error_offset

    async def host() -> None:
        for _round in range(rounds + 1):
            try:
                await kvm.mm.write(mem, b"\x3c" * 8)
            except SigBus:
                pass

    async def no_conversion(_fault: Any) -> None:
        """A memory fault exit: the page changed kind under the access; re-enter, and the guest
        accesses it as what it is now."""

    async def vcpu_reads(vcpu: Any) -> None:
        await run_guest(vcpu, [GuestAccess.read(0, 8)] * (rounds + 1), convert=no_conversion)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(convert, name="convert")
        tg.spawn(host, name="vmm_write")
        if guest:
            tg.spawn(vcpu_reads, await the_vm.create_vcpu(0), name="vcpu0")
