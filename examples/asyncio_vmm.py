"""A toy VMM that boots a SW-protected guest on the emulated /dev/kvm (live mode).

It does what a real VMM does around guest_memfd: a private memory slot, KVM_PRE_FAULT_MEMORY
from one task per vCPU, the guest writing and reading its memory, and a balloon-style PUNCH_HOLE
after which the guest sees zeros. Nothing here is controlled by asyncvm's scheduler: the event
loop (asyncio by default, or trio) decides the interleavings, exactly as it would around the
real ioctls.

    python examples/asyncio_vmm.py [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse

import anyio

import asyncvm
from asyncvm import GuestAccess, uapi
from asyncvm.kvm.guest_memfd import GuestMemfd
from asyncvm.kvm.vcpu import Vcpu
from asyncvm.kvm.vm import Vm

PAGES = 16
PAGE = uapi.PAGE_SIZE


async def pre_fault(vcpu: Vcpu, gpa: int, size: int) -> None:
    r = uapi.PreFaultMemory(gpa, size)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except asyncvm.KvmError as e:
            if e.errno != uapi.EINTR:
                raise


async def create_private_vm(vcpus: int) -> tuple[Vm, GuestMemfd, list[Vcpu]]:
    """A SW-protected VM whose only memslot is PAGES of private guest_memfd memory, and its vCPUs."""
    kvm = asyncvm.Kvm()
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = await vm.create_guest_memfd(size=PAGES * PAGE)
    hva = kvm.mm.mmap(PAGES * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGES * PAGE, hva, 0, gmem)
    )
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGES * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return vm, gmem, [await vm.create_vcpu(i) for i in range(vcpus)]


async def boot(vcpus: int = 2) -> list[bytes]:
    _vm, gmem, cpus = await create_private_vm(vcpus)
    per = PAGES // vcpus
    async with anyio.create_task_group() as tg:
        for i, v in enumerate(cpus):
            tg.start_soon(pre_fault, v, i * per * PAGE, per * PAGE)

    guest = cpus[0]
    guest.load_program([GuestAccess.write(0, b"hello, guest"), GuestAccess.read(0, 12)])
    before = await guest.run()
    # Balloon the first page out; the guest's next access faults in a fresh, zeroed page.
    await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)
    guest.load_program([GuestAccess.read(0, 12)])
    after = await guest.run()
    return before + after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Boot a toy guest on the emulated /dev/kvm.")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    reads = anyio.run(boot, backend=args.backend)
    print("before punch:", reads[0], "after punch:", reads[1])


if __name__ == "__main__":
    main()
