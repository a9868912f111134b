"""KVM's TDX back end: TD and vCPU state machines, the TDX ioctls, the S-EPT hooks of the mirror
root and the populate callback (arch/x86/kvm/vmx/tdx.c).

Profile "T16" (6.16-6.18, the default): ``kvm_tdp_map_page()`` maps the mirror SPTE and the leaf
hook only counts the page in ``nr_premapped``; ``tdx_gmem_post_populate()`` then does PAGE.ADD
(and MR.EXTEND) outside mmu_lock, and FINALIZE refuses while pages are still premapped. Profile
"T19" (6.19+): PAGE.ADD happens inside the leaf hook from ``page_add_src`` while the mirror SPTE is
frozen, and the state-changing ioctls take "all the locks".

The TD's state is ``struct kvm_tdx`` (:class:`KvmTdx`, ``to_kvm_tdx(vm)``) and each vCPU's is
``struct vcpu_tdx`` (:class:`VcpuTdx`, ``to_tdx(vcpu)``); ``vmx.py`` puts these functions in
``vt_x86_ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import uapi
from ...kvm.guest_memfd import kvm_gmem_populate
from ...kvm.trace import trace_kvm_gmem_populate, trace_kvm_gmem_populated
from ...runtime import hb, traps
from ...runtime.lockdep import lockdep_assert_held_write
from ...runtime.sync import cond_resched, fatal_signal_pending, signal_pending, spin_wait
from ...uapi import PAGE_SHIFT, PAGE_SIZE, KvmError
from ..mmu.fault import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS
from ..mmu.mmu import kvm_tdp_mmu_map_private_pfn
from ..mmu.prefault import kvm_tdp_map_page
from ..mmu.tdp_mmu import Leaf
from ..trace import trace_tdx_init_mem_region_page, trace_tdx_sept_set_private_spte
from .module import (
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EXTENDMR_CHUNKSIZE,
    TDX_OPERAND_ID_RCX,
    TdxModule,
    describe,
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


class KvmTdx:
    """``struct kvm_tdx``: the TD's build state and its TDX module."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.state = TD_STATE_UNINITIALIZED
        self.hkid_assigned = False
        self.nr_premapped = 0
        self.page_add_src: bytes | None = None
        #: [design tdx-init-mem-region-vcpu0] ``kvm_tdx->source_pa``: the source page (and whether to
        #: measure it) that INIT_MEM_REGION leaves for the S-EPT hook to PAGE.ADD from
        self.source_pa: tuple[bytes, bool] | None = None
        self.wait_for_sept_zap = False
        self.module = TdxModule(vm)


class VcpuTdx:
    """``struct vcpu_tdx``: the vCPU's TD state."""

    def __init__(self) -> None:
        self.state = VCPU_TD_STATE_UNINITIALIZED


def to_kvm_tdx(vm: Vm) -> KvmTdx:
    """tdx.h: to_kvm_tdx()"""
    tdx = vm.arch.vendor
    assert isinstance(tdx, KvmTdx), f"{vm} is not a TD"
    return tdx


def to_tdx(vcpu: Vcpu) -> VcpuTdx:
    """tdx.h: to_tdx()"""
    tdx = vcpu.arch.vendor
    assert isinstance(tdx, VcpuTdx), f"{vcpu} is not a TD vCPU"
    return tdx


def is_td(vm: Vm) -> bool:
    """x86.h: is_td()"""
    return vm.type == uapi.KVM_X86_TDX_VM


def _t19(vm: Vm) -> bool:
    return vm.profile.tdx_flow == "T19"


def tdx_is_private_gpa(vm: Vm, gpa: int) -> bool:
    """tdx.c: tdx_is_private_gpa(): the shared bit is clear."""
    return not (gpa >> PAGE_SHIFT) & vm.arch.gfn_direct_bits


# -- the vendor hooks -------------------------------------------------------------------------
def tdx_vm_init(vm: Vm) -> KvmTdx:
    """tdx.c: tdx_vm_init(): pre-fault stays off until FINALIZE."""
    vm.arch.pre_fault_allowed = False
    return KvmTdx(vm)


def tdx_vcpu_precreate(vm: Vm) -> int:
    """tdx.c: tdx_vcpu_create(): vCPUs only while the TD is INITIALIZED (checked before the
    vCPU counts as created)."""
    return -uapi.EIO if to_kvm_tdx(vm).state != TD_STATE_INITIALIZED else 0


def tdx_vcpu_create(vcpu: Vcpu) -> VcpuTdx:
    """tdx.c: tdx_vcpu_create()"""
    return VcpuTdx()


def tdx_vcpu_pre_run(vcpu: Vcpu) -> int:
    """tdx.c: tdx_vcpu_pre_run(): KVM_RUN is refused until the vCPU and the TD are ready."""
    if to_kvm_tdx(vcpu.vm).state != TD_STATE_RUNNABLE or to_tdx(vcpu).state != VCPU_TD_STATE_INITIALIZED:
        return -uapi.EINVAL
    return 0


async def tdx_guest_before_access(vcpu: Vcpu, gfn: int, private: bool) -> None:
    """A TD guest accepts a PENDING page before touching it (TDG.MEM.PAGE.ACCEPT)."""
    kvm_tdx = to_kvm_tdx(vcpu.vm)
    while kvm_tdx.wait_for_sept_zap:
        # tdx_vcpu_run() refuses to enter while a zap kicked the vCPUs: wait for it to end.
        await spin_wait(vcpu.vm.mmu_word, vcpu.vm.mmu_word.version)
    leaf = kvm_tdx.module.sept.get(gfn)
    if private and leaf is not None and leaf.state == "PENDING":
        await kvm_tdx.module.guest_accept(gfn)


# -- the ioctl guards ---------------------------------------------------------------------------
async def tdx_acquire_vm_state_locks(vm: Vm, vcpu: Vcpu | None) -> list[Any]:
    """[T16] kvm->lock (VM ioctls; vCPU commands hold only their vcpu->mutex); [T19]
    tdx.c: tdx_acquire_vm_state_locks(): kvm->lock, -EBUSY while a vCPU creation is in flight,
    kvm_lock_all_vcpus() (killable: -EINTR), then kvm->slots_lock."""
    taken: list[Any] = []
    if _t19(vm):
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
            await tdx_release_vm_state_locks(taken)
            raise
    elif vcpu is None:
        await vm.lock.lock()
        taken.append(vm.lock)
    return taken


async def tdx_release_vm_state_locks(taken: list[Any]) -> None:
    """tdx.c: tdx_release_vm_state_locks()"""
    for lock in reversed(taken):
        await lock.unlock()


# -- KVM_MEMORY_ENCRYPT_OP ------------------------------------------------------------------------
async def tdx_vm_ioctl(vm: Vm, cmd: uapi.TdxCmd, payload: Any) -> None:
    """tdx.c: tdx_vm_ioctl(): the VM sub-commands; hw_error goes back in the command struct."""
    if cmd.id == uapi.KVM_TDX_INIT_VM:
        await tdx_td_init(vm, cmd, payload)
    elif cmd.id == uapi.KVM_TDX_FINALIZE_VM:
        await tdx_td_finalize(vm, cmd)
    else:
        raise KvmError(uapi.EINVAL, f"TDX VM command {cmd.id} is not supported")


async def tdx_vcpu_unlocked_ioctl(vcpu: Vcpu, cmd: uapi.TdxCmd, payload: Any) -> int:
    """[T19] tdx.c: tdx_vcpu_unlocked_ioctl(): INIT_VCPU and INIT_MEM_REGION take "all the locks"
    themselves, so they run before kvm_vcpu_ioctl() would take the caller's vcpu->mutex."""
    if cmd.id == uapi.KVM_TDX_INIT_MEM_REGION and vcpu.vm.profile.tdx_init_mem_region_vcpu0 == "vm-ioctl":
        # [design tdx-init-mem-region-vcpu0-locked] a VM ioctl: no caller vcpu->mutex
        await tdx_init_mem_region(vcpu.vm, payload, cmd.flags)
        return 0
    if not _t19(vcpu.vm) or cmd.id not in (uapi.KVM_TDX_INIT_VCPU, uapi.KVM_TDX_INIT_MEM_REGION):
        return -uapi.ENOIOCTLCMD
    await tdx_vcpu_ioctl(vcpu, cmd, payload)
    return 0


async def tdx_vcpu_ioctl(vcpu: Vcpu, cmd: uapi.TdxCmd, payload: Any) -> None:
    """tdx.c: tdx_vcpu_ioctl(): the vCPU sub-commands."""
    if cmd.id == uapi.KVM_TDX_INIT_VCPU:
        await tdx_vcpu_init(vcpu, cmd.data, cmd.flags)
    elif cmd.id == uapi.KVM_TDX_INIT_MEM_REGION and vcpu.vm.profile.tdx_init_mem_region_vcpu0:
        await tdx_init_mem_region(vcpu.vm, payload, cmd.flags, caller=vcpu)
    elif cmd.id == uapi.KVM_TDX_INIT_MEM_REGION:
        await tdx_vcpu_init_mem_region(vcpu, payload, cmd.flags)
    elif cmd.id == uapi.KVM_TDX_GET_CPUID:
        await tdx_vcpu_get_cpuid(vcpu, payload)
    else:
        raise KvmError(uapi.EINVAL, f"TDX vCPU command {cmd.id} is not supported")


# -- KVM_TDX_INIT_VM --------------------------------------------------------------------------
async def tdx_td_init(vm: Vm, cmd: uapi.TdxCmd, params: uapi.TdxInitVm | None) -> None:
    """tdx.c: tdx_td_init() (errno order of kvm-coco.md 1.4, the parts the model carries)."""
    kvm_tdx = to_kvm_tdx(vm)
    taken = await tdx_acquire_vm_state_locks(vm, None)
    try:
        if kvm_tdx.state != TD_STATE_UNINITIALIZED:
            raise KvmError(uapi.EINVAL, "TD already initialized")
        if cmd.flags:
            raise KvmError(uapi.EINVAL, "flags must be 0")
        params = params or uapi.TdxInitVm()
        if params.cpuid.nent > uapi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(uapi.E2BIG, "too many CPUID entries")
        if any(params.reserved):
            raise KvmError(uapi.EINVAL, "reserved bytes must be 0")
        if vm.created_vcpus:
            raise KvmError(uapi.EBUSY, "vCPUs exist")
        module = kvm_tdx.module
        for seamcall in (module.tdh_mng_create, module.tdh_mng_init):
            err = await seamcall()
            if err:
                cmd.hw_error = err
                raise KvmError(uapi.EIO, f"{seamcall.__name__} failed: {err:#x}")
        kvm_tdx.hkid_assigned = True
        vm.arch.gfn_direct_bits = 1 << (TDX_SHARED_BIT_GPAW48 - PAGE_SHIFT)
        kvm_tdx.state = TD_STATE_INITIALIZED
        if "prefault_allowed_before_finalize" in vm.bugs or vm.profile.prefault_before_finalize:
            vm.arch.pre_fault_allowed = True
        traps.emit("tdx_state", vm, state=kvm_tdx.state)
    finally:
        await tdx_release_vm_state_locks(taken)


# -- KVM_TDX_INIT_VCPU --------------------------------------------------------------------------
def _vcpu_gate(kvm_tdx: KvmTdx) -> None:
    """tdx_vcpu_ioctl(): no HKID or a RUNNABLE TD -> -EINVAL for every vCPU sub-command."""
    if not kvm_tdx.hkid_assigned or kvm_tdx.state == TD_STATE_RUNNABLE:
        raise KvmError(uapi.EINVAL, "TD is not being built")


async def tdx_vcpu_init(vcpu: Vcpu, data: int, flags: int) -> None:
    """tdx.c: tdx_vcpu_init() (T19: TDH.VP.INIT under mmu_lock held for write)."""
    vm = vcpu.vm
    kvm_tdx, tdx = to_kvm_tdx(vm), to_tdx(vcpu)
    taken = await tdx_acquire_vm_state_locks(vm, vcpu)
    try:
        _vcpu_gate(kvm_tdx)
        if flags:
            raise KvmError(uapi.EINVAL, "flags must be 0")
        if tdx.state != VCPU_TD_STATE_UNINITIALIZED:
            raise KvmError(uapi.EINVAL, "vCPU already initialized")
        err = await kvm_tdx.module.tdh_vp_create()
        if not err:
            if _t19(vm):
                await vm.mmu_lock.write_lock()
            try:
                err = await kvm_tdx.module.tdh_vp_init()
            finally:
                if _t19(vm):
                    await vm.mmu_lock.write_unlock()
        if err:
            vm.kvm_bug(f"TDX_BUG_ON: TDH.VP.CREATE/INIT failed {err:#x}")
            raise KvmError(uapi.EIO, "TDH.VP.INIT failed")
        tdx.state = VCPU_TD_STATE_INITIALIZED
    finally:
        await tdx_release_vm_state_locks(taken)


# -- KVM_TDX_INIT_MEM_REGION -------------------------------------------------------------------
def _check_mem_region(vm: Vm, region: uapi.TdxInitMemRegion, flags: int) -> None:
    """tdx.c: the argument checks of tdx_vcpu_init_mem_region() (and of the earlier
    tdx_init_mem_region()): known flags, page-aligned source and gpa, a private range that does
    not wrap the __u64 end (which C catches as end <= gpa)."""
    if flags & ~uapi.KVM_TDX_MEASURE_MEMORY_REGION:
        raise KvmError(uapi.EINVAL, "unknown flags")
    end = region.gpa + region.nr_pages * PAGE_SIZE
    if (
        region.source_addr % PAGE_SIZE
        or region.gpa % PAGE_SIZE
        or region.nr_pages == 0
        or end <= region.gpa
        or end > uapi.U64_MAX
        or not tdx_is_private_gpa(vm, region.gpa)
        or not tdx_is_private_gpa(vm, end - 1)
    ):
        raise KvmError(uapi.EINVAL, "bad source_addr/gpa/nr_pages")


async def tdx_vcpu_init_mem_region(vcpu: Vcpu, region: uapi.TdxInitMemRegion, flags: int) -> None:
    """tdx.c: tdx_vcpu_init_mem_region() (6.16+): one page per kvm_gmem_populate() call; the
    struct is written back (advanced past the pages done) even on error."""
    vm = vcpu.vm
    kvm_tdx = to_kvm_tdx(vm)
    taken = await tdx_acquire_vm_state_locks(vm, vcpu)
    try:
        _vcpu_gate(kvm_tdx)
        if to_tdx(vcpu).state != VCPU_TD_STATE_INITIALIZED:
            raise KvmError(uapi.EINVAL, "vCPU not initialized")
        _check_mem_region(vm, region, flags)
        if not _t19(vm):
            await vm.slots_lock.lock()
        try:
            ret = await vcpu.arch.mmu.kvm_mmu_reload()
            while not ret and region.nr_pages:
                if signal_pending():
                    ret = -uapi.EINTR
                    break
                gfn = region.gpa >> PAGE_SHIFT
                got = await kvm_gmem_populate(vm, gfn, region.source_addr, 1, tdx_gmem_post_populate, (vcpu, flags))
                if got < 0:
                    ret = got
                    break
                if got != 1:
                    ret = -uapi.EIO
                    break
                trace_tdx_init_mem_region_page(vm, gfn)
                region.source_addr += PAGE_SIZE
                region.gpa += PAGE_SIZE
                region.nr_pages -= 1
                await cond_resched()
        finally:
            if not _t19(vm):
                await vm.slots_lock.unlock()
        if ret:
            raise KvmError(-ret, "KVM_TDX_INIT_MEM_REGION")
    finally:
        await tdx_release_vm_state_locks(taken)


async def tdx_init_mem_region(vm: Vm, region: uapi.TdxInitMemRegion, flags: int, *, caller: Vcpu | None = None) -> None:
    """tdx.c: tdx_init_mem_region() (TDX KVM series v18/v19, 2024; not merged): each page is
    faulted in through vCPU 0's MMU after its source page was left in the per-VM
    ``kvm_tdx->source_pa``, which the S-EPT hook PAGE.ADDs from (and MR.EXTENDs).

    "vm-ioctl" (as posted: a VM ioctl under kvm->lock that takes vCPU 0's mutex) serializes every
    user of the scratch field; "caller-mutex" (`caller`: reached from each thread's own vCPU fd,
    under that vCPU's mutex only) does not.
    """
    kvm_tdx = to_kvm_tdx(vm)
    vcpu0 = vm.vcpus.get(0)
    if vcpu0 is None:
        raise KvmError(uapi.EINVAL, "the BSP vCPU must be created before initializing memory regions")
    held: list[Any] = []
    if caller is None:
        await vm.lock.lock()
        held.append(vm.lock)
        await vcpu0.mutex.lock()
        held.append(vcpu0.mutex)
    try:
        _vcpu_gate(kvm_tdx)
        _check_mem_region(vm, region, flags)
        idx = await vm.srcu.read_lock()
        try:
            ret = await vcpu0.arch.mmu.kvm_mmu_reload()
            while not ret and region.nr_pages:
                if signal_pending():
                    ret = -uapi.EINTR
                    break
                try:
                    src_folio, src_pfn = await vm.kvm.mm.get_user_page(region.source_addr)
                except KvmError as e:
                    ret = -(e.errno or uapi.EFAULT)
                    break
                try:
                    measure = bool(flags & uapi.KVM_TDX_MEASURE_MEMORY_REGION)
                    kvm_tdx.source_pa = (src_folio.read_page(src_pfn - src_folio.pfn), measure)
                    error_code = PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS
                    gfn = region.gpa >> PAGE_SHIFT
                    # the oracles learn which task is adding which gfn from the populate tracepoints
                    trace_kvm_gmem_populate(vm, gfn)
                    r = -uapi.EIO
                    try:
                        r, _level = await kvm_tdp_map_page(vcpu0, region.gpa, error_code)
                    finally:
                        leaf = kvm_tdx.module.sept.get(gfn)
                        trace_kvm_gmem_populated(vm, gfn, leaf.pfn if leaf is not None else -1, r)
                finally:
                    vm.kvm.allocator.put(src_folio)
                if r < 0:
                    ret = r
                    break
                trace_tdx_init_mem_region_page(vm, region.gpa >> PAGE_SHIFT)
                region.source_addr += PAGE_SIZE
                region.gpa += PAGE_SIZE
                region.nr_pages -= 1
                await cond_resched()
        finally:
            await vm.srcu.read_unlock(idx)
        if ret:
            raise KvmError(-ret, "KVM_TDX_INIT_MEM_REGION")
    finally:
        for lock in reversed(held):
            await lock.unlock()


async def tdx_mem_page_add(vm: Vm, gfn: int, pfn: int) -> int:
    """tdx.c: tdx_mem_page_add() (TDX KVM series v18/v19): the S-EPT hook before finalization
    PAGE.ADDs from ``kvm_tdx->source_pa``, consumes it, and MR.EXTENDs if asked."""
    kvm_tdx = to_kvm_tdx(vm)
    if kvm_tdx.source_pa is None:
        vm.kvm_bug("KVM_BUG_ON: source_pa == INVALID_PAGE in the S-EPT hook")
        return -uapi.EINVAL
    source, measure = kvm_tdx.source_pa
    kvm_tdx.source_pa = None
    while True:
        # the posted code looped on TDX_ERROR_SEPT_BUSY ("race is rare"): wait for the holder
        seen = vm.mmu_word.version
        err = await kvm_tdx.module.tdh_mem_page_add(gfn, pfn, source)
        if not is_busy(err):
            break
        await spin_wait(vm.mmu_word, seen)
    if err:
        vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.PAGE.ADD failed {err:#x}")
        return -uapi.EIO
    if measure:
        for off in range(0, PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
            err = await kvm_tdx.module.tdh_mr_extend((gfn << PAGE_SHIFT) + off)
            if err:
                vm.kvm_bug(f"KVM_BUG_ON: TDH.MR.EXTEND failed {err:#x}")
                return -uapi.EIO
    return 0


async def tdx_gmem_post_populate(vm: Vm, gfn: int, pfn: int, src: int | None, order: int, opaque: Any) -> int:
    """tdx.c: tdx_gmem_post_populate() ([T16]: map, PAGE.ADD outside mmu_lock; [T19]: ADD in the hook)."""
    vcpu, flags = opaque
    kvm_tdx = to_kvm_tdx(vm)
    if src is None:
        return -uapi.EINVAL
    try:
        src_folio, src_pfn = await vm.kvm.mm.get_user_page(src)
    except KvmError as e:
        return -(e.errno or uapi.EFAULT)
    try:
        source = src_folio.read_page(src_pfn - src_folio.pfn)
        gpa = gfn << PAGE_SHIFT
        if _t19(vm):
            if kvm_tdx.page_add_src is not None:
                vm.kvm_bug("KVM_BUG_ON: page_add_src already set")
                return -uapi.EIO
            kvm_tdx.page_add_src = source
            try:
                r = await kvm_tdp_mmu_map_private_pfn(vcpu, gfn, pfn)
            finally:
                kvm_tdx.page_add_src = None
            if r:
                return r
        else:
            r, _level = await kvm_tdp_map_page(vcpu, gpa, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS)
            if r < 0:
                return r
            err = await kvm_tdx.module.tdh_mem_page_add(gfn, pfn, source)
            if err:
                return -uapi.EBUSY if is_busy(err) else -uapi.EIO
            if hb.ACTIVE:
                hb.access(hb.ATOMIC_RMW, "nr_premapped", vm)  # atomic64_dec_return()
            kvm_tdx.nr_premapped -= 1
            if kvm_tdx.nr_premapped < 0:
                vm.kvm_bug("KVM_BUG_ON: nr_premapped underflow in post_populate")
                return -uapi.EIO
        if flags & uapi.KVM_TDX_MEASURE_MEMORY_REGION:
            for off in range(0, PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
                err = await kvm_tdx.module.tdh_mr_extend(gpa + off)
                if err:
                    vm.kvm_bug(f"TDX_BUG_ON: TDH.MR.EXTEND failed {err:#x}")
                    return -uapi.EIO
        return 0
    finally:
        vm.kvm.allocator.put(src_folio)


# -- KVM_TDX_FINALIZE_VM ----------------------------------------------------------------------
async def tdx_td_finalize(vm: Vm, cmd: uapi.TdxCmd) -> None:
    """tdx.c: tdx_td_finalize(): RUNNABLE, then (smp_wmb) pre_fault_allowed."""
    kvm_tdx = to_kvm_tdx(vm)
    taken = await tdx_acquire_vm_state_locks(vm, None)
    try:
        if not _t19(vm):
            await vm.slots_lock.lock()
        try:
            if not kvm_tdx.hkid_assigned or kvm_tdx.state == TD_STATE_RUNNABLE:
                raise KvmError(uapi.EINVAL, "TD not initialized or already finalized")
            if cmd.flags:
                raise KvmError(uapi.EINVAL, "flags must be 0")
            if not _t19(vm):
                if hb.ACTIVE:
                    hb.access(hb.READ_ONCE, "nr_premapped", vm)  # atomic64_read()
            if not _t19(vm) and kvm_tdx.nr_premapped:
                raise KvmError(uapi.EINVAL, f"{kvm_tdx.nr_premapped} pages premapped without PAGE.ADD")
            err = await kvm_tdx.module.tdh_mr_finalize()
            cmd.hw_error = err
            if err:
                if is_busy(err):
                    raise KvmError(uapi.EBUSY, "TDH.MR.FINALIZE busy")
                vm.kvm_bug(f"TDX_BUG_ON: TDH.MR.FINALIZE failed {err:#x}")
                raise KvmError(uapi.EIO, "TDH.MR.FINALIZE failed")
            kvm_tdx.state = TD_STATE_RUNNABLE
            await traps.point(vm)  # smp_wmb(): RUNNABLE is visible before pre_fault_allowed
            if hb.ACTIVE:
                hb.access(hb.STORE_RELEASE, "pre_fault_allowed", vm)
            vm.arch.pre_fault_allowed = True
            kvm_tdx.module.vcpus_in_guest = True
            traps.emit("tdx_state", vm, state=kvm_tdx.state)
        finally:
            if not _t19(vm):
                await vm.slots_lock.unlock()
    finally:
        await tdx_release_vm_state_locks(taken)


async def tdx_vcpu_get_cpuid(vcpu: Vcpu, cpuid: uapi.Cpuid2) -> None:
    """tdx.c: tdx_vcpu_get_cpuid(): gated like the other vCPU sub-commands."""
    kvm_tdx = to_kvm_tdx(vcpu.vm)
    _vcpu_gate(kvm_tdx)
    needed = 2
    if cpuid.nent < needed:
        cpuid.nent = needed
        raise KvmError(uapi.E2BIG, "nent too small")
    cpuid.nent = needed
    await traps.point(kvm_tdx.module)


# -- the S-EPT hooks of the mirror root --------------------------------------------------------
async def tdx_sept_link_private_spt(vm: Vm, gfn: int, level: int) -> int:
    """tdx.c: tdx_sept_link_private_spt() -> TDH.MEM.SEPT.ADD."""
    err = await to_kvm_tdx(vm).module.tdh_mem_sept_add(gfn, level)
    if err:
        if is_busy(err):
            return -uapi.EBUSY
        vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.SEPT.ADD failed {err:#x}")
        return -uapi.EIO
    return 0


async def tdx_sept_set_private_spte(vm: Vm, gfn: int, level: int, leaf: Leaf) -> int:
    """tdx.c: tdx_sept_set_private_spte(): AUG when RUNNABLE; else [T16] premap, [T19] PAGE.ADD."""
    kvm_tdx = to_kvm_tdx(vm)
    if level != 1:
        vm.kvm_bug("KVM_BUG_ON: private mapping above 4K")
        return -uapi.EIO
    pfn = leaf.pfn(gfn)
    await traps.point(vm)  # smp_rmb(): read the state, then pre_fault_allowed
    if kvm_tdx.state == TD_STATE_RUNNABLE:
        err = await kvm_tdx.module.tdh_mem_page_aug(gfn, pfn)
        if err:
            if is_busy(err):
                return -uapi.EBUSY
            vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.PAGE.AUG failed {err:#x}")
            return -uapi.EIO
        return 0
    trace_tdx_sept_set_private_spte(vm, gfn, level, pfn)
    if hb.ACTIVE:
        hb.access(hb.LOAD_ACQUIRE, "pre_fault_allowed", vm)  # after the smp_rmb()
    if vm.arch.pre_fault_allowed and not vm.profile.prefault_before_finalize:
        vm.kvm_bug("KVM_BUG_ON: pre_fault_allowed before the TD is RUNNABLE")
        return -uapi.EIO
    if vm.profile.tdx_init_mem_region_vcpu0:
        return await tdx_mem_page_add(vm, gfn, pfn)
    if not _t19(vm):
        if hb.ACTIVE:
            hb.access(hb.ATOMIC_RMW, "nr_premapped", vm)  # atomic64_inc()
        kvm_tdx.nr_premapped += 1
        traps.emit("tdx_premap", vm, gfn=gfn, nr_premapped=kvm_tdx.nr_premapped)
        return 0
    if kvm_tdx.page_add_src is None:
        vm.kvm_bug("KVM_BUG_ON: S-EPT leaf before finalization without page_add_src")
        return -uapi.EIO
    err = await kvm_tdx.module.tdh_mem_page_add(gfn, pfn, kvm_tdx.page_add_src)
    if err:
        if is_busy(err):
            return -uapi.EBUSY
        vm.kvm_bug(f"TDX_BUG_ON: TDH.MEM.PAGE.ADD failed {err:#x}")
        return -uapi.EIO
    return 0


async def tdx_sept_remove_private_spte(vm: Vm, gfn: int, level: int) -> None:
    """tdx.c: tdx_sept_remove_private_spte(): BLOCK -> TRACK -> REMOVE -> WBINVD under mmu_lock write."""
    lockdep_assert_held_write(vm.mmu_lock)
    kvm_tdx = to_kvm_tdx(vm)
    module = kvm_tdx.module
    if level != 1:
        vm.kvm_bug("KVM_BUG_ON: private mapping above 4K")
        return
    if not kvm_tdx.hkid_assigned:
        vm.kvm_bug("KVM_BUG_ON: S-EPT removal without an HKID")
        return
    err = await tdh_do_no_vcpus(vm, lambda: module.tdh_mem_range_block(gfn))
    if (
        not _t19(vm)
        and kvm_tdx.state != TD_STATE_RUNNABLE
        and err == TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
    ):
        if gfn not in module.sept:
            # tdx_is_sept_zap_err_due_to_premap(): never PAGE.ADDed, only premapped
            if hb.ACTIVE:
                hb.access(hb.ATOMIC_RMW, "nr_premapped", vm)  # atomic64_dec_return()
            kvm_tdx.nr_premapped -= 1
            if kvm_tdx.nr_premapped < 0:
                vm.kvm_bug("KVM_BUG_ON: nr_premapped underflow in the zap path")
            return
    if err:
        vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.RANGE.BLOCK failed {err:#x}")
        return
    if kvm_tdx.state == TD_STATE_RUNNABLE:
        err = await tdh_do_no_vcpus(vm, module.tdh_mem_track)
        if err:
            vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.TRACK failed {err:#x}")
            return
    pfn = module.sept[gfn].pfn
    err = await tdh_do_no_vcpus(vm, lambda: module.tdh_mem_page_remove(gfn))
    if err:
        vm.kvm_bug(f"KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed {describe(err)}")
        return
    err = await module.tdh_phymem_page_wbinvd(pfn)
    if err:
        vm.kvm_bug(f"KVM_BUG_ON: TDH.PHYMEM.PAGE.WBINVD failed {err:#x}")


async def tdh_do_no_vcpus(vm: Vm, seamcall: Callable[[], Any]) -> int:
    """tdx.c: tdh_do_no_vcpus(): on BUSY kick every vCPU out of the guest and retry exactly once."""
    kvm_tdx = to_kvm_tdx(vm)
    module = kvm_tdx.module
    err: int = await seamcall()
    if is_busy(err):
        kvm_tdx.wait_for_sept_zap = True
        in_guest = module.vcpus_in_guest
        # kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE): IPI every vCPU and spin until
        # each has left guest mode, i.e. finished the guest instruction it was executing.
        module.vcpus_in_guest = False
        traps.emit("tdx_kick_vcpus", vm)
        while module.guest_in_flight:
            await spin_wait(vm.mmu_word, vm.mmu_word.version)
        try:
            err = await seamcall()
        finally:
            module.vcpus_in_guest = in_guest
            kvm_tdx.wait_for_sept_zap = False
            vm.mmu_word.write()
    return err
