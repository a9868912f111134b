"""The TDX oracles (kvm-coco.md 0.6, 5.3): who may create private leaves before FINALIZE, which
pages INIT_MEM_REGION put in the image, and the coherence of the mirror root with the S-EPT.

They watch the populate and S-EPT tracepoints and keep their own record of which task is
populating which gfn; the TD's state (``nr_premapped``, the module's S-EPT) is read, never fed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..host.pages import Folio, trace_mm_page_free
from ..kvm import trace as kvm_trace
from ..runtime import traps
from ..runtime.failures import Violation
from ..x86 import trace as x86_trace
from ..x86.tdx.tdx import TD_STATE_RUNNABLE, is_td, to_kvm_tdx
from .registry import Registry, watched

if TYPE_CHECKING:
    from ..kvm.vm import Vm


class TdxOracles:
    """The TDX oracles of one TD."""

    def __init__(self, vm: Vm) -> None:
        self.vm: Vm = watched(vm)
        #: task -> the gfn it is populating now (between kvm_gmem_populate's two tracepoints)
        self.populating: dict[Any, int] = {}
        #: gfns INIT_MEM_REGION told userspace it added, in order
        self.populated: list[int] = []
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    def populate(self, gfn: int) -> None:
        self.populating[traps.current()] = gfn

    def populated_one(self, gfn: int, pfn: int, r: int) -> None:
        self.populating.pop(traps.current(), None)

    def init_mem_region_page(self, gfn: int) -> None:
        self.populated.append(gfn)

    def private_leaf_before_finalize(self, gfn: int, level: int, pfn: int) -> None:
        """Before FINALIZE the only producer of private leaves is INIT_MEM_REGION; anything else (a
        pre-fault, a guest fault) leaves a mirror leaf that never gets PAGE.ADD. Checked ahead of
        the kernel's own backstops, which would only say that *something* went wrong."""
        if self.populating.get(traps.current()) != gfn:
            raise Violation(
                "tdx_premapped",
                f"private leaf for gfn {gfn:#x} installed before FINALIZE outside KVM_TDX_INIT_MEM_REGION",
                signature="tdx_premapped:not_populate",
                gfn=gfn,
            )

    def page_freed(self, folio: Folio) -> None:
        """A page may not be freed while the S-EPT still maps it."""
        vm = self.vm
        if vm.dead:
            return  # after a KVM_BUG the leak is the kernel's accepted outcome; kvm_bug reports it
        for gfn, leaf in to_kvm_tdx(vm).module.sept.items():
            if folio.contains(leaf.pfn):
                raise Violation(
                    "tdx_freed_page",
                    f"pfn {leaf.pfn:#x} freed while the S-EPT still maps gfn {gfn:#x} ({leaf.state})",
                    signature="tdx_freed_page:free",
                    gfn=gfn,
                )

    def at_quiescence(self) -> None:
        """Mirror/S-EPT coherence, nr_premapped, and every page INIT_MEM_REGION reported in the image
        (a GPA added twice is caught at the PAGE.ADD, module.py: tdh_mem_page_add())."""
        vm = self.vm
        kvm_tdx = to_kvm_tdx(vm)
        t19 = vm.profile.tdx_flow == "T19"
        nr_premapped = kvm_tdx.nr_premapped
        if nr_premapped < 0:
            raise Violation("tdx_premapped", f"nr_premapped is {nr_premapped}", signature="tdx_premapped:negative")
        if kvm_tdx.state == TD_STATE_RUNNABLE and not t19 and nr_premapped:
            raise Violation(
                "tdx_premapped", f"{nr_premapped} pages premapped after FINALIZE", signature="tdx_premapped:final"
            )
        mirror: dict[int, int] = {}
        for root in vm.arch.mmu.roots:
            if root.is_mirror and not root.invalid:
                for s, e, leaf in root.leaves(0, 1 << 52):
                    for gfn in range(s, e):
                        mirror[gfn] = leaf.pfn(gfn)
        sept = {gfn: leaf.pfn for gfn, leaf in kvm_tdx.module.sept.items()}
        premapped = [g for g in mirror if g not in sept]
        if not t19 and len(premapped) < nr_premapped:
            # Quiescent: no populate is between its map and its PAGE.ADD, so the counter must be
            # exactly the number of mirror leaves still waiting for PAGE.ADD (a failed ADD leaves
            # one behind and counted; a zap of one uncounts it).
            raise Violation(
                "tdx_premapped",
                f"nr_premapped is {nr_premapped} but only {len(premapped)} mirror leaves lack an S-EPT leaf",
                signature="tdx_premapped:drift",
            )
        if len(premapped) > max(nr_premapped, 0) or (t19 and premapped):
            raise Violation(
                "sept_incoherent",
                f"mirror SPTEs without an S-EPT leaf: {[hex(g) for g in premapped[:4]]} (nr_premapped={nr_premapped})",
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
        if kvm_tdx.state == TD_STATE_RUNNABLE and set(self.populated) - set(kvm_tdx.module.added_pages):
            raise Violation(
                "tdx_missing_add",
                "INIT_MEM_REGION reported pages that were never PAGE.ADDed before FINALIZE",
                signature="tdx_missing_add",
            )


#: the TDX oracles of every TD alive
ORACLES: Registry[TdxOracles] = Registry()


def _on_create_vm(vm: Vm) -> None:
    if is_td(vm):
        ORACLES.add(vm, TdxOracles(vm))


def attach() -> None:
    """Register the TDX oracles' probes (once)."""
    ORACLES.attach(
        [
            (kvm_trace.trace_kvm_create_vm, _on_create_vm),
            (kvm_trace.trace_kvm_gmem_populate, ORACLES.probe(TdxOracles.populate)),
            (kvm_trace.trace_kvm_gmem_populated, ORACLES.probe(TdxOracles.populated_one)),
            (x86_trace.trace_tdx_init_mem_region_page, ORACLES.probe(TdxOracles.init_mem_region_page)),
            (x86_trace.trace_tdx_sept_set_private_spte, ORACLES.probe(TdxOracles.private_leaf_before_finalize)),
            (trace_mm_page_free, ORACLES.page_free_probe(TdxOracles.page_freed)),
        ]
    )
