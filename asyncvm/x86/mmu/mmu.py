"""The per-vCPU MMU: the loaded roots, kvm_mmu_reload() and obsolete-root handling
(arch/x86/kvm/mmu/mmu.c, mmu.h)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import uapi
from ...runtime.sync import alloc_fails
from .tdp_mmu import Root

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu


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
        return self.vcpu.vm.arch.tdp_enabled and not self.guest_mode

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
