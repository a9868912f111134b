"""KVM_PRE_FAULT_MEMORY on x86: kvm_arch_vcpu_pre_fault_memory() and kvm_tdp_map_page()
(arch/x86/kvm/mmu/mmu.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import uapi
from ...kvm.trace import WARN
from ...runtime import hb
from ...runtime.sync import cond_resched, signal_pending, spin_wait
from ...uapi import PAGE_SHIFT
from .fault import (
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRIVATE_ACCESS,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
    kvm_is_gfn_alias,
    kvm_mmu_do_page_fault,
)
from .tdp_mmu import PAGES

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu


async def kvm_tdp_map_page(vcpu: Vcpu, gpa: int, error_code: int, *, v2: bool = False) -> tuple[int, int]:
    """mmu.c: kvm_tdp_map_page(): returns (0 or -errno, level).

    `v2` (design map-memory-v2, the KVM_MAP_MEMORY RFC v2 of April 2024): no retry loop in the
    kernel, RET_PF_RETRY goes back to userspace as -EAGAIN and RET_PF_EMULATE as -EINVAL.

    [~6.18] (prefault_checks_before_each_attempt): signal_pending() -> -EINTR,
    KVM_REQ_VM_DEAD -> -EIO and cond_resched() before every attempt. [6.11] form: the first
    attempt runs at once; after RET_PF_RETRY only signal_pending() is checked, then
    cond_resched() (lore: "[PATCH] KVM: x86: Implement kvm_arch_vcpu_pre_fault_memory()").
    A task spinning on RET_PF_RETRY waits here for another task to change what the attempt
    read (an invalidation to end, a FROZEN SPTE to settle): re-checking unchanged state would
    only stutter (runtime/sync.py: spin_wait).
    """
    vm = vcpu.vm
    if not vcpu.arch.mmu.tdp_enabled():
        return -uapi.EOPNOTSUPP, 0
    each_attempt = vm.profile.prefault_checks_before_each_attempt
    retrying = False
    while True:
        if each_attempt or retrying:
            if signal_pending():
                return -uapi.EINTR, 0
            if each_attempt and (vcpu.check_request("KVM_REQ_VM_DEAD") or vm.dead):
                return -uapi.EIO, 0
            if not retrying:
                await cond_resched()
        seen = vm.mmu_word.version
        r, level = await kvm_mmu_do_page_fault(vcpu, gpa, error_code, prefetch=True)
        if r != RET_PF_RETRY:
            break
        if v2:
            return -uapi.EAGAIN, level
        retrying = True
        await spin_wait(vm.mmu_word, seen)
    if r < 0:
        return r, level
    if r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
        return 0, level
    if r == RET_PF_EMULATE:
        return (-uapi.EINVAL if v2 else -uapi.ENOENT), level
    WARN(vm, f"kvm_tdp_map_page: unexpected RET_PF {r}")
    return -uapi.EIO, level


async def kvm_arch_vcpu_pre_fault_memory(vcpu: Vcpu, gpa: int, size: int) -> int:
    """mmu.c: kvm_arch_vcpu_pre_fault_memory() (6.18): bytes covered (> 0) or -errno; [design
    map-memory-v2] x86.c: kvm_arch_vcpu_map_memory() of the RFC v2."""
    vm = vcpu.vm
    # A plain load in the kernel, racing the launch that sets it (the writers' smp_wmb() makes a
    # stale false harmless): counted as marked, ordering nothing.
    if hb.ACTIVE:
        hb.access(hb.READ_ONCE, "pre_fault_allowed", vm)
    if not vm.arch.pre_fault_allowed:
        return -uapi.EOPNOTSUPP
    gfn = gpa >> PAGE_SHIFT
    if vm.profile.prefault_rejects_alias and kvm_is_gfn_alias(vm, gfn):
        return -uapi.EINVAL
    r = await vcpu.arch.mmu.kvm_mmu_reload()
    if r:
        return r
    error_code = PFERR_GUEST_FINAL_MASK
    direct_bits = 0
    if vm.arch.has_private_mem and vm.mem_is_private(gfn):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct_bits = vm.arch.gfn_direct_bits << PAGE_SHIFT
    r, level = await kvm_tdp_map_page(vcpu, gpa | direct_bits, error_code, v2=vm.profile.map_memory_v2)
    if r < 0:
        return r
    span = PAGES[max(level, 1)] << PAGE_SHIFT
    end = (gpa & ~(span - 1)) + span
    if vm.profile.map_memory_v2:
        # [design map-memory-v2] the RFC v2 moved the struct to the end of the mapping it made, not
        # clamped to the size asked (a reviewer asked for the min()): a huge page overshoots
        return end - gpa
    return min(size, end - gpa)
