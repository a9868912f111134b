"""Guest faults on one memslot racing the deletion of another: the default VM's zap-all invalidates
every root under the fault's feet."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.uapi import PAGE_SIZE

from .common import pages_param, run_guest, shared_vm, spawn_vcpus, vcpus_param


@asyncvm.scenario(
    name="fault_vs_zap_all",
    params={"vcpus": vcpus_param(1), "pages": pages_param(8)},
)
async def fault_vs_zap_all(kvm: Any, vcpus: int = 1, pages: int = 8) -> None:
    """vCPUs run a guest reading slot 1 while userspace deletes and re-creates slot 0 of a default VM.

    Deleting slot 0 runs kvm_mmu_zap_all_fast() (KVM_X86_QUIRK_SLOT_ZAP_ALL): every root turns
    invalid while a fault of slot 1, which the deletion does not wait for, may hold a pfn and wait
    for mmu_lock. Hunts installs into an invalid root (is_page_fault_stale() must see it obsolete)
    and vCPUs stuck on an obsolete root (KVM_RUN frees it through KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    which KVM_PRE_FAULT_MEMORY's retry loop does not). Watched by install_invalid_root and the
    shadow-page link checks (check/tdp_mmu.py), the stale-mapping oracles and the hang oracles.
    """
    vm, hva0 = await shared_vm(kvm, pages)
    hva1 = await kvm.mm.mmap(pages * PAGE_SIZE)
    base1 = pages * PAGE_SIZE
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(1, 0, base1, pages * PAGE_SIZE, hva1))
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    slot0 = uapi.UserspaceMemoryRegion2(0, 0, 0, pages * PAGE_SIZE, hva0)

    async def vcpu_work(v: Any) -> None:
        await run_guest(v, [GuestAccess.read(base1 + i * PAGE_SIZE) for i in range(pages)])

    async def delete_and_recreate() -> None:
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, hva0))
        await vm.set_user_memory_region2(slot0)

    async with asyncvm.TaskGroup() as tg:
        spawn_vcpus(tg, vcpu_work, cpus)
        tg.spawn(delete_and_recreate, name="memslot_update")
