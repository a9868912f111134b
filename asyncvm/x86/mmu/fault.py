"""The TDP page fault: kvm_mmu_do_page_fault -> kvm_mmu_faultin_pfn -> stale check -> kvm_tdp_mmu_map
(arch/x86/kvm/mmu/mmu.c, mmu_internal.h, tdp_mmu.c).

The order is the kernel's and it is the whole point: snapshot ``mmu_invalidate_seq``, check the
private/shared attribute, resolve the pfn (which may sleep, never under ``mmu_lock``), pre-check
for a running invalidation, take ``mmu_lock`` for read, re-check under the lock, then install with
a cmpxchg. Each of those is a separate scheduling point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ... import uapi
from ...host.pages import Folio
from ...kvm.guest_memfd import KVM_MEMSLOT_GMEM_ONLY, kvm_gmem_get_pfn
from ...kvm.invalidate import mmu_invalidate_retry_gfn, mmu_invalidate_retry_gfn_unsafe
from ...kvm.memslots import Memslot
from ...runtime import hb, traps
from ...runtime.failures import Violation
from ...runtime.sync import alloc_fails, signal_pending
from ...uapi import PAGE_SHIFT, KvmError
from ..trace import trace_kvm_mmu_fault_snapshot, trace_kvm_mmu_set_spte
from .tdp_mmu import FROZEN, MMIO, PAGES, PG_LEVEL_1G, PG_LEVEL_4K, TABLE, Leaf, Root, align

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu

# arch/x86/kvm/mmu/mmu_internal.h: enum ret_pf (RET_PF_WRITE_PROTECTED since 6.12)
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = (
    range(7)
)

# arch/x86/include/asm/kvm_host.h: page fault error code bits
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_PRIVATE_ACCESS = 1 << 49


@dataclass(eq=False, slots=True, weakref_slot=True)
class KvmPageFault:
    """``struct kvm_page_fault`` (slotted: one is made per fault attempt; weak-referenceable for
    live mode's oracles)"""

    addr: int
    error_code: int
    prefetch: bool
    gfn: int
    slot: Memslot | None
    is_private: bool
    write: bool
    max_level: int = PG_LEVEL_1G
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    mmu_seq: int = 0
    pfn: int = 0
    folio: Folio | None = None
    map_writable: bool = True


def kvm_is_gfn_alias(vm: Any, gfn: int) -> bool:
    """mmu.h: kvm_is_gfn_alias(): the gfn has the TDX shared bit set."""
    bits: int = vm.arch.gfn_direct_bits
    return bool(bits and gfn & bits)


def kvm_mmu_fault_snapshot(vcpu: Vcpu, fault: KvmPageFault) -> None:
    """mmu.c: kvm_mmu_faultin_pfn(): ``fault->mmu_seq = kvm->mmu_invalidate_seq; smp_rmb()``."""
    # A plain load then smp_rmb() in the kernel, paired with the writer's ordering under
    # mmu_lock: the protocol tolerates the race, so it counts as marked.
    if hb.ACTIVE:
        hb.access(hb.READ_ONCE, "mmu_invalidate_seq", vcpu.vm)
    fault.mmu_seq = vcpu.vm.mmu_invalidate_seq
    trace_kvm_mmu_fault_snapshot(vcpu, fault)


def kvm_mmu_prepare_memory_fault_exit(vcpu: Vcpu, fault: KvmPageFault) -> None:
    """mmu.c: kvm_mmu_prepare_memory_fault_exit() -> kvm_prepare_memory_fault_exit()."""
    vcpu.kvm_run.prepare_memory_fault_exit(fault.gfn << PAGE_SHIFT, uapi.PAGE_SIZE, fault.is_private)
    traps.emit("memory_fault_exit", vcpu, gpa=fault.gfn << PAGE_SHIFT, private=fault.is_private)


async def kvm_mmu_do_page_fault(vcpu: Vcpu, gpa: int, error_code: int, prefetch: bool) -> tuple[int, int]:
    """mmu_internal.h: kvm_mmu_do_page_fault() (6.10+ synthetic private bit): returns (r, level)."""
    vm = vcpu.vm
    gfn = (gpa >> PAGE_SHIFT) & ~vm.arch.gfn_direct_bits
    if hb.ACTIVE:
        hb.access(hb.LOAD_ACQUIRE, "memslots", vm, vcpu.arch.mmu.as_id)  # srcu_dereference()
    fault = KvmPageFault(
        addr=gpa,
        error_code=error_code,
        prefetch=prefetch,
        gfn=gfn,
        slot=vm.gfn_to_memslot(gfn, vcpu.arch.mmu.as_id),
        is_private=bool(error_code & PFERR_PRIVATE_ACCESS),
        write=bool(error_code & PFERR_WRITE_MASK),
    )
    if fault.slot is not None:
        fault.slot.check_live("kvm_mmu_do_page_fault")
    r = await kvm_tdp_page_fault(vcpu, fault)
    if r == RET_PF_EMULATE and fault.is_private:
        kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
        return -uapi.EFAULT, fault.goal_level
    return r, fault.goal_level


async def kvm_tdp_page_fault(vcpu: Vcpu, fault: KvmPageFault) -> int:
    """mmu.c: kvm_tdp_mmu_page_fault() (6.8+)."""
    vm = vcpu.vm
    r = fast_page_fault(vcpu, fault)
    if r != RET_PF_INVALID:
        return r
    if alloc_fails("mmu_topup_memory_caches"):
        return -uapi.ENOMEM
    r = await kvm_mmu_faultin_pfn(vcpu, fault)
    if r != RET_PF_CONTINUE:
        return r
    r = RET_PF_RETRY
    await vm.mmu_lock.read_lock()
    try:
        if not is_page_fault_stale(vcpu, fault):
            r = await kvm_tdp_mmu_map(vcpu, fault)
    finally:
        await vm.mmu_lock.read_unlock()
        kvm_mmu_finish_page_fault(vcpu, fault, r)
    return r


#: kvm_ad_enabled(): EPT/NPT Accessed/Dirty bits are in use (the model has no access tracking)
KVM_AD_ENABLED = True


def page_fault_can_be_fast(vcpu: Vcpu, fault: KvmPageFault) -> bool:
    """mmu.c: page_fault_can_be_fast() (6.9+): never for a private/shared mismatch of a VM with
    private memory (the slow path builds the exit); a not-present fault only when A/D bits are
    off (access tracking); a present fault only when it is a write (write protection). So a
    pre-fault (PFERR_GUEST_FINAL_MASK alone: not present, read) always takes the slow path."""
    vm = vcpu.vm
    if vm.arch.has_private_mem and fault.is_private != vm.mem_is_private(fault.gfn):
        return False
    if not fault.error_code & PFERR_PRESENT_MASK:
        return not KVM_AD_ENABLED
    return fault.write


def fast_page_fault(vcpu: Vcpu, fault: KvmPageFault) -> int:
    """mmu.c: fast_page_fault(): lockless; SPURIOUS if a present leaf already allows the access."""
    if not page_fault_can_be_fast(vcpu, fault):
        return RET_PF_INVALID
    root = vcpu.arch.mmu.root_for(fault.is_private)
    if root is None or root.invalid:
        return RET_PF_INVALID
    hit = root.leaf_at(fault.gfn)
    if hit is None:
        return RET_PF_INVALID
    _level, leaf = hit
    if fault.write and not leaf.writable:
        return RET_PF_INVALID
    return RET_PF_SPURIOUS  # fault->goal_level is left alone, as the kernel's fast path does


async def kvm_mmu_faultin_pfn(vcpu: Vcpu, fault: KvmPageFault) -> int:
    """mmu.c: kvm_mmu_faultin_pfn() (6.18 order, kvm-core.md section 1.5 rows 1-10)."""
    vm = vcpu.vm
    # 1. aliases: a gfn with the shared bit set must not reach here
    if kvm_is_gfn_alias(vm, fault.gfn):
        vm.kvm_bug("KVM_BUG_ON: aliased gfn in the fault path")
        return -uapi.EFAULT
    # 2. snapshot the invalidation sequence before reading anything the mapping depends on
    await traps.point(vm)
    kvm_mmu_fault_snapshot(vcpu, fault)
    if hb.ACTIVE:
        hb.access(hb.READ_ONCE, "mem_attr_array", vm)  # xa_load() under RCU
    if fault.is_private != vm.mem_is_private(fault.gfn):
        kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
        return -uapi.EFAULT
    slot = fault.slot
    # 3./4. no memslot
    if slot is None:
        if fault.is_private:
            kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return -uapi.EFAULT
        return await _handle_noslot(vcpu, fault)
    # 5. a slot being deleted or moved
    if slot.invalid:
        if fault.prefetch and vm.profile.prefault_eagain_on_invalid_slot:
            return -uapi.EAGAIN
        return RET_PF_RETRY
    # 7. lockless pre-check
    if "drop_invalidate_retry" not in vm.bugs and mmu_invalidate_retry_gfn_unsafe(vm, fault.mmu_seq, fault.gfn):
        return RET_PF_RETRY
    # 8./9. resolve the pfn (may sleep); [6.18] a guest_memfd-only slot resolves shared faults there too
    if fault.is_private or slot.flags & KVM_MEMSLOT_GMEM_ONLY:
        if not slot.has_gmem():
            kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return -uapi.EFAULT
        try:
            fault.pfn, fault.folio, _order = await kvm_gmem_get_pfn(vm, slot, fault.gfn)
        except KvmError as e:
            kvm_mmu_prepare_memory_fault_exit(vcpu, fault)
            return -(e.errno or uapi.EFAULT)
        if fault.is_private:
            fault.max_level = min(fault.max_level, vm.arch.kvm_x86_ops.private_max_mapping_level(vm))
        else:
            # kvm_mmu_faultin_pfn_gmem(): max_order 0 (guest_memfd folios are order 0), writable
            # unless the slot is read-only
            fault.max_level = PG_LEVEL_4K
            fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
    else:
        r = await _faultin_shared(vcpu, fault, slot)
        if r != RET_PF_CONTINUE:
            return r
    # 10. pre-check again: on a hit the page is released and the fault retries
    if "drop_invalidate_retry" not in vm.bugs and mmu_invalidate_retry_gfn_unsafe(vm, fault.mmu_seq, fault.gfn):
        _release(vcpu, fault)
        return RET_PF_RETRY
    return RET_PF_CONTINUE


async def _handle_noslot(vcpu: Vcpu, fault: KvmPageFault) -> int:
    """mmu.c: kvm_handle_noslot_fault(): cache MMIO info; the fault emulates."""
    fault.pfn = -1
    return RET_PF_EMULATE


async def _faultin_shared(vcpu: Vcpu, fault: KvmPageFault, slot: Memslot) -> int:
    """mmu.c: __kvm_faultin_pfn() for shared memory: GUP the host page (may sleep)."""
    vm = vcpu.vm
    mm = vm.kvm.mm
    slot.check_live("__kvm_faultin_pfn")
    hva = slot.gfn_to_hva(fault.gfn)
    if signal_pending():
        return -uapi.EINTR  # KVM_PFN_ERR_SIGPENDING from the interruptible GUP
    try:
        folio, pfn = await mm.get_user_page(hva, write=fault.write)
    except KvmError as e:
        if e.errno == uapi.ENOMEM:
            return -uapi.ENOMEM
        return -uapi.EFAULT  # kvm_handle_error_pfn()
    fault.pfn, fault.folio = pfn, folio
    fault.map_writable = not slot.flags & uapi.KVM_MEM_READONLY
    if fault.write and not fault.map_writable:
        _release(vcpu, fault)
        return RET_PF_EMULATE
    return RET_PF_CONTINUE


def _release(vcpu: Vcpu, fault: KvmPageFault) -> None:
    if fault.folio is not None:
        vcpu.vm.kvm.allocator.put(fault.folio)
        fault.folio = None


def kvm_mmu_finish_page_fault(vcpu: Vcpu, fault: KvmPageFault, r: int) -> None:
    """mmu.c: kvm_mmu_finish_page_fault(): drop the reference taken while resolving the pfn."""
    _release(vcpu, fault)


def is_page_fault_stale(vcpu: Vcpu, fault: KvmPageFault) -> bool:
    """mmu.c: is_page_fault_stale() (6.8+), under mmu_lock."""
    root = vcpu.arch.mmu.root_for(fault.is_private)
    if root is None:
        return vcpu.has_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
    if root.invalid and "fault_ignores_invalid_root" not in vcpu.vm.bugs:
        return True  # is_obsolete_root()
    if fault.slot is not None:
        fault.slot.check_live("is_page_fault_stale")
    if "drop_invalidate_retry" in vcpu.vm.bugs:
        return False
    return fault.slot is not None and mmu_invalidate_retry_gfn(vcpu.vm, fault.mmu_seq, fault.gfn)


def kvm_mmu_hugepage_adjust(vcpu: Vcpu, fault: KvmPageFault) -> None:
    """mmu.c: kvm_mmu_hugepage_adjust() / __kvm_mmu_max_mapping_level() (6.8+)."""
    vm = vcpu.vm
    slot = fault.slot
    fault.goal_level = PG_LEVEL_4K
    if slot is None or fault.max_level == PG_LEVEL_4K:
        return
    level = fault.max_level
    while level > PG_LEVEL_4K:
        base = align(fault.gfn, level)
        span = PAGES[level]
        hva_base = slot.gfn_to_hva(base)
        fits = (
            base >= slot.base_gfn
            and base + span <= slot.end_gfn
            and hva_base % (span * uapi.PAGE_SIZE) == 0
            and not slot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES
            and vm.range_has_attributes(base, base + span, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if fault.is_private else 0)
        )
        if fits and not fault.is_private and vm.kvm.mm.host_mapping_pages(slot.gfn_to_hva(fault.gfn)) < span:
            fits = False
        if fits:
            break
        level -= 1
    fault.req_level = level
    fault.goal_level = min(level, fault.max_level)


async def kvm_tdp_mmu_map(vcpu: Vcpu, fault: KvmPageFault) -> int:
    """tdp_mmu.c: kvm_tdp_mmu_map() (6.8+): walk, link tables, split huge SPTEs, install the leaf."""
    vm = vcpu.vm
    mmu = vm.arch.mmu
    kvm_mmu_hugepage_adjust(vcpu, fault)
    root = vcpu.arch.mmu.root_for(fault.is_private)
    assert root is not None
    if root.invalid and "fault_ignores_invalid_root" not in vm.bugs:
        return RET_PF_RETRY
    gfn = fault.gfn
    for level in (3, 2):
        if level <= fault.goal_level:
            break
        base = align(gfn, level)
        if hb.ACTIVE:
            hb.access(hb.READ_ONCE, "spte", root, level, base)  # the walk: kvm_tdp_mmu_read_spte()
        spte = root.get(level, base)
        if spte is FROZEN:
            return RET_PF_RETRY
        if spte is TABLE:
            continue
        if isinstance(spte, Leaf):
            if root.is_mirror:
                vm.kvm_bug("KVM_BUG_ON: split of a huge mirror SPTE")
                return -uapi.EIO
            if not await _split_huge_spte(mmu, root, level, base, spte):
                return RET_PF_RETRY
            continue
        if not await mmu.set_spte_atomic(root, level, base, spte, TABLE):
            return RET_PF_RETRY
    return await _map_target_level(vcpu, fault, root)


async def _split_huge_spte(mmu: Any, root: Root, level: int, base: int, spte: Leaf) -> bool:
    """tdp_mmu.c: tdp_mmu_split_huge_page(): the children map what the huge SPTE mapped."""
    await traps.point(root)
    if hb.ACTIVE:
        hb.access(hb.ATOMIC_RMW, "spte", root, level, base)  # tdp_mmu_link_sp() with shared=true
    if root.get(level, base) is not spte:
        return False
    child = Leaf(spte.delta, level - 1, spte.writable, spte.private, spte.accessed)
    root.levels[level - 1].assign(base, base + PAGES[level], child)
    root.levels[level].assign(base, base + PAGES[level], TABLE)
    mmu.tdp_mmu_link_sp(root, level, base)
    mmu.vm.mmu_word.write()
    traps.emit("spte_split", mmu.vm, root=root.name, level=level, gfn=base)
    return True


async def _map_target_level(vcpu: Vcpu, fault: KvmPageFault, root: Root) -> int:
    """tdp_mmu.c: tdp_mmu_map_handle_target_level()"""
    vm = vcpu.vm
    level = fault.goal_level
    base = align(fault.gfn, level)
    if hb.ACTIVE:
        hb.access(hb.READ_ONCE, "spte", root, level, base)
    old = root.get(level, base)
    if old is FROZEN:
        return RET_PF_RETRY
    if isinstance(old, Leaf):
        if old.pfn(base) != fault.pfn - (fault.gfn - base) and fault.slot is not None:
            raise Violation(
                "spurious_pfn_mismatch",
                f"{root.name}: gfn {fault.gfn:#x} already maps pfn {old.pfn(fault.gfn):#x}, fault resolved "
                f"{fault.pfn:#x} (WARN_ON_ONCE in tdp_mmu_map_handle_target_level)",
                signature="spurious_pfn_mismatch",
                gfn=fault.gfn,
            )
        if fault.prefetch or not fault.write or old.writable:
            return RET_PF_SPURIOUS
    if fault.slot is None:
        if not await vm.arch.mmu.set_spte_atomic(root, level, base, old, MMIO):
            return RET_PF_RETRY
        return RET_PF_EMULATE
    if isinstance(old, Leaf):
        return RET_PF_RETRY
    pfn_base = fault.pfn - (fault.gfn - base)
    new = Leaf(pfn_base - base, level, fault.map_writable, fault.is_private, accessed=not fault.prefetch)
    if not await vm.arch.mmu.set_spte_atomic(root, level, base, old, new):
        return RET_PF_RETRY
    trace_kvm_mmu_set_spte(vcpu, fault, root, level, base, new)
    return RET_PF_FIXED
