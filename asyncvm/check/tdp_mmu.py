"""The TDP MMU structure oracles: nothing is installed into an invalid root, and the shadow pages
agree with the non-leaf SPTEs that link them (arch/x86/kvm/mmu/tdp_mmu.c).

An invalid root is on its way out: kvm_tdp_mmu_invalidate_roots() marked it under mmu_lock held
for write, its zap may already have passed, and its last reference frees it with whatever it still
maps. A fault re-checks under mmu_lock (is_page_fault_stale() -> is_obsolete_root()) exactly so
that it never installs there; a present SPTE appearing in an invalid root is the bug, whether or
not anything maps the page later. The check runs on every SPTE change, so it costs one attribute
test per change.

At quiescence every live root's page tables must hang together: each non-leaf SPTE links exactly
one shadow page whose ``ptep`` points back at it, every leaf below the top level sits in a table
that is linked, and ``kvm->arch.tdp_mmu_pages`` counts the linked pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..kvm import trace as kvm_trace
from ..runtime import traps
from ..runtime.failures import Violation
from ..x86 import trace as x86_trace
from ..x86.mmu.tdp_mmu import PAGES, TABLE, Leaf, Root
from .registry import Registry, watched

if TYPE_CHECKING:
    from ..kvm.vm import Vm


def _on_spte_changed(vm: Vm, root: Root, level: int, gfn: int, old: Any, new: Any) -> None:
    """No present (or MMIO) SPTE may appear in an invalid or freed root."""
    if new is not None and (root.invalid or root.freed):
        what = "table" if new is TABLE else "leaf" if type(new) is Leaf else repr(new)
        raise Violation(
            "install_invalid_root",
            f"{what} installed at gfn {gfn:#x} (level {level}) in {'freed' if root.freed else 'invalid'} "
            f"{root.name}, whose zap may already have run (is_page_fault_stale() must see it obsolete)",
            signature="install_invalid_root",
            root=root.name,
            gfn=gfn,
            level=level,
        )


class TdpMmuOracles:
    """The quiescence check of one VM's TDP MMU page tables."""

    def __init__(self, vm: Vm) -> None:
        self.vm: Vm = watched(vm)
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    def at_quiescence(self) -> None:
        mmu = self.vm.arch.mmu
        linked = 0
        for root in mmu.roots:
            linked += len(root.sps)
            check_root_links(root)
        if linked != mmu.nr_pages:
            raise Violation(
                "tdp_mmu_sp_links",
                f"tdp_mmu_pages is {mmu.nr_pages} but {linked} shadow pages are linked below live roots",
                signature="tdp_mmu_sp_links:accounting",
            )


def check_root_links(root: Root) -> None:
    """Each non-leaf SPTE of `root` links one shadow page pointing back at it, each shadow page
    hangs from a non-leaf SPTE, and each leaf or table below the top level is in a linked table."""
    tables: set[tuple[int, int]] = set()
    for level in (3, 2):
        for s, e, v in root.levels[level].items():
            if v is TABLE:
                for base in range(s, e, PAGES[level]):
                    tables.add((level, base))
    for key in tables:
        sp = root.sps.get(key)
        if sp is None or sp.ptep != key or sp.root is not root:
            raise Violation(
                "tdp_mmu_sp_links",
                f"{root.name}: the non-leaf SPTE at level {key[0]} gfn {key[1]:#x} links no shadow page",
                signature="tdp_mmu_sp_links:unlinked_table",
                root=root.name,
            )
    for key in root.sps:
        if key not in tables:
            raise Violation(
                "tdp_mmu_sp_links",
                f"{root.name}: shadow page below level {key[0]} gfn {key[1]:#x} hangs from no non-leaf SPTE",
                signature="tdp_mmu_sp_links:dangling_sp",
                root=root.name,
            )
    for level in (2, 1):
        span = PAGES[level + 1]
        for s, e, v in root.levels[level].items():
            if type(v) is Leaf or (v is TABLE and level == 2):
                for base in range(s - s % span, e, span):
                    if (level + 1, base) not in tables:
                        raise Violation(
                            "tdp_mmu_sp_links",
                            f"{root.name}: {'leaf' if v is not TABLE else 'table'} at level {level} gfn "
                            f"{max(s, base):#x} sits in no linked table",
                            signature="tdp_mmu_sp_links:orphan_leaf",
                            root=root.name,
                        )


#: the TDP MMU oracles of every VM alive
ORACLES: Registry[TdpMmuOracles] = Registry()


def _on_create_vm(vm: Vm) -> None:
    ORACLES.add(vm, TdpMmuOracles(vm))


def attach() -> None:
    """Register the TDP MMU oracles' probes (once)."""
    ORACLES.attach(
        [
            (kvm_trace.trace_kvm_create_vm, _on_create_vm),
            (x86_trace.trace_kvm_tdp_mmu_spte_changed, _on_spte_changed),
        ]
    )
