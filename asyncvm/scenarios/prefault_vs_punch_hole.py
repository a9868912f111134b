"""Pre-fault of private memory racing a guest_memfd PUNCH_HOLE (the README's default campaign)."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.uapi import PAGE_SIZE

from .common import pages_param, pre_fault, private_vm, spawn_vcpus, vcpus_param


@asyncvm.scenario(
    name="prefault_vs_punch_hole", params={"vcpus": vcpus_param(2), "pages": pages_param(16), "hole": pages_param(4)}
)
async def prefault_vs_punch_hole(kvm: Any, vcpus: int = 2, pages: int = 16, hole: int = 4) -> None:
    """vCPUs pre-fault a private guest_memfd slot while userspace punches a hole in it.

    Hunts: a fault that resolved a folio before the punch installing it after the truncate (the
    mmu_invalidate_seq / in_progress protocol must make it retry). Watched by the sequence rule
    (stale_install), stale_spte / mapped_freed_pfn at invalidate end and at quiescence, and
    begin/end balance.
    """
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, pages)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    start = max(0, pages // 2 - hole // 2)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, start * PAGE_SIZE, hole * PAGE_SIZE)

    async def vcpu_work(v: Any) -> None:
        # Fault the hole first: the race is there, the rest of the slot only adds steps.
        await pre_fault(v, start * PAGE_SIZE, (pages - start) * PAGE_SIZE)
        await pre_fault(v, 0, start * PAGE_SIZE) if start else None

    async with asyncvm.TaskGroup() as tg:
        spawn_vcpus(tg, vcpu_work, cpus)
        tg.spawn(punch, name="punch_hole")
