"""The x86 arch layer generic KVM calls into (the model's ``kvm_x86_ops`` plus x86.c/mmu.c hooks).

Generic code (``asyncvm/kvm``) never reaches into the MMU or a vendor; it calls these methods.
Vendors (TDX, SEV-SNP) subclass this and override the hooks they implement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..kvm.invalidate import (
    KVM_FILTER_PRIVATE,
    KVM_FILTER_SHARED,
    GfnRange,
    Invalidation,
    kvm_mmu_invalidate_range_add,
)
from ..runtime import traps
from .mmu.tdp_mmu import PAGES, TdpMmu, align

if TYPE_CHECKING:
    from ..host.pages import Folio
    from ..kvm.memslots import Memslot
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm
    from .mmu.tdp_mmu import Leaf, Root


class X86Arch:
    """x86 with a TDP MMU: the default and SW-protected VM types."""

    has_mirrored_tdp = False
    #: the tdp_enabled module parameter (False: shadow paging, where pre-fault is unsupported)
    tdp_enabled = True
    #: KVM_X86_QUIRK_SLOT_ZAP_ALL (default on): memslot deletion on a default VM zaps everything
    slot_zap_all_quirk = True

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.mmu = TdpMmu(vm)
        self._pre_fault_allowed = False

    # -- VM lifecycle --------------------------------------------------------------------
    def vm_init(self, vm: Vm) -> None:
        """x86.c: kvm_arch_init_vm(): pre-fault is allowed at once for default and SW-protected VMs."""
        self._pre_fault_allowed = vm.type in (uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM)

    def pre_fault_allowed(self, vm: Vm) -> bool:
        return self._pre_fault_allowed

    def has_private_mem(self, vm: Vm) -> bool:
        """kvm_arch_has_private_mem()"""
        return vm.type in (uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM)

    def gfn_direct_bits(self, vm: Vm) -> int:
        """kvm_gfn_direct_bits(): the TDX shared bit as a gfn mask; 0 elsewhere."""
        return 0

    def is_gfn_alias(self, vm: Vm, gfn: int) -> bool:
        """kvm_is_gfn_alias()"""
        bits = self.gfn_direct_bits(vm)
        return bool(bits and gfn & bits)

    def private_max_mapping_level(self, vm: Vm) -> int:
        """guest_memfd reports max_order 0 in mainline: private memory maps 4K."""
        return 1

    def guest_access_is_private(self, vm: Vm, access: Any) -> bool:
        """How the guest reaches a gpa: SW-protected VMs fault per the current attribute."""
        return vm.type != uapi.KVM_X86_DEFAULT_VM and vm.mem_is_private(access.gpa >> 12)

    def check_guest_access(self, vm: Vm, folio: Folio, pfn: int, private: bool) -> None:
        """Vendor checks on a guest access that reached a pfn (RMP, S-EPT state)."""

    async def before_guest_access(self, vcpu: Vcpu, gfn: int, private: bool) -> None:
        """What the guest does before touching a page (a TD accepts PENDING pages)."""

    def vcpu_unlocked_ioctls(self) -> frozenset[str]:
        """Vendor vCPU sub-commands run before vcpu->mutex (kvm_arch_vcpu_unlocked_ioctl())."""
        return frozenset()

    def vcpu_pre_run(self, vcpu: Vcpu) -> int:
        """0 if KVM_RUN may enter the guest, else -errno."""
        return 0

    def at_quiescence(self, vm: Vm) -> None:
        """Vendor oracles that look at the final state (S-EPT coherence, RMP)."""

    def vcpu_precreate(self, vm: Vm) -> int:
        return 0

    def vcpu_create(self, vcpu: Vcpu) -> None:
        from .mmu.mmu import VcpuMmu

        vcpu.arch = VcpuMmu(vcpu)

    # -- invalidation hooks ----------------------------------------------------------------
    async def unmap_gfn_range(self, vm: Vm, rng: GfnRange) -> bool:
        """mmu.c: kvm_unmap_gfn_range() (6.8+): zap TDP MMU leaves per the filter."""
        return await self.mmu.unmap_gfn_range(rng.start, rng.end, rng.attr_filter, rng.may_block)

    def flush_remote_tlbs(self, vm: Vm) -> None:
        traps.emit("tlb_flush", vm)

    async def flush_shadow_memslot(self, vm: Vm, slot: Memslot) -> None:
        """x86.c: kvm_arch_flush_shadow_memslot(): zap-all-fast (default VM quirk) or the slot's range."""
        if vm.type == uapi.KVM_X86_DEFAULT_VM and self.slot_zap_all_quirk:
            await self.kvm_mmu_zap_all_fast(vm)
        else:
            await self.kvm_mmu_zap_memslot(vm, slot)

    async def kvm_mmu_zap_memslot(self, vm: Vm, slot: Memslot) -> None:
        """mmu.c: kvm_mmu_zap_memslot(): unmap the slot's gfns, private and shared, under write lock."""
        await vm.mmu_lock.write_lock()
        try:
            rng = GfnRange(slot.base_gfn, slot.end_gfn, slot, KVM_FILTER_PRIVATE | KVM_FILTER_SHARED, True)
            if await self.unmap_gfn_range(vm, rng):
                self.flush_remote_tlbs(vm)
        finally:
            await vm.mmu_lock.write_unlock()

    async def kvm_mmu_zap_all_fast(self, vm: Vm) -> None:
        """mmu.c: kvm_mmu_zap_all_fast(): invalidate the direct roots, kick vCPUs, zap them shared."""
        await vm.mmu_lock.write_lock()
        try:
            self.mmu.mmu_valid_gen += 1
            self.mmu.invalidate_roots(mirror=False)
            for vcpu in vm.vcpus.values():
                vcpu.make_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        finally:
            await vm.mmu_lock.write_unlock()
        await vm.mmu_lock.read_lock()
        try:
            await self.mmu.zap_invalidated_roots()
        finally:
            await vm.mmu_lock.read_unlock()

    async def pre_set_memory_attributes(self, vm: Vm, inv: Invalidation, rng: GfnRange, attributes: int) -> bool:
        """mmu.c: kvm_arch_pre_set_memory_attributes(): widen to partial hugepages, zap the old kind."""
        slot = rng.slot
        for level in (2, 3):
            span = PAGES[level]
            for edge in (rng.start, rng.end - 1):
                base = align(edge, level)
                if slot is not None and base >= slot.base_gfn and base + span <= slot.end_gfn:
                    if not (rng.start <= base and base + span <= rng.end):
                        kvm_mmu_invalidate_range_add(vm, inv, base, base + span)
        to_private = bool(attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        flt = KVM_FILTER_SHARED if to_private else KVM_FILTER_PRIVATE
        return await self.unmap_gfn_range(vm, GfnRange(rng.start, rng.end, slot, flt, True))

    async def post_set_memory_attributes(self, vm: Vm, rng: GfnRange, attributes: int) -> None:
        """mmu.c: kvm_arch_post_set_memory_attributes(): the model derives "mixed" from the
        attribute map itself when a fault sizes its mapping, so there is no lpage_info to update."""
        await traps.point(vm.mmu_lock)

    # -- guest_memfd hooks -------------------------------------------------------------------
    async def gmem_prepare(self, vm: Vm, pfn: int, gfn: int, order: int) -> int:
        """kvm_arch_gmem_prepare(): nothing to do outside SEV-SNP."""
        return 0

    def gmem_free_folio_hook(self, vm: Vm) -> Callable[[Folio], None] | None:
        """kvm_arch_gmem_invalidate() on free_folio: nothing outside SEV-SNP."""
        return None

    # -- mirror (S-EPT) hooks: only TDX has mirror roots ---------------------------------------
    async def set_external_spte_present(
        self, mmu: TdpMmu, root: Root, level: int, base: int, old: Any, new: Any
    ) -> bool:
        raise NotImplementedError("mirror roots exist only for TDX")

    async def remove_external_spte(self, mmu: TdpMmu, root: Root, level: int, lo: int, hi: int, leaf: Leaf) -> None:
        raise NotImplementedError("mirror roots exist only for TDX")
