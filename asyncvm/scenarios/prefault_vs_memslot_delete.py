"""Pre-fault racing the deletion (and re-creation) of the memslot it maps."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.explore.known import Known
from asyncvm.uapi import PAGE_SIZE

from .common import pages_param, pre_fault, shared_vm, spawn_vcpus, vcpus_param

#: [6.10] KVM_PRE_FAULT_MEMORY (new in 6.10) has neither fix yet, so its retry loop can spin
#: until a signal: the hang this scenario hunts, reported as the known behaviour there.
KNOWN_6_10 = Known(
    ("hang", "livelock"),
    "kvm_tdp_map_page() retries RET_PF_RETRY forever: through an obsolete root that kvm_mmu_reload() "
    "does not free, or on a KVM_MEMSLOT_INVALID slot while the deletion waits in synchronize_srcu()",
    "arch/x86/kvm/mmu/mmu.c: kvm_tdp_map_page(), arch/x86/kvm/mmu.h: kvm_mmu_reload(); fixed by "
    '"KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()" [~6.15] and "Return -EAGAIN '
    'during prefault if userspace concurrently deletes/moves the relevant memslot" [~6.18]',
)


@asyncvm.scenario(
    name="prefault_vs_memslot_delete",
    params={"vcpus": vcpus_param(1), "pages": pages_param(8), "vm_type": "default"},
    known={"6.10": KNOWN_6_10},
)
async def prefault_vs_memslot_delete(kvm: Any, vcpus: int = 1, pages: int = 8, vm_type: str = "default") -> None:
    """A vCPU pre-faults while userspace deletes the slot, then re-creates it; the vCPU retries.

    Hunts: the pre-fault/synchronize_srcu hang fixed by -EAGAIN on an INVALID slot [~6.18], and
    faults through obsolete roots after the default VM's zap-all (kvm_mmu_reload must free them
    [~6.15]). Watched by the deadlock and livelock oracles, memslot lifetime (memslot_uaf) and
    the stale-mapping oracles. Under profile 6.10, which has neither fix, the hang is reported as
    that kernel's known behaviour (with its kernel reference), not as a new finding.
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
