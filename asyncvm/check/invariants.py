"""The memory-model oracles of one VM: stale mappings, the sequence rule, begin/end balance,
attribute agreement and object lifetimes (kvm-core.md section 0, invariants 1-4, 7, 8, 10, 11).

Each is checked where it is cheapest (when an SPTE is installed, or over an invalidation's range
when it ends) and once more when the execution is quiescent. None of them trusts the model's own
retry logic: they keep their own record of which invalidation covered which gfns and when.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..intervals import IntervalMap
from ..kvm.invalidate import Invalidation
from ..runtime import traps
from ..runtime.failures import Violation

if TYPE_CHECKING:
    from ..kvm.vm import Vm
    from ..x86.mmu.tdp_mmu import Leaf, Root


class VmOracles:
    """Every memory-model oracle for one VM."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        #: advances at every begin and end: "when" for the sequence rule
        self.clock = 0
        self.open: list[Invalidation] = []
        #: gfn -> clock at which the last invalidation covering it ended, per mapping kind
        self.ended_at = {True: IntervalMap[int](), False: IntervalMap[int]()}
        self.kvm_bugs: list[str] = []
        self.warnings: list[str] = []
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    # -- bookkeeping fed by the invalidation protocol -----------------------------------------
    def invalidate_begin(self, source: str) -> Invalidation:
        self.clock += 1
        inv = Invalidation(source, self.clock)
        self.open.append(inv)
        return inv

    def invalidate_range_add(self, inv: Invalidation, start: int, end: int) -> None:
        inv.ranges.append((start, end))

    def orphan_invalidation(self, source: str) -> Invalidation:
        """An end with no matching begin (the model is unbalanced; the balance check reports it)."""
        return Invalidation(source, self.clock)

    def invalidate_end(self, inv: Invalidation) -> None:
        self.clock += 1
        inv.ended = self.clock
        if inv in self.open:
            self.open.remove(inv)
        for start, end in inv.ranges:
            for private in (True, False):
                self.ended_at[private].assign(start, end, self.clock)
            self._check_range_after_invalidation(inv, start, end)

    # -- checks at the event -------------------------------------------------------------------
    def check_install(self, vcpu: Any, fault: Any, root: Root, base: int, npages: int, leaf: Leaf) -> None:
        """Sequence rule: no invalidation covering these gfns may have run since the fault's snapshot."""
        for inv in self.open:
            for start, end in inv.ranges:
                if start < base + npages and base < end:
                    raise Violation(
                        "stale_install",
                        f"{vcpu.name} installs gfn {fault.gfn:#x} (pfn {fault.pfn:#x}) while the {inv.source} "
                        f"invalidation of [{start:#x}, {end:#x}) is in progress",
                        signature=f"stale_install:{inv.source}",
                        gfn=fault.gfn,
                    )
        for _s, _e, ended in self.ended_at[leaf.private].overlaps(base, base + npages):
            if ended > fault.snapshot_clock:
                raise Violation(
                    "stale_install",
                    f"{vcpu.name} installs gfn {fault.gfn:#x} (pfn {fault.pfn:#x}) from a snapshot taken before "
                    "an invalidation of that gfn ended (mmu_invalidate_seq moved)",
                    signature="stale_install:seq",
                    gfn=fault.gfn,
                )

    def on_spte_install(self, root: Root, base: int, npages: int, leaf: Leaf) -> None:
        """Nothing may ever map a freed pfn."""
        if self.vm.kvm.allocator.is_freed(leaf.pfn(base)):
            raise Violation(
                "mapped_freed_pfn",
                f"{root.name}: gfn {base:#x} mapped to freed pfn {leaf.pfn(base):#x}",
                signature="mapped_freed_pfn:install",
                gfn=base,
            )

    def on_populate(self, gfn: int) -> None:
        """kvm_gmem_populate() may only write PRIVATE gfns."""
        if not self.vm.mem_is_private(gfn):
            raise Violation(
                "populate_shared",
                f"populate of gfn {gfn:#x}, which is not PRIVATE",
                signature="populate_shared",
                gfn=gfn,
            )

    def on_kvm_bug(self, reason: str) -> None:
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
        """A WARN_ON in the kernel: recorded and reported at quiescence."""
        self.warnings.append(message)
        traps.emit("warn", self.vm, message=message)

    # -- range checks --------------------------------------------------------------------------
    def _backing_pfn(self, root: Root, gfn: int, private: bool) -> int | None:
        """The pfn the gfn is backed by now (guest_memfd folio or host page), if any."""
        vm = self.vm
        slot = vm.gfn_to_memslot(gfn, root.as_id)
        if slot is None:
            return None
        if private:
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
        if not vm.arch.has_private_mem(vm):
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

    def _check_range_after_invalidation(self, inv: Invalidation, start: int, end: int) -> None:
        when = f"after the {inv.source} invalidation ended"
        for root, s, e, leaf in self.vm.arch.mmu.mapped_leaves(start, end):
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
        vm.arch.at_quiescence(vm)
