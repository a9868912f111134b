"""The x86 TDP MMU: roots, SPTEs at 4K/2M/1G, cmpxchg installs under mmu_lock read, FROZEN_SPTE,
zaps under mmu_lock write that yield, and the handle_changed_spte invariants
(arch/x86/kvm/mmu/tdp_mmu.c).

SPTE state is range-based: each level of a root is an interval map from gfn to an SPTE value,
and a leaf value stores ``pfn - gfn``, so a run of pages mapped to consecutive pfns is one entry.
A 256 GiB guest mapped with 1 GiB pages costs 256 entries; a non-leaf SPTE is the marker
``TABLE`` over the range its child table covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ...intervals import IntervalMap
from ...kvm.invalidate import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED
from ...runtime import hb, traps
from ...runtime.failures import Violation
from ...runtime.lockdep import lockdep_assert_held_read, lockdep_assert_held_write
from ...runtime.sync import READ, WRITE, need_resched, spin_yield
from ..trace import trace_kvm_tdp_mmu_spte_changed

if TYPE_CHECKING:
    from ...kvm.vm import Vm

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
ROOT_LEVEL = 4
#: pages covered by one SPTE at each level (KVM_PAGES_PER_HPAGE)
PAGES = {1: 1, 2: 512, 3: 512 * 512, 4: 512 * 512 * 512}


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: a present non-leaf SPTE (a child page table exists over the range)
TABLE = _Marker("TABLE")
#: FROZEN_SPTE (formerly REMOVED_SPTE): a change is in flight; others must not touch it
FROZEN = _Marker("FROZEN_SPTE")
#: an MMIO SPTE: the gfn has no memslot; faults on it emulate
MMIO = _Marker("MMIO_SPTE")


class Leaf(NamedTuple):
    """A present leaf SPTE value. ``pfn(gfn) = gfn + delta``; equal values coalesce into runs.

    An immutable value, made on every install: a named tuple is built in one C call (a frozen
    dataclass pays an ``object.__setattr__`` per field) and compares field by field all the same.
    """

    delta: int
    level: int
    writable: bool
    private: bool
    accessed: bool = False

    def pfn(self, gfn: int) -> int:
        return gfn + self.delta


@dataclass(eq=False)
class KvmMmuPage:
    """``struct kvm_mmu_page`` of a page table below a root: ``role.level`` (the level of the SPTEs
    it holds), ``gfn`` (the first gfn it maps) and ``ptep``, the non-leaf SPTE of its parent that
    links it (tdp_mmu_init_child_sp(): the parent's level and the same base gfn)."""

    root: Root
    level: int
    gfn: int

    @property
    def ptep(self) -> tuple[int, int]:
        """(level, gfn) of the parent SPTE in `root`."""
        return self.level + 1, self.gfn


@dataclass(eq=False)
class Root:
    """A TDP root (``struct kvm_mmu_page`` with ``role.level == 4``)."""

    id: int
    as_id: int
    is_mirror: bool
    refcount: int = 2  # one for the vCPU that allocated it, one for the TDP MMU itself
    invalid: bool = False
    scheduled_to_zap: bool = False
    freed: bool = False

    def __post_init__(self) -> None:
        self.levels: dict[int, IntervalMap[Any]] = {lvl: IntervalMap() for lvl in (1, 2, 3)}
        self.name = f"root{self.id}{'(mirror)' if self.is_mirror else ''}"
        #: the shadow pages linked below this root, by their parent SPTE's (level, gfn)
        self.sps: dict[tuple[int, int], KvmMmuPage] = {}

    def role_matches(self, as_id: int, is_mirror: bool) -> bool:
        return not self.invalid and self.as_id == as_id and self.is_mirror == is_mirror

    def get(self, level: int, gfn: int) -> Any:
        """The SPTE at `level` covering `gfn` (None: not present)."""
        return self.levels[level].get(gfn)

    def leaf_at(self, gfn: int) -> tuple[int, Leaf] | None:
        """The present leaf mapping `gfn` at any level, with its level."""
        for level in (3, 2, 1):
            v = self.levels[level].get(gfn)
            if isinstance(v, Leaf):
                return level, v
            if v is not TABLE:
                return None
        return None

    def leaves(self, start: int, end: int) -> list[tuple[int, int, Leaf]]:
        """Every present leaf run overlapping [start, end), unclipped."""
        out = []
        for level in (1, 2, 3):
            for s, e, v in self.levels[level].overlaps_unclipped(start, end):
                if isinstance(v, Leaf):
                    out.append((s, e, v))
        return out


def align(gfn: int, level: int) -> int:
    return gfn - gfn % PAGES[level]


class TdpMmu:
    """Per-VM TDP MMU state (``kvm->arch.tdp_mmu_roots`` and friends)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.roots: list[Root] = []
        #: kvm->arch.tdp_mmu_pages: shadow pages linked below every root (tdp_account_mmu_page())
        self.nr_pages = 0
        self._ids = 0
        self.mmu_valid_gen = 0

    # -- roots ----------------------------------------------------------------------------
    def alloc_root(self, as_id: int, is_mirror: bool) -> Root:
        """tdp_mmu.c: kvm_tdp_mmu_alloc_root() (6.9+; mmu_lock held for read): reuse or create."""
        for root in self.roots:
            if root.role_matches(as_id, is_mirror) and root.refcount > 0:
                root.refcount += 1
                return root
        self._ids += 1
        root = Root(self._ids, as_id, is_mirror)
        self.roots.append(root)
        self.vm.mmu_word.write()
        traps.emit("root_alloc", self.vm, root=root.name)
        return root

    def put_root(self, root: Root) -> None:
        """tdp_mmu.c: kvm_tdp_mmu_put_root(): the last reference frees an (already invalid) root."""
        root.refcount -= 1
        if root.refcount < 0:
            raise Violation("root_refcount", f"{root.name} refcount below zero", signature="root_refcount")
        if root.refcount == 0:
            if not root.invalid:
                self.vm.kvm_bug(f"KVM_BUG_ON: freeing valid {root.name}")
            root.freed = True
            # tdp_mmu_free_sp_rcu_callback() for the root's page tables
            self.nr_pages -= len(root.sps)
            root.sps.clear()
            self.roots.remove(root)
            self.vm.mmu_word.write()
            traps.emit("root_free", self.vm, root=root.name)

    def invalidate_roots(self, mirror: bool = False) -> None:
        """tdp_mmu.c: kvm_tdp_mmu_invalidate_roots() (write lock): mark, hand the MMU's ref to the zapper."""
        lockdep_assert_held_write(self.vm.mmu_lock)
        for root in self.roots:
            if not root.invalid and root.is_mirror == mirror:
                root.invalid = True
                root.scheduled_to_zap = True
                self.vm.mmu_word.write()
                traps.emit("root_invalidate", self.vm, root=root.name)

    async def zap_invalidated_roots(self) -> None:
        """tdp_mmu.c: kvm_tdp_mmu_zap_invalidated_roots(shared=true): zap, then drop the MMU's ref."""
        lockdep_assert_held_read(self.vm.mmu_lock)
        for root in list(self.roots):
            if root.scheduled_to_zap:
                root.scheduled_to_zap = False
                await self._zap_range(root, 0, 1 << 52, shared=True, can_yield=True)
                self.put_root(root)

    def root_types(self, attr_filter: int) -> list[Root]:
        """kvm_gfn_range_filter_to_root_types(): PRIVATE -> mirror, SHARED -> direct (TDX)."""
        if not self.vm.arch.has_mirrored_tdp:
            return list(self.roots)
        out = []
        for root in self.roots:
            if root.is_mirror and attr_filter & KVM_FILTER_PRIVATE:
                out.append(root)
            if not root.is_mirror and attr_filter & KVM_FILTER_SHARED:
                out.append(root)
        return out

    # -- SPTE updates ----------------------------------------------------------------------
    async def set_spte_atomic(self, root: Root, level: int, base: int, old: Any, new: Any) -> bool:
        """tdp_mmu.c: tdp_mmu_set_spte_atomic() (mmu_lock read): cmpxchg; False if it lost (-EBUSY)."""
        lockdep_assert_held_read(self.vm.mmu_lock)
        await traps.point(root)  # the cmpxchg itself is the racy step
        if "plain_spte_store" in self.vm.bugs:
            # bug: a plain store where try_cmpxchg64() belongs; a concurrent change is overwritten
            if hb.ACTIVE:
                hb.access(hb.PLAIN_WRITE, "spte", root, level, base)
        else:
            if hb.ACTIVE:
                hb.access(hb.ATOMIC_RMW, "spte", root, level, base)
            if root.get(level, base) is not old:
                return False
        if old is FROZEN:
            raise Violation("frozen_spte", f"atomic update over FROZEN_SPTE in {root.name}", signature="frozen_spte")
        span = PAGES[level]
        if root.is_mirror and (isinstance(new, Leaf) or new is TABLE):
            return await self.set_external_spte_present(root, level, base, old, new)
        self.handle_changed_spte(root, level, base, old, new, shared=True)
        self._write(root, level, base, span, new)
        return True

    async def set_external_spte_present(self, root: Root, level: int, base: int, old: Any, new: Any) -> bool:
        """tdp_mmu.c: set_external_spte_present(): freeze, run the vendor hook, then write new or restore old."""
        vm = self.vm
        ops = vm.arch.kvm_x86_ops
        if old is not None:
            vm.kvm_bug("KVM_BUG_ON: present -> present change of a mirror SPTE")
            return False
        span = PAGES[level]
        root.levels[level].assign(base, base + span, FROZEN)
        vm.mmu_word.write()
        traps.emit("spte", vm, root=root.name, level=level, gfn=base, old="none", new="FROZEN_SPTE")
        if new is TABLE:
            r = await ops.link_external_spt(vm, base, level)
        else:
            r = await ops.set_external_spte(vm, base, level, new)
        # __kvm_tdp_mmu_write_spte(): the frozen SPTE is owned, so WRITE_ONCE suffices
        if hb.ACTIVE:
            hb.access(hb.WRITE_ONCE, "spte", root, level, base)
        if r:
            root.levels[level].clear(base, base + span)
            vm.mmu_word.write()
            traps.emit("spte", vm, root=root.name, level=level, gfn=base, old="FROZEN_SPTE", new="none")
            return False
        self.handle_changed_spte(root, level, base, old, new, shared=True)
        root.levels[level].assign(base, base + span, new)
        return True

    async def remove_external_spte(self, root: Root, level: int, lo: int, hi: int, leaf: Leaf) -> None:
        """tdp_mmu.c: remove_external_spte(): each external leaf goes through the vendor, then the mirror's."""
        vm = self.vm
        lockdep_assert_held_write(vm.mmu_lock)
        for gfn in range(lo, hi):
            if root.get(level, gfn) is None:
                continue
            await vm.arch.kvm_x86_ops.remove_external_spte(vm, gfn, level)
            if hb.ACTIVE:
                hb.access(hb.WRITE_ONCE, "spte", root, level, gfn)
            self.handle_changed_spte(root, level, gfn, leaf, None, shared=False)
            root.levels[level].clear(gfn, gfn + 1)

    def _write(self, root: Root, level: int, base: int, span: int, new: Any) -> None:
        if new is None:
            root.levels[level].clear(base, base + span)
        else:
            root.levels[level].assign(base, base + span, new)

    def handle_changed_spte(self, root: Root, level: int, base: int, old: Any, new: Any, shared: bool) -> None:
        """tdp_mmu.c: handle_changed_spte() (6.8+): the invariants the kernel BUG()s or WARNs on."""
        if isinstance(old, Leaf) and isinstance(new, Leaf) and old.delta != new.delta:
            raise Violation(
                "spte_pfn_change",
                f"{root.name}: present leaf for gfn {base:#x} replaced by one with another pfn "
                f"({old.pfn(base):#x} -> {new.pfn(base):#x}) without a zap",
                signature="spte_pfn_change",
                gfn=base,
            )
        if root.is_mirror and shared and old is not None and new is None:
            self.vm.kvm_bug("KVM_BUG_ON: atomic zap of a mirror SPTE")
        if new is TABLE:
            self.tdp_mmu_link_sp(root, level, base)
        elif old is TABLE:
            self.tdp_mmu_unlink_sp(root, level, base)
        self.vm.mmu_word.write()
        trace_kvm_tdp_mmu_spte_changed(self.vm, root, level, base, old, new)
        if traps.tracing():
            traps.emit("spte", self.vm, root=root.name, level=level, gfn=base, old=_fmt(old, base), new=_fmt(new, base))

    def tdp_mmu_link_sp(self, root: Root, level: int, base: int) -> None:
        """tdp_mmu.c: tdp_mmu_link_sp() (6.8+) + tdp_account_mmu_page(): the child table the
        non-leaf SPTE at (level, base) now points to."""
        root.sps[(level, base)] = KvmMmuPage(root, level - 1, base)
        self.nr_pages += 1

    def tdp_mmu_unlink_sp(self, root: Root, level: int, base: int) -> None:
        """tdp_mmu.c: handle_removed_pt() -> tdp_mmu_unlink_sp(): the child table is gone."""
        if root.sps.pop((level, base), None) is not None:
            self.nr_pages -= 1

    # -- zapping ----------------------------------------------------------------------------
    async def unmap_gfn_range(self, start: int, end: int, attr_filter: int, may_block: bool) -> bool:
        """tdp_mmu.c: kvm_tdp_mmu_unmap_gfn_range() (mmu_lock write; includes invalid roots)."""
        lockdep_assert_held_write(self.vm.mmu_lock)
        flush = False
        for root in self.root_types(attr_filter):
            flush |= await self._zap_range(root, start, end, shared=False, can_yield=may_block)
        return flush

    async def _zap_range(self, root: Root, start: int, end: int, *, shared: bool, can_yield: bool) -> bool:
        """tdp_mmu.c: tdp_mmu_zap_leafs(): zap every leaf overlapping [start, end), yielding as
        tdp_mmu_iter_cond_resched() does (only after progress, only when need_resched())."""
        flushed = False
        for level in (1, 2, 3):
            pos = start
            while True:
                run = root.levels[level].first_overlap(pos, end)
                if run is None:
                    break
                s, e, v = run
                if not isinstance(v, Leaf):
                    pos = e
                    continue
                # A huge SPTE partly inside the range goes whole.
                lo, hi = align(s, level), e
                if level > 1:
                    hi = align(e - 1, level) + PAGES[level]
                if root.is_mirror:
                    await self.remove_external_spte(root, level, lo, hi, v)
                else:
                    if hb.ACTIVE:
                        # tdp_mmu_set_spte_atomic() when shared, else WRITE_ONCE under the write lock
                        kind = hb.ATOMIC_RMW if shared else hb.WRITE_ONCE
                        for gfn in range(lo, hi, PAGES[level]):
                            hb.access(kind, "spte", root, level, gfn)
                    self.handle_changed_spte(root, level, lo, v, None, shared)
                    root.levels[level].clear(lo, hi)
                flushed = True
                pos = hi
                if can_yield and need_resched():
                    await self._cond_resched(shared)
        return flushed

    async def _cond_resched(self, shared: bool) -> None:
        """cond_resched_rwlock_read/write(): drop mmu_lock, reschedule, take it again."""
        lock = self.vm.mmu_lock
        # need_resched() was already drawn by the caller: this reschedule is decided.
        if shared:
            await lock.read_unlock()
            await spin_yield()
            await lock.read_lock()
        else:
            await lock.write_unlock()
            await spin_yield()
            await lock.write_lock()

    def mapped_leaves(self, start: int, end: int) -> list[tuple[Root, int, int, Leaf]]:
        """Every leaf in every live root over [start, end): for the oracles."""
        return [(root, s, e, v) for root in self.roots for s, e, v in root.leaves(start, end)]


def _fmt(v: Any, gfn: int) -> str:
    if isinstance(v, Leaf):
        return f"pfn={v.pfn(gfn):#x}/L{v.level}{'/P' if v.private else ''}"
    return "none" if v is None else repr(v)


__all__ = [
    "FROZEN",
    "MMIO",
    "PAGES",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "READ",
    "TABLE",
    "WRITE",
    "KvmMmuPage",
    "Leaf",
    "Root",
    "TdpMmu",
    "align",
]
