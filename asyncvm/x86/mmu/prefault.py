"""KVM_PRE_FAULT_MEMORY on x86: kvm_arch_vcpu_pre_fault_memory() and kvm_tdp_map_page()
(arch/x86/kvm/mmu/mmu.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import uapi
from ...runtime.sync import cond_resched, might_sleep, need_resched, signal_pending
from ...uapi import PAGE_SHIFT
from .fault import (
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRIVATE_ACCESS,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
    kvm_mmu_do_page_fault,
)
from .tdp_mmu import PAGES

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu


async def cond_resched_if_needed() -> None:
    """kernel/sched/core.c: __cond_resched() as the pre-fault loops call it: the task reschedules
    only when need_resched() is set (a recorded draw), after the unconditional might_resched check.

    The runtime's cond_resched() always yields, and a yield sends the task below every other one
    under PCT; at the pre-fault's per-page and per-attempt cond_resched() that would let any
    concurrent invalidation run to completion between two pages and hide every race inside one
    page's fault window. A spinning RET_PF_RETRY loop still yields as soon as need_resched() fires.
    """
    might_sleep("cond_resched()")
    if need_resched():
        await cond_resched()


async def kvm_tdp_map_page(vcpu: Vcpu, gpa: int, error_code: int) -> tuple[int, int]:
    """mmu.c: kvm_tdp_map_page() (6.18 loop; 6.11 form per profile): returns (0 or -errno, level)."""
    vm = vcpu.vm
    if not vcpu.arch.tdp_enabled():
        return -uapi.EOPNOTSUPP, 0
    each_attempt = vm.profile.prefault_checks_before_each_attempt
    first = True
    while True:
        if each_attempt or not first:
            if signal_pending():
                return -uapi.EINTR, 0
            if vcpu.check_request("KVM_REQ_VM_DEAD") or vm.dead:
                return -uapi.EIO, 0
            await cond_resched_if_needed()
        first = False
        r, level = await kvm_mmu_do_page_fault(vcpu, gpa, error_code, prefetch=True)
        if r != RET_PF_RETRY:
            break
    if r < 0:
        return r, level
    if r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
        return 0, level
    if r == RET_PF_EMULATE:
        return -uapi.ENOENT, level
    vm.oracles.warn(f"kvm_tdp_map_page: unexpected RET_PF {r}")
    return -uapi.EIO, level


async def kvm_arch_vcpu_pre_fault_memory(vcpu: Vcpu, gpa: int, size: int) -> int:
    """mmu.c: kvm_arch_vcpu_pre_fault_memory() (6.18): bytes covered (> 0) or -errno."""
    vm = vcpu.vm
    if not vm.arch.pre_fault_allowed(vm):
        return -uapi.EOPNOTSUPP
    gfn = gpa >> PAGE_SHIFT
    if vm.profile.prefault_rejects_alias and vm.arch.is_gfn_alias(vm, gfn):
        return -uapi.EINVAL
    r = await vcpu.arch.kvm_mmu_reload()
    if r:
        return r
    error_code = PFERR_GUEST_FINAL_MASK
    direct_bits = 0
    if vm.arch.has_private_mem(vm) and vm.mem_is_private(gfn):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct_bits = vm.arch.gfn_direct_bits(vm) << PAGE_SHIFT
    r, level = await kvm_tdp_map_page(vcpu, gpa | direct_bits, error_code)
    if r < 0:
        return r
    span = PAGES[max(level, 1)] << PAGE_SHIFT
    end = (gpa & ~(span - 1)) + span
    return min(size, end - gpa)
