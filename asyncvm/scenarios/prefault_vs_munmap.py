"""Pre-fault of shared memory racing the host dropping the pages (MMU notifier)."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.explore.params import Param
from asyncvm.uapi import PAGE_SIZE

from .common import pages_param, pre_fault, shared_vm, spawn_vcpus, vcpus_param


@asyncvm.scenario(
    name="prefault_vs_munmap",
    params={
        "vcpus": vcpus_param(2),
        "pages": pages_param(16),
        "zap": pages_param(4),
        "advice": Param("dontneed", choices=("dontneed", "munmap")),
    },
)
async def prefault_vs_munmap(kvm: Any, vcpus: int = 2, pages: int = 16, zap: int = 4, advice: str = "dontneed") -> None:
    """vCPUs pre-fault a default VM's memslot while the VMM drops some of its pages.

    `advice` "dontneed" uses madvise(MADV_DONTNEED) twice over overlapping ranges (two overlapping
    notifier windows); "munmap" unmaps the range. Hunts: a GUP'd pfn installed after the host
    freed it (notifier invalidate_range_start/end and the retry check). Watched by stale_install,
    mapped_freed_pfn and stale_spte, and mn_active_invalidate_count balance.
    """
    vm, hva = await shared_vm(kvm, pages)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    start = max(0, pages // 2 - zap // 2)

    async def drop(first: int) -> None:
        if advice == "munmap":
            await kvm.mm.munmap(hva + first * PAGE_SIZE, zap * PAGE_SIZE)
        else:
            await kvm.mm.madvise(hva + first * PAGE_SIZE, zap * PAGE_SIZE, uapi.MADV_DONTNEED)

    async def vcpu_work(v: Any) -> None:
        # Fault the dropped range first: the race is there.
        lo = max(0, start - zap // 2)
        await pre_fault(v, lo * PAGE_SIZE, (pages - lo) * PAGE_SIZE, (uapi.EFAULT,))
        if lo:
            await pre_fault(v, 0, lo * PAGE_SIZE, (uapi.EFAULT,))

    async with asyncvm.TaskGroup() as tg:
        spawn_vcpus(tg, vcpu_work, cpus)
        tg.spawn(drop, start, name="mmu_notifier")
        if advice != "munmap":
            tg.spawn(drop, max(0, start - zap // 2), name="mmu_notifier2")
