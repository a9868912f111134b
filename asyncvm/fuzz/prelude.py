"""The helpers every fuzz program calls: one per call of describe.py, public API only.

This module's text (below this docstring) is copied verbatim into each program file `asyncvm fuzz`
writes, and `asyncvm fuzz` runs its generated programs in this module's namespace, so a written
file makes exactly the calls, and reaches exactly the scheduling points, that the fuzzer's program
did. Ranges are in pages of the guest (gfns) or of a file or mapping.
"""

from __future__ import annotations

from typing import Any

import asyncvm  # noqa: F401 - a written program registers itself with it
from asyncvm import GuestAccess, KvmError, TaskGroup, Violation, uapi  # noqa: F401 - programs use them

PAGE = uapi.PAGE_SIZE
SNP_POLICY = 1 << 17  # the policy bit that must be one
#: guest_memfd flags of a file the VMM maps and shares with the guest (6.18)
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
#: conversions a vCPU's VMM answers before it gives up on a guest that keeps faulting
MAX_CONVERSIONS = 4
#: KVM_TDX_FINALIZE_VM tries while the TDX module is busy
FINALIZE_TRIES = 8

#: errnos the kernel may return for each call in a legal program (after the helper's own retries);
#: any other is a finding (see asyncvm/fuzz/describe.py for where each comes from)
ALLOWED: dict[str, tuple[str, ...]] = {
    "pre_fault": ("ENOENT", "EFAULT", "EAGAIN", "EOPNOTSUPP", "EHWPOISON", "EINVAL"),
    "punch_hole": ("EBADF",),
    "allocate": ("EBADF", "EINTR", "ENOMEM"),
    "set_attributes": ("EINTR", "EAGAIN", "ENOMEM"),
    "set_slot": ("EEXIST", "EINVAL", "EBADF"),
    "delete_slot": ("EINVAL",),
    "munmap": (),
    "madvise_dontneed": ("ENOMEM",),
    "run": ("EFAULT", "EHWPOISON", "ENOENT", "EINVAL"),
    "init_vcpu": ("EINVAL",),
    "init_mem_region": ("EINVAL", "EEXIST", "EFAULT", "ENOENT", "EIO", "EBUSY", "EAGAIN"),
    "finalize": ("EINVAL", "EBUSY"),
    "launch_update": ("EINVAL", "EEXIST", "EFAULT", "EIO", "ENOENT", "EAGAIN"),
    "launch_finish": ("EINVAL", "EIO"),
    "close": ("EBADF",),
    "host_write": ("EFAULT",),
    "host_read": ("EFAULT",),
    "convert": ("EAGAIN", "EBADF", "EINVAL"),
}


async def call(op: Any) -> int:
    """Run one call of the program: 0, or an errno the kernel may return for it here; any other
    errno is an `errno` failure. `op` is the helper's coroutine: its name says which call it is."""
    name = op.cr_code.co_name
    try:
        await op
    except KvmError as e:
        if e.name in ALLOWED[name]:
            return e.errno or 0
        raise Violation(
            "errno",
            f"{name} failed with {e.name}, which the kernel does not return here ({e})",
            signature=f"errno:fuzz.{name}:{e.name}",
        ) from None
    return 0


async def pre_fault(vcpu: Any, first: int, count: int) -> None:
    """KVM_PRE_FAULT_MEMORY over gfns [first, first + count), re-issued after progress or EINTR."""
    r = uapi.PreFaultMemory(first * PAGE, count * PAGE)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            if e.errno != uapi.EINTR:
                raise


async def punch_hole(gmem: Any, first: int, count: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) of file pages [first, first + count)."""
    await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, first * PAGE, count * PAGE)


async def allocate(gmem: Any, first: int, count: int) -> None:
    """fallocate(KEEP_SIZE) of file pages [first, first + count)."""
    await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, first * PAGE, count * PAGE)


async def set_attributes(vm: Any, first: int, count: int, private: bool) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES: gfns [first, first + count) PRIVATE or shared."""
    attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
    await vm.set_memory_attributes(uapi.MemoryAttributes(first * PAGE, count * PAGE, attrs))


async def set_slot(
    vm: Any, slot: int, gfn: int, pages: int, hva: int, gmem: Any = None, dirty_log: bool = False
) -> None:
    """KVM_SET_USER_MEMORY_REGION2: create, move or re-flag a memslot (in guest_memfd `gmem`)."""
    flags = uapi.KVM_MEM_GUEST_MEMFD if gmem is not None else 0
    flags |= uapi.KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(slot, flags, gfn * PAGE, pages * PAGE, hva, 0, gmem))


async def delete_slot(vm: Any, slot: int) -> None:
    """KVM_SET_USER_MEMORY_REGION2 with memory_size 0: delete the memslot."""
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(slot, 0, 0, 0, 0))


async def munmap(kvm: Any, hva: int, first: int, count: int) -> None:
    """munmap() of pages [first, first + count) of the mapping at `hva` (fires the MMU notifiers)."""
    await kvm.mm.munmap(hva + first * PAGE, count * PAGE)


async def madvise_dontneed(kvm: Any, hva: int, first: int, count: int) -> None:
    """madvise(MADV_DONTNEED) of pages [first, first + count) of the mapping at `hva`."""
    await kvm.mm.madvise(hva + first * PAGE, count * PAGE, uapi.MADV_DONTNEED)


async def run(vm: Any, vcpu: Any, accesses: list[tuple[int, bool, bool | None]], convert: bool = True) -> None:
    """KVM_RUN a guest that reads or writes each (gfn, write, private) in turn; with `convert` the
    VMM answers a memory-fault exit by converting the page to what the guest accessed it as."""
    vcpu.load_program(
        [
            GuestAccess.write(gfn * PAGE, b"\xa5" * 8, private) if write else GuestAccess.read(gfn * PAGE, 8, private)
            for gfn, write, private in accesses
        ]
    )
    conversions = 0
    while True:
        try:
            await vcpu.run()
            return
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            exit = vcpu.kvm_run
            if not convert or exit.exit_reason != uapi.KVM_EXIT_MEMORY_FAULT or conversions == MAX_CONVERSIONS:
                raise
            conversions += 1
            fault = exit.memory_fault
            private = bool(fault.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
            await call(set_attributes(vm, fault.gpa // PAGE, 1, private))


async def init_vcpu(vcpu: Any) -> None:
    """KVM_TDX_INIT_VCPU."""
    await vcpu.tdx_init_vcpu()


async def init_mem_region(vcpu: Any, src: int, first: int, count: int, measure: bool = True) -> None:
    """KVM_TDX_INIT_MEM_REGION of gfns [first, first + count) from the image at `src`, re-issued
    after EINTR (the struct says where to go on)."""
    region = uapi.TdxInitMemRegion(src + first * PAGE, first * PAGE, count)
    flags = uapi.KVM_TDX_MEASURE_MEMORY_REGION if measure else 0
    while region.nr_pages:
        try:
            await vcpu.tdx_init_mem_region(region, flags)
        except KvmError as e:
            if e.errno != uapi.EINTR:
                raise


async def finalize(vm: Any) -> None:
    """KVM_TDX_FINALIZE_VM, tried again while the TDX module is busy."""
    for tries in range(1, FINALIZE_TRIES + 1):
        try:
            await vm.tdx_finalize_vm()
            return
        except KvmError as e:
            if e.errno != uapi.EBUSY or tries == FINALIZE_TRIES:
                raise


async def launch_update(vm: Any, src: int, first: int, count: int) -> None:
    """KVM_SEV_SNP_LAUNCH_UPDATE of gfns [first, first + count) from `src`, until len is 0."""
    update = uapi.SevSnpLaunchUpdate(first, src + first * PAGE, count * PAGE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    while update.len:
        await vm.snp_launch_update(update)


async def launch_finish(vm: Any) -> None:
    """KVM_SEV_SNP_LAUNCH_FINISH."""
    await vm.snp_launch_finish()


async def close(gmem: Any) -> None:
    """close() of the guest_memfd."""
    await gmem.close()


async def host_write(kvm: Any, hva: int, first: int, count: int) -> None:
    """The VMM stores to pages [first, first + count) of its mapping at `hva`."""
    await kvm.mm.write(hva + first * PAGE, b"\x5e" * (count * PAGE))


async def host_read(kvm: Any, hva: int, first: int, count: int) -> None:
    """The VMM loads pages [first, first + count) of its mapping at `hva`."""
    await kvm.mm.read(hva + first * PAGE, count * PAGE)


async def convert(gmem: Any, first: int, count: int, private: bool) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd: file pages [first, first + count) private or
    shared, in place (design gmem-inplace-conversion)."""
    attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
    await gmem.set_memory_attributes2(uapi.MemoryAttributes2(first * PAGE, count * PAGE, attrs))


async def image(kvm: Any, pages: int) -> int:
    """A source image in the VMM's memory: page i filled with byte i + 1."""
    src = await kvm.mm.mmap(pages * PAGE)
    await kvm.mm.write(src, b"".join(bytes([i + 1]) * PAGE for i in range(pages)))
    return int(src)
