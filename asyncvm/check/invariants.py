"""The memory-model oracles of one VM: stale mappings, the sequence rule, begin/end balance,
attribute agreement and object lifetimes (kvm-core.md section 0, invariants 1-4, 7, 8, 10, 11).

They learn what happens from the model's tracepoints (``kvm/trace.py``, ``x86/trace.py``) and
keep their own record of which invalidation covered which gfns and when, so none of them trusts
the model's retry logic. Each check runs where it is cheapest (when an SPTE is installed, or
over an invalidation's range when it ends) and once more when the execution is quiescent.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..host.pages import trace_mm_page_free
from ..intervals import IntervalMap
from ..kvm import trace as kvm_trace
from ..kvm.guest_memfd import KVM_MEMSLOT_GMEM_ONLY
from ..runtime import traps
from ..runtime.failures import Violation
from ..x86 import trace as x86_trace
from ..x86.mmu.tdp_mmu import PAGES, Leaf
from .registry import Registry, watched

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm
    from ..x86.mmu.fault import KvmPageFault
    from ..x86.mmu.tdp_mmu import Root


def _step() -> int | None:
    """The scheduling step running now (None in live mode)."""
    exe = traps._get_exe()
    return None if exe is None else exe.step


@dataclass(eq=False)
class Invalidation:
    """One begin..end window as the oracles saw it: who ran it, what it covered and when (the
    oracles' clock, and the scheduling steps of its begin and end)."""

    source: str
    began: int
    began_step: int | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    ended: int | None = None
    ended_step: int | None = None


class VmOracles:
    """Every memory-model oracle for one VM."""

    def __init__(self, vm: Vm) -> None:
        self.vm: Vm = watched(vm)
        #: advances at every begin and end: "when" for the sequence rule
        self.clock = 0
        self.open: list[Invalidation] = []
        #: the windows each task has open, innermost last (begin and end run in the same task)
        self.windows: defaultdict[Any, list[Invalidation]] = defaultdict(list)
        #: what each task announced it is invalidating for, until its next begin
        self.source: dict[Any, str] = {}
        #: gfn -> the last invalidation covering it that ended, per mapping kind
        self.ended_at = {True: IntervalMap[Invalidation](), False: IntervalMap[Invalidation]()}
        #: fault -> (clock, step) when it snapshot mmu_invalidate_seq (a plain dict under a controlled
        #: execution, which drops it with the oracles; weak in live mode, where faults come and go)
        self.snapshots: (
            dict[KvmPageFault, tuple[int, int | None]] | weakref.WeakKeyDictionary[KvmPageFault, tuple[int, int | None]]
        ) = {} if traps.active() is not None else weakref.WeakKeyDictionary()
        #: pfn -> the step that freed its folio (to name it in a report)
        self.freed_at: dict[int, int | None] = {}
        self.kvm_bugs: list[str] = []
        self.warnings: list[str] = []
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    # -- the invalidation protocol -------------------------------------------------------------
    def announce(self, source: str) -> None:
        self.source[traps.current()] = source

    def invalidate_begin(self) -> None:
        task = traps.current()
        self.clock += 1
        inv = Invalidation(self.source.pop(task, "unknown"), self.clock, _step())
        self.open.append(inv)
        self.windows[task].append(inv)

    def invalidate_range_add(self, start: int, end: int) -> None:
        if self.vm.mmu_invalidate_in_progress <= 0:
            raise Violation(
                "invalidate_balance", "range_add outside begin/end", signature="invalidate_balance:range_add"
            )
        mine = self.windows.get(traps.current())
        if mine:
            mine[-1].ranges.append((start, end))

    def invalidate_end(self) -> None:
        if self.vm.mmu_invalidate_in_progress < 0:
            raise Violation(
                "invalidate_balance", "kvm_mmu_invalidate_end without a begin", signature="invalidate_balance:end"
            )
        mine = self.windows.get(traps.current())
        if not mine:
            return  # an end nobody began: the balance check at quiescence reports it
        inv = mine.pop()
        self.clock += 1
        inv.ended = self.clock
        inv.ended_step = _step()
        self.open.remove(inv)
        # the mmu_notifier's invalidation is of shared mappings only (KVM_FILTER_SHARED)
        kinds = (False,) if inv.source == "mmu_notifier" else (True, False)
        for start, end in inv.ranges:
            for private in kinds:
                self.ended_at[private].assign(start, end, inv)
            self._check_range_after_invalidation(inv, start, end)

    # -- checks at the event -------------------------------------------------------------------
    def fault_snapshot(self, fault: KvmPageFault) -> None:
        self.snapshots[fault] = (self.clock, _step())

    def page_freed(self, folio: Any) -> None:
        """No mapping outlives the memory it points to (kvm-core.md): a folio may only be freed
        once no SPTE of any root maps any of its pfns. Whoever frees guest memory zaps first (the
        invalidation around a truncation or munmap, kvm_arch_flush_shadow_memslot() before a
        memslot goes); a leaf still mapping the folio now gives the guest a freed page."""
        step = _step()
        for pfn in range(folio.pfn, folio.pfn + folio.npages):
            self.freed_at[pfn] = step
        if isinstance(sys.exc_info()[1], Violation):
            # a `finally:` putting a reference while an oracle's finding propagates (e.g. the
            # stale install this free follows): that finding is the report, not this consequence
            return
        self._check_unmapped(folio, step)

    def _check_unmapped(self, folio: Any, step: int | None) -> None:
        """No leaf SPTE of any root, live or invalid, maps a pfn of `folio` (one pass over the
        leaf runs: a run maps a contiguous pfn range, so each is one interval test)."""
        lo, hi = folio.pfn, folio.pfn + folio.npages
        for root, s, e, leaf in self.vm.arch.mmu.mapped_leaves(0, 1 << 52):
            # the run maps pfns [p0, p0 + e - s): does that meet the folio's [lo, hi)?
            p0 = leaf.pfn(s)
            first = max(lo, p0)
            if first < min(hi, p0 + e - s):
                gfn = s + first - p0
                raise Violation(
                    "mapped_freed_pfn",
                    f"{root.name}: pfn {first:#x} ({folio.owner}) freed while gfn {gfn:#x} still maps it",
                    signature="mapped_freed_pfn:free",
                    gfn=gfn,
                    pfn=first,
                    steps={"pfn_freed": step},
                )

    def memslot_freed(self, slot: Any) -> None:
        """kvm_main.c: kvm_set_memslot(): a DELETE or MOVE zaps the old slot's range
        (kvm_invalidate_memslot() -> kvm_arch_flush_shadow_memslot()) before
        kvm_commit_memory_region() frees the slot. A leaf SPTE left in that range maps memory
        through a slot that no longer exists, which no later invalidation of it will reach. Only
        gfns no live slot covers count: a MOVE's new slot (or a slot created since) may overlap
        the old range, and its mappings there are its own."""
        live = self.vm.memslots[slot.as_id]
        for root, s, e, leaf in self.vm.arch.mmu.mapped_leaves(slot.base_gfn, slot.end_gfn):
            if root.as_id != slot.as_id:
                continue
            gfn, end = max(s, slot.base_gfn), min(e, slot.end_gfn)
            # skip the part of [gfn, end) that live slots cover, from the left
            for other in sorted(live.overlapping(gfn, end), key=lambda m: m.base_gfn):
                if other.base_gfn > gfn:
                    break
                gfn = max(gfn, other.end_gfn)
            if gfn < end:
                raise Violation(
                    "stale_spte",
                    f"{root.name}: gfn {gfn:#x} of freed memslot {slot.id} still maps pfn {leaf.pfn(gfn):#x} "
                    "(kvm_arch_flush_shadow_memslot() did not zap it)",
                    signature="stale_spte:memslot_freed",
                    gfn=gfn,
                    pfn=leaf.pfn(gfn),
                )

    def _race_steps(self, fault: KvmPageFault, inv: Invalidation | None) -> dict[str, int | None]:
        """The steps that make a stale install a race: the snapshot, the invalidation's begin (and
        end), the free of the pfn, and the install itself (now)."""
        steps: dict[str, int | None] = {"snapshot": self.snapshots.get(fault, (0, None))[1]}
        if inv is not None:
            steps["invalidate_begin"] = inv.began_step
            if inv.ended_step is not None:
                steps["invalidate_end"] = inv.ended_step
        if fault.pfn in self.freed_at:
            steps["pfn_freed"] = self.freed_at[fault.pfn]
        steps["install"] = _step()
        return steps

    def check_install(self, vcpu: Vcpu, fault: KvmPageFault, root: Root, base: int, npages: int, leaf: Leaf) -> None:
        """Sequence rule: no invalidation covering these gfns may have run since the fault's snapshot."""
        for inv in self.open:
            if leaf.private and inv.source == "mmu_notifier":
                # the mmu_notifier zaps shared mappings only (KVM_FILTER_SHARED): a private install
                # meanwhile (6.19's INIT_MEM_REGION maps with no sequence check) is not stale
                continue
            for start, end in inv.ranges:
                if start < base + npages and base < end:
                    raise Violation(
                        "stale_install",
                        f"{vcpu.name} installs gfn {fault.gfn:#x} (pfn {fault.pfn:#x}) while the {inv.source} "
                        f"invalidation of gfn=[{start:#x},{end:#x}) is in progress",
                        signature=f"stale_install:{inv.source}",
                        gfn=fault.gfn,
                        pfn=fault.pfn,
                        steps=self._race_steps(fault, inv),
                    )
        snapshot = self.snapshots.get(fault, (0, None))[0]
        for _s, _e, ended in self.ended_at[leaf.private].overlaps_unclipped(base, base + npages):
            if ended.ended is not None and ended.ended > snapshot:
                raise Violation(
                    "stale_install",
                    f"{vcpu.name} installs gfn {fault.gfn:#x} (pfn {fault.pfn:#x}) from a snapshot taken before "
                    f"the {ended.source} invalidation of that gfn ended (mmu_invalidate_seq moved)",
                    signature="stale_install:seq",
                    gfn=fault.gfn,
                    pfn=fault.pfn,
                    steps=self._race_steps(fault, ended),
                )

    def spte_changed(self, root: Root, base: int, npages: int, new: Any) -> None:
        """Nothing may ever map a freed pfn."""
        pfn = new.pfn(base)
        if type(new) is Leaf and self.vm.kvm.allocator.is_freed(pfn):
            raise Violation(
                "mapped_freed_pfn",
                f"{root.name}: gfn {base:#x} mapped to freed pfn {pfn:#x}",
                signature="mapped_freed_pfn:install",
                gfn=base,
                pfn=pfn,
                steps={"pfn_freed": self.freed_at.get(pfn), "install": _step()},
            )

    def populate(self, gfn: int) -> None:
        """kvm_gmem_populate() may only write PRIVATE gfns."""
        if not self.vm.mem_is_private(gfn):
            raise Violation(
                "populate_shared",
                f"populate of gfn {gfn:#x}, which is not PRIVATE",
                signature="populate_shared",
                gfn=gfn,
            )

    def kvm_bug(self, reason: str) -> None:
        """A KVM_BUG_ON fired: a kernel bug. The execution is marked failed here, at the step that
        hit it, but goes on: the VMM sees what the kernel gives it (-EIO from a dead VM)."""
        self.kvm_bugs.append(reason)
        exe = traps.active()
        if exe is not None:
            exe.fail(self._kvm_bug_violation())

    def _kvm_bug_violation(self) -> Violation:
        return Violation(
            "kvm_bug",
            f"KVM_BUG_ON in vm{self.vm.id}: {self.kvm_bugs[0]}",
            signature="kvm_bug:" + re.sub(r"0x[0-9a-fA-F]+|\d+", "N", self.kvm_bugs[0]),
            reasons=list(self.kvm_bugs),
        )

    def warn(self, message: str) -> None:
        """A WARN in the kernel: recorded and reported at quiescence."""
        self.warnings.append(message)

    # -- range checks --------------------------------------------------------------------------
    def _backing_pfn(self, root: Root, gfn: int, private: bool) -> int | None:
        """The pfn the gfn is backed by now (guest_memfd folio or host page), if any."""
        vm = self.vm
        slot = vm.gfn_to_memslot(gfn, root.as_id)
        if slot is None:
            return None
        if private or slot.flags & KVM_MEMSLOT_GMEM_ONLY:  # [6.18] shared memory from guest_memfd too
            file = slot.gmem_file
            if file is None:
                return None
            folio = file.inode.folios.get(slot.gfn_to_pgoff(gfn))
            return None if folio is None else folio.pfn
        hit = vm.kvm.mm.ptes.get(slot.gfn_to_hva(gfn) >> uapi.PAGE_SHIFT)
        if hit is None:
            return None
        folio, base = hit
        return folio.pfn + (slot.gfn_to_hva(gfn) >> uapi.PAGE_SHIFT) - base

    def _check_leaf(self, root: Root, s: int, e: int, leaf: Leaf, when: str) -> None:
        """Every folio a leaf run maps must be live and still back its gfns.

        A run of shared 4K SPTEs with consecutive pfns is one Leaf but may span many host folios,
        so the walk visits each folio the run touches (one step per folio, not per page: a 1 GiB
        mapping of one 1 GiB folio is one check)."""
        vm = self.vm
        gfn = s
        while gfn < e:
            pfn = leaf.pfn(gfn)
            folio = vm.kvm.allocator.folio_at(pfn)
            if folio is None or folio.freed:
                raise Violation(
                    "mapped_freed_pfn",
                    f"{root.name}: gfn {gfn:#x} still maps freed pfn {pfn:#x} {when}",
                    signature="mapped_freed_pfn",
                    gfn=gfn,
                    pfn=pfn,
                )
            backing = self._backing_pfn(root, gfn, leaf.private)
            if backing != pfn and not root.invalid:
                raise Violation(
                    "stale_spte",
                    f"{root.name}: gfn {gfn:#x} maps pfn {pfn:#x} but is backed by "
                    f"{'nothing' if backing is None else hex(backing)} {when}",
                    signature="stale_spte",
                    gfn=gfn,
                    pfn=pfn,
                )
            gfn += 1 if leaf.private else max(1, folio.pfn + folio.npages - pfn)

    def _check_attributes(self, root: Root, s: int, e: int, leaf: Leaf, when: str) -> None:
        vm = self.vm
        if not vm.arch.has_private_mem:
            return
        want = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if leaf.private else 0
        if not vm.range_has_attributes(s, e, want):
            raise Violation(
                "attribute_mismatch",
                f"{root.name}: {'private' if leaf.private else 'shared'} mapping of gfns [{s:#x}, {e:#x}) "
                f"disagrees with their memory attributes {when}",
                signature="attribute_mismatch",
                gfn=s,
            )

    def _check_folio_references(self) -> None:
        """No transient reference outlives its user: once every task is done, a live folio is held
        only by its owner and its host mappings -- a file's page cache (one reference) plus one
        per host PTE mapping a page of it, or, for anonymous memory, the mapping that faulted it
        in (one reference however many PTEs map it). A reference taken to resolve a fault or for
        GUP and never put (kvm_release_faultin_page(), put_page()) pins the folio for ever."""
        kvm = self.vm.kvm
        mapped: dict[int, int] = {}
        for s, e, (folio, _base) in kvm.mm.ptes.items():
            mapped[id(folio)] = 1 if folio.owner == "anon" else mapped.get(id(folio), 0) + e - s
        for folio in kvm.allocator.folios():
            if folio.freed:
                continue
            held = (0 if folio.owner == "anon" else 1) + mapped.get(id(folio), 0)
            if folio.refcount != held:
                raise Violation(
                    "folio_leak",
                    f"pfn {folio.pfn:#x} ({folio.owner}) has refcount {folio.refcount} at quiescence, "
                    f"but its owner and host mappings hold {held}",
                    signature=f"folio_leak:{folio.owner}",
                    pfn=folio.pfn,
                )

    def _check_range_after_invalidation(self, inv: Invalidation, start: int, end: int) -> None:
        when = f"after the {inv.source} invalidation ended"
        for root, s, e, leaf in self.vm.arch.mmu.mapped_leaves(start, end):
            if leaf.private and inv.source == "mmu_notifier":
                # virt/kvm/kvm_main.c: kvm_mmu_notifier_invalidate_range_start() zaps with
                # KVM_FILTER_SHARED: private mappings are not the host mapping's to answer for
                # (and kvm_gmem_release() may have cleared their slot's file, about to zap them).
                continue
            lo, hi = max(s, start), min(e, end)
            self._check_leaf(root, lo, hi, leaf, when)
            self._check_attributes(root, lo, hi, leaf, when)

    # -- quiescence ----------------------------------------------------------------------------
    def at_quiescence(self) -> None:
        vm = self.vm
        if self.kvm_bugs:
            raise self._kvm_bug_violation()
        if self.warnings:
            # A WARN_ON is a kernel bug report too (syzkaller treats it as a crash).
            raise Violation(
                "kernel_warn",
                f"WARN in vm{vm.id}: {self.warnings[0]}",
                signature="kernel_warn:" + re.sub(r"0x[0-9a-fA-F]+|\d+", "N", self.warnings[0]),
                warnings=list(self.warnings),
            )
        if vm.mmu_invalidate_in_progress != 0 or self.open:
            raise Violation(
                "invalidate_balance",
                f"vm{vm.id} quiescent with mmu_invalidate_in_progress={vm.mmu_invalidate_in_progress} "
                f"({len(self.open)} invalidations never ended)",
                signature="invalidate_balance:quiescence",
            )
        if vm.mn_active_invalidate_count != 0:
            raise Violation(
                "invalidate_balance",
                f"vm{vm.id} quiescent with mn_active_invalidate_count={vm.mn_active_invalidate_count}",
                signature="invalidate_balance:mn_active",
            )
        for root, s, e, leaf in vm.arch.mmu.mapped_leaves(0, 1 << 52):
            self._check_leaf(root, s, e, leaf, "at quiescence")
            if not root.invalid:
                self._check_attributes(root, s, e, leaf, "at quiescence")
        for memslots in vm.memslots:
            for slot in memslots.by_id.values():
                file = slot.gmem_file
                if file is not None:
                    for _s, _e, bound in file.bindings.items():
                        if bound.freed:
                            raise Violation(
                                "memslot_uaf",
                                f"guest_memfd {file.name} still binds freed memslot {bound.id}",
                                signature="memslot_uaf:binding",
                            )
        self._check_folio_references()


#: the oracles of every VM alive, found from the VM a tracepoint names
ORACLES: Registry[VmOracles] = Registry()


def _on_create_vm(vm: Vm) -> None:
    ORACLES.add(vm, VmOracles(vm))


def _on_set_spte(vcpu: Vcpu, fault: KvmPageFault, root: Root, level: int, base: int, leaf: Leaf) -> None:
    oracles = ORACLES.get(vcpu.vm)
    if oracles is not None:
        oracles.check_install(vcpu, fault, root, base, PAGES[level], leaf)


def _on_spte_changed(vm: Vm, root: Root, level: int, gfn: int, old: Any, new: Any) -> None:
    if type(new) is Leaf:
        oracles = ORACLES.get(vm)
        if oracles is not None:
            oracles.spte_changed(root, gfn, PAGES[level], new)


def attach() -> None:
    """Register the memory-model oracles' probes (once)."""
    probe = ORACLES.probe
    ORACLES.attach(
        [
            (kvm_trace.trace_kvm_create_vm, _on_create_vm),
            (kvm_trace.trace_kvm_unmap_hva_range, probe(lambda o, s, e: o.announce("mmu_notifier"))),
            (kvm_trace.trace_kvm_gmem_invalidate, probe(lambda o, s, e: o.announce("guest_memfd"))),
            (kvm_trace.trace_kvm_vm_set_mem_attributes, probe(lambda o, s, e, a: o.announce("set_memory_attributes"))),
            (kvm_trace.trace_kvm_mmu_invalidate_begin, probe(VmOracles.invalidate_begin)),
            (kvm_trace.trace_kvm_mmu_invalidate_range_add, probe(VmOracles.invalidate_range_add)),
            (kvm_trace.trace_kvm_mmu_invalidate_end, probe(VmOracles.invalidate_end)),
            (kvm_trace.trace_kvm_gmem_populate, probe(VmOracles.populate)),
            (kvm_trace.trace_kvm_vm_bugged, probe(VmOracles.kvm_bug)),
            (kvm_trace.trace_kvm_memslot_freed, probe(VmOracles.memslot_freed)),
            (kvm_trace.trace_kvm_warn, probe(VmOracles.warn)),
            (x86_trace.trace_kvm_mmu_fault_snapshot, ORACLES.vcpu_probe(VmOracles.fault_snapshot)),
            (x86_trace.trace_kvm_mmu_set_spte, _on_set_spte),
            (x86_trace.trace_kvm_tdp_mmu_spte_changed, _on_spte_changed),
            (trace_mm_page_free, ORACLES.page_free_probe(VmOracles.page_freed)),
        ]
    )
