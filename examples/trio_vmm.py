"""The same toy VMM on trio: one nursery task per vCPU pre-faulting while userspace punches a hole.

python examples/trio_vmm.py
"""

from __future__ import annotations

import trio
from asyncio_vmm import PAGE, PAGES, pre_fault  # type: ignore[import-not-found]

import asyncvm
from asyncvm import uapi


async def race(vcpus: int = 2) -> int:
    kvm = asyncvm.Kvm()
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = await vm.create_guest_memfd(size=PAGES * PAGE)
    hva = kvm.mm.mmap(PAGES * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGES * PAGE, hva, 0, gmem)
    )
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGES * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    async with trio.open_nursery() as nursery:
        for v in cpus:
            nursery.start_soon(pre_fault, v, 0, PAGES * PAGE)
        nursery.start_soon(gmem.fallocate, uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, 4 * PAGE)
    # Live mode has no executor to call them at the end: run the quiescence oracles by hand.
    vm.oracles.at_quiescence()
    return vm.mmu_invalidate_seq


if __name__ == "__main__":
    print("invalidation sequence after the race:", trio.run(race))
