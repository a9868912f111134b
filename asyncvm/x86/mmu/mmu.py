"""The per-vCPU MMU: the loaded roots, kvm_mmu_reload() and obsolete-root handling
(arch/x86/kvm/mmu/mmu.c, mmu.h)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import uapi
from ...kvm.invalidate import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED, GfnRange, kvm_mmu_invalidate_range_add
from ...runtime import traps
from ...runtime.lockdep import lockdep_assert_held_write
from ...runtime.sync import alloc_fails, cond_resched, signal_pending
from ...uapi import PAGE_SHIFT
from .fault import (
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRIVATE_ACCESS,
    RET_PF_FIXED,
    RET_PF_RETRY,
    KvmPageFault,
    kvm_mmu_fault_snapshot,
    kvm_tdp_mmu_map,
)
from .tdp_mmu import PAGES, Root, align

if TYPE_CHECKING:
    from ...kvm.memslots import Memslot
    from ...kvm.vcpu import Vcpu
    from ...kvm.vm import Vm


class VcpuMmu:
    """``vcpu->arch.mmu`` with a TDP MMU: ``root.hpa`` and, for TDX, ``mirror_root_hpa``."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.root: Root | None = None
        self.mirror_root: Root | None = None
        self.as_id = 0
        #: the vCPU runs L2 with nested EPT/NPT: vcpu->arch.mmu is the shadow guest_mmu
        self.guest_mode = False

    def tdp_enabled(self) -> bool:
        """vcpu->arch.mmu->page_fault == kvm_tdp_page_fault"""
        return bool(self.vcpu.vm.arch.tdp_enabled) and not self.guest_mode

    def root_for(self, is_private: bool) -> Root | None:
        """tdp_mmu.h: tdp_mmu_get_root_for_fault(): mirror for private faults of a TD."""
        if is_private and self.vcpu.vm.arch.has_mirrored_tdp:
            return self.mirror_root
        return self.root

    async def kvm_mmu_reload(self) -> int:
        """mmu.h: kvm_mmu_reload() ([~6.15] frees obsolete roots first): 0 or -errno."""
        vcpu = self.vcpu
        if vcpu.vm.profile.mmu_reload_frees_obsolete_roots and vcpu.check_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"):
            await self.kvm_mmu_free_obsolete_roots()
        if self.root is not None and (self.mirror_root is not None or not vcpu.vm.arch.has_mirrored_tdp):
            return 0
        return await self.kvm_mmu_load()

    async def kvm_mmu_load(self) -> int:
        """mmu.c: kvm_mmu_load() -> mmu_alloc_direct_roots() (roots allocated under mmu_lock read)."""
        vm = self.vcpu.vm
        if alloc_fails("mmu_topup_memory_caches"):
            return -uapi.ENOMEM
        await vm.mmu_lock.read_lock()
        try:
            if vm.arch.has_mirrored_tdp and self.mirror_root is None:
                self.mirror_root = vm.arch.mmu.alloc_root(self.as_id, True)
            if self.root is None:
                self.root = vm.arch.mmu.alloc_root(self.as_id, False)
        finally:
            await vm.mmu_lock.read_unlock()
        return 0

    async def kvm_mmu_free_obsolete_roots(self) -> None:
        """mmu.c: kvm_mmu_free_obsolete_roots(): drop this vCPU's reference on invalid roots."""
        vm = self.vcpu.vm
        await vm.mmu_lock.read_lock()
        try:
            if self.root is not None and self.root.invalid:
                vm.arch.mmu.put_root(self.root)
                self.root = None
            if self.mirror_root is not None and self.mirror_root.invalid:
                vm.arch.mmu.put_root(self.mirror_root)
                self.mirror_root = None
        finally:
            await vm.mmu_lock.read_unlock()

    async def kvm_mmu_unload(self) -> None:
        """mmu.c: kvm_mmu_unload(): put both roots (vCPU teardown)."""
        vm = self.vcpu.vm
        await vm.mmu_lock.read_lock()
        try:
            for root in (self.root, self.mirror_root):
                if root is not None:
                    vm.arch.mmu.put_root(root)
            self.root = self.mirror_root = None
        finally:
            await vm.mmu_lock.read_unlock()


# -- the invalidation hooks generic KVM calls ------------------------------------------------------
async def kvm_unmap_gfn_range(vm: Vm, range: GfnRange) -> bool:
    """mmu.c: kvm_unmap_gfn_range() (6.8+): zap TDP MMU leaves per the range's filter."""
    return await vm.arch.mmu.unmap_gfn_range(range.start, range.end, range.attr_filter, range.may_block)


async def kvm_arch_flush_shadow_memslot(vm: Vm, slot: Memslot) -> None:
    """x86.c: kvm_arch_flush_shadow_memslot(): zap-all-fast (default VM quirk) or the slot's range."""
    if vm.type == uapi.KVM_X86_DEFAULT_VM and vm.arch.slot_zap_all_quirk:
        await kvm_mmu_zap_all_fast(vm)
    else:
        await kvm_mmu_zap_memslot(vm, slot)


async def kvm_mmu_zap_memslot(vm: Vm, slot: Memslot) -> None:
    """mmu.c: kvm_mmu_zap_memslot(): unmap the slot's gfns, private and shared, under write lock."""
    await vm.mmu_lock.write_lock()
    try:
        rng = GfnRange(slot.base_gfn, slot.end_gfn, slot, KVM_FILTER_PRIVATE | KVM_FILTER_SHARED, True)
        if await kvm_unmap_gfn_range(vm, rng):
            vm.ops.flush_remote_tlbs(vm)
    finally:
        await vm.mmu_lock.write_unlock()


async def kvm_mmu_zap_all_fast(vm: Vm) -> None:
    """mmu.c: kvm_mmu_zap_all_fast(): invalidate the direct roots, kick vCPUs, zap them shared."""
    await vm.mmu_lock.write_lock()
    try:
        vm.arch.mmu.mmu_valid_gen += 1
        vm.arch.mmu.invalidate_roots(mirror=False)
        for vcpu in vm.vcpus.values():
            vcpu.make_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
    finally:
        await vm.mmu_lock.write_unlock()
    await vm.mmu_lock.read_lock()
    try:
        await vm.arch.mmu.zap_invalidated_roots()
    finally:
        await vm.mmu_lock.read_unlock()


async def kvm_arch_pre_set_memory_attributes(vm: Vm, range: GfnRange) -> bool:
    """mmu.c: kvm_arch_pre_set_memory_attributes(): widen to partial hugepages, zap the old kind."""
    slot = range.slot
    for level in (2, 3):
        span = PAGES[level]
        for edge in (range.start, range.end - 1):
            base = align(edge, level)
            if slot is not None and base >= slot.base_gfn and base + span <= slot.end_gfn:
                if not (range.start <= base and base + span <= range.end):
                    kvm_mmu_invalidate_range_add(vm, base, base + span)
    to_private = bool(range.attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    flt = KVM_FILTER_SHARED if to_private else KVM_FILTER_PRIVATE
    return await kvm_unmap_gfn_range(vm, GfnRange(range.start, range.end, slot, flt, True, range.attributes))


async def kvm_arch_post_set_memory_attributes(vm: Vm, range: GfnRange) -> None:
    """mmu.c: kvm_arch_post_set_memory_attributes(): the model derives "mixed" from the
    attribute map itself when a fault sizes its mapping, so there is no lpage_info to update."""
    lockdep_assert_held_write(vm.mmu_lock)
    await traps.point(vm.mmu_lock)


async def kvm_tdp_mmu_map_private_pfn(vcpu: Vcpu, gfn: int, pfn: int) -> int:
    """mmu.c: kvm_tdp_mmu_map_private_pfn() (6.19): a prefetch fault for exactly this pfn at 4K."""
    vm = vcpu.vm
    r = await vcpu.arch.mmu.kvm_mmu_reload()
    if r:
        return r
    slot = vm.gfn_to_memslot(gfn)
    while True:
        if signal_pending():
            return -uapi.EINTR
        if vm.dead:
            return -uapi.EIO
        await cond_resched()
        fault = KvmPageFault(
            addr=gfn << PAGE_SHIFT,
            error_code=PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS,
            prefetch=True,
            gfn=gfn,
            slot=slot,
            is_private=True,
            write=False,
            max_level=1,
            pfn=pfn,
        )
        kvm_mmu_fault_snapshot(vcpu, fault)
        await vm.mmu_lock.read_lock()
        try:
            r = await kvm_tdp_mmu_map(vcpu, fault)
        finally:
            await vm.mmu_lock.read_unlock()
        if r != RET_PF_RETRY:
            break
    return 0 if r == RET_PF_FIXED else -uapi.EIO
