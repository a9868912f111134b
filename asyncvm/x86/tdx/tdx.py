"""KVM's TDX back end: TD and vCPU state machines, the TDX ioctls, the mirror-root S-EPT hooks and
the populate callback (arch/x86/kvm/vmx/tdx.c).

Profile "T16" (6.16-6.18, the default): ``kvm_tdp_map_page()`` maps the mirror SPTE and the leaf
hook only counts the page in ``nr_premapped``; ``tdx_gmem_post_populate()`` then does PAGE.ADD
(and MR.EXTEND) outside mmu_lock, and FINALIZE refuses while pages are still premapped. Profile
"T19" (6.19+): PAGE.ADD happens inside the leaf hook from ``page_add_src`` while the mirror SPTE is
frozen, and the state-changing ioctls take "all the locks".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import uapi
from ...host.pages import Folio
from ...kvm.guest_memfd import kvm_gmem_populate
from ...runtime import traps
from ...runtime.failures import Violation
from ...runtime.sync import WRITE, cond_resched, fatal_signal_pending, signal_pending, spin_yield
from ...uapi import PAGE_SHIFT, PAGE_SIZE, KvmError
from ..mmu.tdp_mmu import FROZEN, PAGES, TABLE, Leaf, Root, TdpMmu
from ..x86 import X86Arch
from .module import (
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EXTENDMR_CHUNKSIZE,
    TDX_OPERAND_ID_RCX,
    TdxModule,
    is_busy,
)

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu
    from ...kvm.vm import Vm

TD_STATE_UNINITIALIZED = "UNINITIALIZED"
TD_STATE_INITIALIZED = "INITIALIZED"
TD_STATE_RUNNABLE = "RUNNABLE"
VCPU_TD_STATE_UNINITIALIZED = "UNINITIALIZED"
VCPU_TD_STATE_INITIALIZED = "INITIALIZED"

#: GPAW 48: the shared bit is GPA bit 47
TDX_SHARED_BIT_GPAW48 = 47


class TdxArch(X86Arch):
    """``struct kvm_tdx`` plus the TDX entries of ``vt_x86_ops``."""

    has_mirrored_tdp = True

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm)
        self.state = TD_STATE_UNINITIALIZED
        self.hkid_assigned = False
        self.nr_premapped = 0
        self.shared_bit = 0
        self.page_add_src: bytes | None = None
        self.wait_for_sept_zap = False
        self.hw_error = 0
        self.module = TdxModule(vm)
        vm.tdx_module = self.module  # type: ignore[attr-defined]
        #: gfns INIT_MEM_REGION added, in order (for the "added exactly once" oracle)
        self.populated: list[int] = []
        #: (task, gfn) tdx_gmem_post_populate() is mapping right now (oracle bookkeeping, not KVM state)
        self.populating: tuple[Any, int] | None = None

    # -- generic hooks ----------------------------------------------------------------------
    def vm_init(self, vm: Vm) -> None:
        self._pre_fault_allowed = False

    def gfn_direct_bits(self, vm: Vm) -> int:
        return 1 << (self.shared_bit - PAGE_SHIFT) if self.shared_bit else 0

    def guest_access_is_private(self, vm: Vm, access: Any) -> bool:
        return not (self.shared_bit and access.gpa >> self.shared_bit & 1)

    def vcpu_precreate(self, vm: Vm) -> int:
        """tdx.c: tdx_vcpu_create(): vCPUs only while the TD is INITIALIZED."""
        return -uapi.EIO if self.state != TD_STATE_INITIALIZED else 0

    def vcpu_create(self, vcpu: Vcpu) -> None:
        super().vcpu_create(vcpu)
        vcpu.tdx_state = VCPU_TD_STATE_UNINITIALIZED  # type: ignore[attr-defined]

    def vcpu_pre_run(self, vcpu: Vcpu) -> int:
        """tdx.c: tdx_vcpu_pre_run(): KVM_RUN is refused until the vCPU and the TD are ready."""
        if self.state != TD_STATE_RUNNABLE or vcpu.tdx_state != VCPU_TD_STATE_INITIALIZED:  # type: ignore[attr-defined]
            return -uapi.EINVAL
        return 0

    def gmem_free_folio_hook(self, vm: Vm) -> Callable[[Folio], None] | None:
        module = self.module

        def on_free(folio: Folio) -> None:
            if vm.dead:
                return  # after a KVM_BUG the leak is the kernel's accepted outcome; kvm_bug reports it
            for gfn, leaf in module.sept.items():
                if folio.contains(leaf.pfn):
                    raise Violation(
                        "tdx_freed_page",
                        f"pfn {leaf.pfn:#x} freed while the S-EPT still maps gfn {gfn:#x} ({leaf.state})",
                        signature="tdx_freed_page:free",
                        gfn=gfn,
                    )

        return on_free

    async def before_guest_access(self, vcpu: Vcpu, gfn: int, private: bool) -> None:
        """A TD guest accepts a PENDING page before touching it (TDG.MEM.PAGE.ACCEPT)."""
        while self.wait_for_sept_zap:
            await cond_resched()  # tdx_vcpu_run() refuses to enter while a zap kicked the vCPUs
        leaf = self.module.sept.get(gfn)
        if private and leaf is not None and leaf.state == "PENDING":
            await self.module.guest_accept(gfn)

    # -- the ioctl guards ----------------------------------------------------------------------
    def _t19(self) -> bool:
        return self.vm.profile.tdx_flow == "T19"

    def vcpu_unlocked_ioctls(self) -> frozenset[str]:
        """[T19] tdx_vcpu_unlocked_ioctl(): INIT_VCPU and INIT_MEM_REGION take "all the locks"
        themselves, so they run before kvm_vcpu_ioctl() would take the caller's vcpu->mutex."""
        return frozenset({"tdx_init_vcpu", "tdx_init_mem_region"}) if self._t19() else frozenset()

    async def _lock_state(self, vcpu: Vcpu | None) -> list[Any]:
        """[T16] kvm->lock (VM ioctls; vCPU commands hold only their vcpu->mutex); [T19]
        tdx.c: tdx_acquire_vm_state_locks(): kvm->lock, -EBUSY while a vCPU creation is in flight,
        kvm_lock_all_vcpus() (killable: -EINTR), then kvm->slots_lock."""
        vm = self.vm
        taken: list[Any] = []
        if self._t19():
            try:
                await vm.lock.lock()
                taken.append(vm.lock)
                if vm.created_vcpus != vm.online_vcpus:
                    raise KvmError(uapi.EBUSY, "a vCPU is being created")
                for v in sorted(vm.vcpus.values(), key=lambda v: v.vcpu_id):
                    if fatal_signal_pending():
                        raise KvmError(uapi.EINTR, "killed in kvm_lock_all_vcpus()")
                    await v.mutex.lock()
                    taken.append(v.mutex)
                await vm.slots_lock.lock()
                taken.append(vm.slots_lock)
            except BaseException:
                await self._unlock_state(taken)
                raise
        elif vcpu is None:
            await vm.lock.lock()
            taken.append(vm.lock)
        return taken

    async def _unlock_state(self, taken: list[Any], vcpu: Vcpu | None = None) -> None:
        for lock in reversed(taken):
            await lock.unlock()

    # -- KVM_TDX_INIT_VM --------------------------------------------------------------------
    async def tdx_init_vm(self, params: uapi.TdxInitVm | None, flags: int) -> None:
        """tdx.c: tdx_td_init() (errno order of kvm-coco.md 1.4, the parts the model carries)."""
        vm = self.vm
        taken = await self._lock_state(None)
        try:
            if self.state != TD_STATE_UNINITIALIZED:
                raise KvmError(uapi.EINVAL, "TD already initialized")
            if flags:
                raise KvmError(uapi.EINVAL, "flags must be 0")
            params = params or uapi.TdxInitVm()
            if params.cpuid.nent > uapi.KVM_MAX_CPUID_ENTRIES:
                raise KvmError(uapi.E2BIG, "too many CPUID entries")
            if any(params.reserved):
                raise KvmError(uapi.EINVAL, "reserved bytes must be 0")
            if vm.created_vcpus:
                raise KvmError(uapi.EBUSY, "vCPUs exist")
            for seamcall in (self.module.tdh_mng_create, self.module.tdh_mng_init):
                err = await seamcall()
                if err:
                    self.hw_error = err
                    raise KvmError(uapi.EIO, f"{seamcall.__name__} failed: {err:#x}")
            self.hkid_assigned = True
            self.shared_bit = TDX_SHARED_BIT_GPAW48
            self.state = TD_STATE_INITIALIZED
            if "prefault_allowed_before_finalize" in vm.bugs:
                self._pre_fault_allowed = True
            traps.emit("tdx_state", vm, state=self.state)
        finally:
            await self._unlock_state(taken)

    # -- KVM_TDX_INIT_VCPU --------------------------------------------------------------------
    def _vcpu_gate(self) -> None:
        """tdx_vcpu_ioctl(): no HKID or a RUNNABLE TD -> -EINVAL for every vCPU sub-command."""
        if not self.hkid_assigned or self.state == TD_STATE_RUNNABLE:
            raise KvmError(uapi.EINVAL, "TD is not being built")

    async def tdx_init_vcpu(self, vcpu: Vcpu, data: int, flags: int) -> None:
        """tdx.c: tdx_vcpu_init() (T19: TDH.VP.INIT under mmu_lock held for write)."""
        vm = self.vm
        taken = await self._lock_state(vcpu)
        try:
            self._vcpu_gate()
            if flags:
                raise KvmError(uapi.EINVAL, "flags must be 0")
            if vcpu.tdx_state != VCPU_TD_STATE_UNINITIALIZED:  # type: ignore[attr-defined]
                raise KvmError(uapi.EINVAL, "vCPU already initialized")
            err = await self.module.tdh_vp_create()
            if not err:
                if self._t19():
                    await vm.mmu_lock.write_lock()
                try:
                    err = await self.module.tdh_vp_init()
                finally:
                    if self._t19():
                        await vm.mmu_lock.write_unlock()
            if err:
                vm.kvm_bug(f"TDX_BUG_ON: TDH.VP.CREATE/INIT failed {err:#x}")
                raise KvmError(uapi.EIO, "TDH.VP.INIT failed")
            vcpu.tdx_state = VCPU_TD_STATE_INITIALIZED  # type: ignore[attr-defined]
        finally:
            await self._unlock_state(taken, vcpu)

    # -- KVM_TDX_INIT_MEM_REGION -------------------------------------------------------------
    async def tdx_init_mem_region(self, vcpu: Vcpu, region: uapi.TdxInitMemRegion, flags: int) -> None:
        """tdx.c: tdx_vcpu_init_mem_region() (6.16+): one page per kvm_gmem_populate() call; the
        struct is written back (advanced past the pages done) even on error."""
        vm = self.vm
        taken = await self._lock_state(vcpu)
        try:
            self._vcpu_gate()
            if vcpu.tdx_state != VCPU_TD_STATE_INITIALIZED:  # type: ignore[attr-defined]
                raise KvmError(uapi.EINVAL, "vCPU not initialized")
            if flags & ~uapi.KVM_TDX_MEASURE_MEMORY_REGION:
                raise KvmError(uapi.EINVAL, "unknown flags")
            end = region.gpa + region.nr_pages * PAGE_SIZE
            if (
                region.source_addr % PAGE_SIZE
                or region.gpa % PAGE_SIZE
                or region.nr_pages == 0
                or end <= region.gpa
                or end > uapi.U64_MAX
                or not self._is_private_gpa(region.gpa)
                or not self._is_private_gpa(end - 1)
            ):
                raise KvmError(uapi.EINVAL, "bad source_addr/gpa/nr_pages")
            if not self._t19():
                await vm.slots_lock.lock()
            try:
                r = await vcpu.arch.kvm_mmu_reload()
                ret = r
                while not ret and region.nr_pages:
                    if signal_pending():
                        ret = -uapi.EINTR
                        break
                    gfn = region.gpa >> PAGE_SHIFT
                    got = await kvm_gmem_populate(
                        vm, gfn, region.source_addr, 1, self.tdx_gmem_post_populate, (vcpu, flags)
                    )
                    if got < 0:
                        ret = got
                        break
                    if got != 1:
                        ret = -uapi.EIO
                        break
                    self.populated.append(gfn)
                    region.source_addr += PAGE_SIZE
                    region.gpa += PAGE_SIZE
                    region.nr_pages -= 1
                    await cond_resched()
            finally:
                if not self._t19():
                    await vm.slots_lock.unlock()
            if ret:
                raise KvmError(-ret, "KVM_TDX_INIT_MEM_REGION")
        finally:
            await self._unlock_state(taken, vcpu)

    def _is_private_gpa(self, gpa: int) -> bool:
        return not (gpa >> self.shared_bit) & 1

    async def tdx_gmem_post_populate(self, vm: Vm, gfn: int, pfn: int, src: int | None, order: int, opaque: Any) -> int:
        """tdx.c: tdx_gmem_post_populate() ([T16]: map, PAGE.ADD outside mmu_lock; [T19]: ADD in the hook)."""
        vcpu, flags = opaque
        if src is None:
            return -uapi.EINVAL
        try:
            src_folio, src_pfn = await vm.kvm.mm.get_user_page(src)
        except KvmError as e:
            return -(e.errno or uapi.EFAULT)
        try:
            source = src_folio.read_page(src_pfn - src_folio.pfn)
            gpa = gfn << PAGE_SHIFT
            if self._t19():
                if self.page_add_src is not None:
                    vm.kvm_bug("KVM_BUG_ON: page_add_src already set")
                    return -uapi.EIO
                self.page_add_src = source
                self.populating = (traps.current(), gfn)
                try:
                    r = await self.kvm_tdp_mmu_map_private_pfn(vcpu, gfn, pfn)
                finally:
                    self.page_add_src = None
                    self.populating = None
                if r:
                    return r
            else:
                from ..mmu.fault import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS
                from ..mmu.prefault import kvm_tdp_map_page

                self.populating = (traps.current(), gfn)
                try:
                    r, _level = await kvm_tdp_map_page(vcpu, gpa, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS)
                finally:
                    self.populating = None
                if r < 0:
                    return r
                err = await self.module.tdh_mem_page_add(gfn, pfn, source)
                if err:
                    return -uapi.EBUSY if is_busy(err) else -uapi.EIO
                self.nr_premapped -= 1
                if self.nr_premapped < 0:
                    vm.kvm_bug("KVM_BUG_ON: nr_premapped underflow in post_populate")
                    return -uapi.EIO
            if flags & uapi.KVM_TDX_MEASURE_MEMORY_REGION:
                for off in range(0, PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
                    err = await self.module.tdh_mr_extend(gpa + off)
                    if err:
                        vm.kvm_bug(f"TDX_BUG_ON: TDH.MR.EXTEND failed {err:#x}")
                        return -uapi.EIO
            return 0
        finally:
            vm.kvm.allocator.put(src_folio)

    async def kvm_tdp_mmu_map_private_pfn(self, vcpu: Vcpu, gfn: int, pfn: int) -> int:
        """mmu.c: kvm_tdp_mmu_map_private_pfn() (6.19): a prefetch fault for exactly this pfn at 4K."""
        from ..mmu.fault import (
            PFERR_GUEST_FINAL_MASK,
            PFERR_PRIVATE_ACCESS,
            RET_PF_FIXED,
            RET_PF_RETRY,
            KvmPageFault,
            kvm_tdp_mmu_map,
        )

        vm = self.vm
        r = await vcpu.arch.kvm_mmu_reload()
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
                mmu_seq=vm.mmu_invalidate_seq,
                snapshot_clock=vm.oracles.clock,
            )
            await vm.mmu_lock.read_lock()
            try:
                r = await kvm_tdp_mmu_map(vcpu, fault)
            finally:
                await vm.mmu_lock.read_unlock()
            if r != RET_PF_RETRY:
                break
        return 0 if r == RET_PF_FIXED else -uapi.EIO

    # -- KVM_TDX_FINALIZE_VM ----------------------------------------------------------------
    async def tdx_finalize_vm(self, flags: int) -> None:
        """tdx.c: tdx_td_finalize(): RUNNABLE, then (smp_wmb) pre_fault_allowed."""
        vm = self.vm
        taken = await self._lock_state(None)
        try:
            if not self._t19():
                await vm.slots_lock.lock()
            try:
                if not self.hkid_assigned or self.state == TD_STATE_RUNNABLE:
                    raise KvmError(uapi.EINVAL, "TD not initialized or already finalized")
                if flags:
                    raise KvmError(uapi.EINVAL, "flags must be 0")
                if not self._t19() and self.nr_premapped:
                    raise KvmError(uapi.EINVAL, f"{self.nr_premapped} pages premapped without PAGE.ADD")
                err = await self.module.tdh_mr_finalize()
                self.hw_error = err
                if err:
                    if is_busy(err):
                        raise KvmError(uapi.EBUSY, "TDH.MR.FINALIZE busy")
                    vm.kvm_bug(f"TDX_BUG_ON: TDH.MR.FINALIZE failed {err:#x}")
                    raise KvmError(uapi.EIO, "TDH.MR.FINALIZE failed")
                self.state = TD_STATE_RUNNABLE
                await traps.point(vm)  # smp_wmb(): RUNNABLE is visible before pre_fault_allowed
                self._pre_fault_allowed = True
                self.module.vcpus_in_guest = True
                traps.emit("tdx_state", vm, state=self.state)
            finally:
                if not self._t19():
                    await vm.slots_lock.unlock()
        finally:
            await self._unlock_state(taken)

    async def tdx_get_cpuid(self, vcpu: Vcpu, cpuid: uapi.Cpuid2) -> None:
        """tdx.c: tdx_vcpu_get_cpuid(): gated like the other vCPU sub-commands."""
        self._vcpu_gate()
        needed = 2
        if cpuid.nent < needed:
            cpuid.nent = needed
            raise KvmError(uapi.E2BIG, "nent too small")
        cpuid.nent = needed
        await traps.point(self.module)

    # -- mirror root hooks ------------------------------------------------------------------
    async def set_external_spte_present(
        self, mmu: TdpMmu, root: Root, level: int, base: int, old: Any, new: Any
    ) -> bool:
        """tdp_mmu.c: set_external_spte_present(): freeze, run the hook, then write new or restore old."""
        vm = self.vm
        if old is not None:
            vm.kvm_bug("KVM_BUG_ON: present -> present change of a mirror SPTE")
            return False
        span = PAGES[level]
        root.levels[level].assign(base, base + span, FROZEN)
        traps.emit("spte", vm, root=root.name, level=level, gfn=base, old="none", new="FROZEN_SPTE")
        if new is TABLE:
            r = await self.link_external_spt(base, level)
        else:
            r = await self.set_external_spte(base, level, new)
        if r:
            root.levels[level].clear(base, base + span)
            traps.emit("spte", vm, root=root.name, level=level, gfn=base, old="FROZEN_SPTE", new="none")
            return False
        mmu.handle_changed_spte(root, level, base, old, new, shared=True)
        root.levels[level].assign(base, base + span, new)
        return True

    async def link_external_spt(self, gfn: int, level: int) -> int:
        """tdx.c: tdx_sept_link_private_spt() -> TDH.MEM.SEPT.ADD."""
        err = await self.module.tdh_mem_sept_add(gfn, level)
        if err:
            if is_busy(err):
                return -uapi.EBUSY
            self.vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.SEPT.ADD failed {err:#x}")
            return -uapi.EIO
        return 0

    async def set_external_spte(self, gfn: int, level: int, leaf: Leaf) -> int:
        """tdx.c: tdx_sept_set_private_spte(): AUG when RUNNABLE; else [T16] premap, [T19] PAGE.ADD."""
        vm = self.vm
        if level != 1:
            vm.kvm_bug("KVM_BUG_ON: private mapping above 4K")
            return -uapi.EIO
        pfn = leaf.pfn(gfn)
        await traps.point(vm)  # smp_rmb(): read the state, then pre_fault_allowed
        if self.state == TD_STATE_RUNNABLE:
            err = await self.module.tdh_mem_page_aug(gfn, pfn)
            if err:
                if is_busy(err):
                    return -uapi.EBUSY
                vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.PAGE.AUG failed {err:#x}")
                return -uapi.EIO
            return 0
        if self.populating != (traps.current(), gfn):
            # Oracle (kvm-coco.md 0.6, 5.3): before FINALIZE the only producer of private leaves
            # is INIT_MEM_REGION; anything else (a pre-fault, a guest fault) leaves a mirror leaf
            # that never gets PAGE.ADD. Checked ahead of the kernel's own backstops below, which
            # would otherwise only say that *something* went wrong.
            raise Violation(
                "tdx_premapped",
                f"private leaf for gfn {gfn:#x} installed before FINALIZE outside KVM_TDX_INIT_MEM_REGION",
                signature="tdx_premapped:not_populate",
                gfn=gfn,
            )
        if self._pre_fault_allowed:
            vm.kvm_bug("KVM_BUG_ON: pre_fault_allowed before the TD is RUNNABLE")
            return -uapi.EIO
        if not self._t19():
            self.nr_premapped += 1
            traps.emit("tdx_premap", vm, gfn=gfn, nr_premapped=self.nr_premapped)
            return 0
        if self.page_add_src is None:
            vm.kvm_bug("KVM_BUG_ON: S-EPT leaf before finalization without page_add_src")
            return -uapi.EIO
        err = await self.module.tdh_mem_page_add(gfn, pfn, self.page_add_src)
        if err:
            if is_busy(err):
                return -uapi.EBUSY
            vm.kvm_bug(f"TDX_BUG_ON: TDH.MEM.PAGE.ADD failed {err:#x}")
            return -uapi.EIO
        return 0

    async def remove_external_spte(self, mmu: TdpMmu, root: Root, level: int, lo: int, hi: int, leaf: Leaf) -> None:
        """tdx.c: tdx_sept_remove_private_spte(): BLOCK -> TRACK -> REMOVE -> WBINVD under mmu_lock write."""
        vm = self.vm
        if not vm.mmu_lock.held_by_current(WRITE):
            vm.kvm_bug("KVM_BUG_ON: S-EPT removal without mmu_lock held for write")
            return
        if level != 1:
            vm.kvm_bug("KVM_BUG_ON: private mapping above 4K")
            return
        for gfn in range(lo, hi):
            if root.get(1, gfn) is None:
                continue
            await self._remove_one(gfn)
            mmu.handle_changed_spte(root, 1, gfn, leaf, None, shared=False)
            root.levels[1].clear(gfn, gfn + 1)

    async def _remove_one(self, gfn: int) -> None:
        vm = self.vm
        module = self.module
        if not self.hkid_assigned:
            vm.kvm_bug("KVM_BUG_ON: S-EPT removal without an HKID")
            return
        err = await self._no_vcpus(lambda: module.tdh_mem_range_block(gfn))
        if (
            not self._t19()
            and self.state != TD_STATE_RUNNABLE
            and err == TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
        ):
            if gfn not in module.sept:
                # tdx_is_sept_zap_err_due_to_premap(): never PAGE.ADDed, only premapped
                self.nr_premapped -= 1
                if self.nr_premapped < 0:
                    vm.kvm_bug("KVM_BUG_ON: nr_premapped underflow in the zap path")
                return
        if err:
            vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.RANGE.BLOCK failed {err:#x}")
            return
        if self.state == TD_STATE_RUNNABLE:
            err = await self._no_vcpus(module.tdh_mem_track)
            if err:
                vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.TRACK failed {err:#x}")
                return
        pfn = module.sept[gfn].pfn
        err = await self._no_vcpus(lambda: module.tdh_mem_page_remove(gfn))
        if err:
            vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed {err:#x}")
            return
        err = await module.tdh_phymem_page_wbinvd(pfn)
        if err:
            vm.kvm_bug(f"KVM_BUG_ON: TDH.PHYMEM.PAGE.WBINVD failed {err:#x}")

    async def _no_vcpus(self, seamcall: Callable[[], Any]) -> int:
        """tdx.c: tdh_do_no_vcpus(): on BUSY kick every vCPU out of the guest and retry exactly once."""
        err: int = await seamcall()
        if is_busy(err):
            self.wait_for_sept_zap = True
            in_guest = self.module.vcpus_in_guest
            # kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE): IPI every vCPU and spin until
            # each has left guest mode, i.e. finished the guest instruction it was executing.
            self.module.vcpus_in_guest = False
            traps.emit("tdx_kick_vcpus", self.vm)
            while self.module.guest_in_flight:
                await spin_yield()
            try:
                err = await seamcall()
            finally:
                self.module.vcpus_in_guest = in_guest
                self.wait_for_sept_zap = False
        return err

    # -- oracles ------------------------------------------------------------------------------
    def at_quiescence(self, vm: Vm) -> None:
        """Mirror/S-EPT coherence, nr_premapped, and every page INIT_MEM_REGION reported in the image
        (a GPA added twice is caught at the PAGE.ADD, module.py: tdh_mem_page_add())."""
        if self.nr_premapped < 0:
            raise Violation("tdx_premapped", f"nr_premapped is {self.nr_premapped}", signature="tdx_premapped:negative")
        if self.state == TD_STATE_RUNNABLE and not self._t19() and self.nr_premapped:
            raise Violation(
                "tdx_premapped", f"{self.nr_premapped} pages premapped after FINALIZE", signature="tdx_premapped:final"
            )
        mirror: dict[int, int] = {}
        for root in self.mmu.roots:
            if root.is_mirror and not root.invalid:
                for s, e, leaf in root.leaves(0, 1 << 52):
                    for gfn in range(s, e):
                        mirror[gfn] = leaf.pfn(gfn)
        sept = {gfn: leaf.pfn for gfn, leaf in self.module.sept.items()}
        premapped = [g for g in mirror if g not in sept]
        if not self._t19() and len(premapped) < self.nr_premapped:
            # Quiescent: no populate is between its map and its PAGE.ADD, so the counter must be
            # exactly the number of mirror leaves still waiting for PAGE.ADD (a failed ADD leaves
            # one behind and counted; a zap of one uncounts it).
            raise Violation(
                "tdx_premapped",
                f"nr_premapped is {self.nr_premapped} but only {len(premapped)} mirror leaves lack an S-EPT leaf",
                signature="tdx_premapped:drift",
            )
        if len(premapped) > max(self.nr_premapped, 0) or (self._t19() and premapped):
            raise Violation(
                "sept_incoherent",
                f"mirror SPTEs without an S-EPT leaf: {[hex(g) for g in premapped[:4]]} "
                f"(nr_premapped={self.nr_premapped})",
                signature="sept_incoherent:mirror_only",
            )
        orphans = [g for g in sept if g not in mirror]
        if orphans:
            raise Violation(
                "sept_incoherent",
                f"S-EPT leaves without a mirror SPTE: {[hex(g) for g in orphans[:4]]}",
                signature="sept_incoherent:sept_only",
            )
        for gfn, pfn in sept.items():
            if mirror[gfn] != pfn:
                raise Violation(
                    "sept_incoherent",
                    f"gfn {gfn:#x}: mirror maps pfn {mirror[gfn]:#x}, S-EPT {pfn:#x}",
                    signature="sept_incoherent:pfn",
                )
        added = self.module.added_pages
        if self.state == TD_STATE_RUNNABLE and set(self.populated) - set(added):
            raise Violation(
                "tdx_missing_add",
                "INIT_MEM_REGION reported pages that were never PAGE.ADDed before FINALIZE",
                signature="tdx_missing_add",
            )
