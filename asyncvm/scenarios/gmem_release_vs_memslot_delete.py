"""The last guest_memfd reference going away while userspace deletes the memslot bound to it."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.uapi import PAGE_SIZE

from .common import pre_fault, private_vm


@asyncvm.scenario(name="gmem_release_vs_memslot_delete", params={"pages": 4})
async def gmem_release_vs_memslot_delete(kvm: Any, pages: int = 4) -> None:
    """close(guest_memfd) racing KVM_SET_USER_MEMORY_REGION2(delete) after the guest faulted pages.

    Hunts: kvm_gmem_release() and kvm_gmem_unbind() both clearing the binding (slots_lock and the
    invalidate lock order them), a fault using a released file or a freed slot. Watched by
    memslot_uaf, lockdep (slots_lock -> invalidate_lock -> mmu_lock), balance and stale mappings.
    """
    vm, gmem, hva = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, pages)
    vcpu = await vm.create_vcpu(0)
    await pre_fault(vcpu, 0, pages * PAGE_SIZE)

    async def release() -> None:
        await gmem.close()

    async def delete() -> None:
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, hva, 0, gmem))

    async def fault_again() -> None:
        await pre_fault(vcpu, 0, pages * PAGE_SIZE, tolerate=(uapi.EFAULT, uapi.EAGAIN, uapi.ENOENT))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(release, name="gmem_close")
        tg.spawn(delete, name="memslot_delete")
        tg.spawn(fault_again, name="vcpu0")
