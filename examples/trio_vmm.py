"""The toy VMM racing: one task per vCPU pre-faulting while userspace punches a hole (trio by
default, or asyncio), then the quiescence oracles run by hand.

    python examples/trio_vmm.py [--backend trio|asyncio]
"""

from __future__ import annotations

import argparse

import anyio
from asyncio_vmm import PAGE, PAGES, create_private_vm, pre_fault

from asyncvm import uapi
from asyncvm.check import check_quiescent


async def race(vcpus: int = 2) -> int:
    vm, gmem, cpus = await create_private_vm(vcpus)
    async with anyio.create_task_group() as tg:
        for v in cpus:
            tg.start_soon(pre_fault, v, 0, PAGES * PAGE)
        tg.start_soon(gmem.fallocate, uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, 4 * PAGE)
    # Live mode has no executor to call them at the end: run the quiescence oracles by hand.
    check_quiescent(vm)
    return vm.mmu_invalidate_seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Race pre-faults against a PUNCH_HOLE, live.")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="trio")
    args = parser.parse_args(argv)
    print("invalidation sequence after the race:", anyio.run(race, backend=args.backend))


if __name__ == "__main__":
    main()
