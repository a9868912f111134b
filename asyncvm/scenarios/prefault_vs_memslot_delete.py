"""Pre-fault racing the deletion (and re-creation) of the memslot it maps."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.uapi import PAGE_SIZE

from .common import pre_fault, shared_vm, spawn_vcpus


@asyncvm.scenario(name="prefault_vs_memslot_delete", params={"vcpus": 1, "pages": 8, "vm_type": "default"})
async def prefault_vs_memslot_delete(kvm: Any, vcpus: int = 1, pages: int = 8, vm_type: str = "default") -> None:
    """A vCPU pre-faults while userspace deletes the slot, then re-creates it; the vCPU retries.

    Hunts: the pre-fault/synchronize_srcu hang fixed by -EAGAIN on an INVALID slot [~6.18], and
    faults through obsolete roots after the default VM's zap-all (kvm_mmu_reload must free them
    [~6.15]). Watched by the deadlock and livelock oracles, memslot lifetime (memslot_uaf) and
    the stale-mapping oracles.
    """
    vm, hva = await shared_vm(kvm, pages)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    region = uapi.UserspaceMemoryRegion2(0, 0, 0, pages * PAGE_SIZE, hva)
    recreated = asyncvm.runtime.Completion("slot_recreated")

    async def vcpu_work(v: Any) -> None:
        r = await pre_fault(v, 0, pages * PAGE_SIZE, tolerate=(uapi.EAGAIN, uapi.ENOENT))
        if r:
            await recreated.wait_shared()
            assert await pre_fault(v, 0, pages * PAGE_SIZE) == 0, "pre-fault after re-creation must succeed"

    async def delete_and_recreate() -> None:
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, hva))
        await vm.set_user_memory_region2(region)
        await recreated.complete_all()

    async with asyncvm.TaskGroup() as tg:
        spawn_vcpus(tg, vcpu_work, cpus)
        tg.spawn(delete_and_recreate, name="memslot_update")
