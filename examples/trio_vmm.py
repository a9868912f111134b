"""The same toy VMM on trio: one nursery task per vCPU pre-faulting while userspace punches a hole.

python examples/trio_vmm.py
"""

from __future__ import annotations

import trio
from asyncio_vmm import PAGE, PAGES, create_private_vm, pre_fault  # type: ignore[import-not-found]

from asyncvm import uapi
from asyncvm.check import check_quiescent


async def race(vcpus: int = 2) -> int:
    vm, gmem, cpus = await create_private_vm(vcpus)
    async with trio.open_nursery() as nursery:
        for v in cpus:
            nursery.start_soon(pre_fault, v, 0, PAGES * PAGE)
        nursery.start_soon(gmem.fallocate, uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, 4 * PAGE)
    # Live mode has no executor to call them at the end: run the quiescence oracles by hand.
    check_quiescent(vm)
    return vm.mmu_invalidate_seq


if __name__ == "__main__":
    print("invalidation sequence after the race:", trio.run(race))
