"""TDP MMU shadow pages and the install-into-an-invalid-root oracle (check/tdp_mmu.py)."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm.check import tdp_mmu as oracle
from asyncvm.explore.scenarios import load_bundled
from asyncvm.runtime.failures import Violation
from asyncvm.x86 import trace as x86_trace
from asyncvm.x86.mmu.tdp_mmu import PAGES, TABLE, Leaf, Root, TdpMmu

load_bundled()


def test_invalid_root_install_is_caught_with_the_bug() -> None:
    report = asyncvm.explore("fault_vs_zap_all", bugs=["fault_ignores_invalid_root"], runs=300, seed=0)
    assert "install_invalid_root" in report.signatures
    failure = next(f for f in report.failures if f.signature == "install_invalid_root")
    again = asyncvm.replay(failure.schedule, "fault_vs_zap_all")
    assert again.failure is not None and again.failure.signature == "install_invalid_root"


def test_without_the_oracle_the_same_campaign_misses_it() -> None:
    """The stale-mapping oracles skip invalid roots (their mappings are on the way out): only the
    install check sees the fault that raced the zap-all."""
    tp = x86_trace.trace_kvm_tdp_mmu_spte_changed
    tp.unregister(oracle._on_spte_changed)
    try:
        report = asyncvm.explore("fault_vs_zap_all", bugs=["fault_ignores_invalid_root"], runs=300, seed=0)
    finally:
        tp.register(oracle._on_spte_changed)
    assert report.ok, report.summary()


def test_correct_model_is_clean_and_links_its_shadow_pages() -> None:
    report = asyncvm.explore("fault_vs_zap_all", runs=300, seed=0)
    assert report.ok, report.summary()
    report = asyncvm.explore("prefault_vs_punch_hole", runs=100, seed=0)
    assert report.ok, report.summary()


class _Vm:
    """Just enough of a VM for the TDP MMU's bookkeeping."""

    class _Word:
        def write(self) -> None:
            pass

    def __init__(self) -> None:
        self.mmu_word = self._Word()
        self.bugs: tuple[str, ...] = ()


def _root_with_a_leaf() -> tuple[TdpMmu, Root]:
    mmu = TdpMmu(_Vm())  # type: ignore[arg-type]
    root = Root(1, 0, False)
    mmu.roots.append(root)
    for level in (3, 2):
        root.levels[level].assign(0, PAGES[level], TABLE)
        mmu.tdp_mmu_link_sp(root, level, 0)
    root.levels[1].assign(5, 6, Leaf(100, 1, True, False))
    return mmu, root


def test_linked_tables_pass() -> None:
    _mmu, root = _root_with_a_leaf()
    oracle.check_root_links(root)
    sp = root.sps[(2, 0)]
    assert (sp.level, sp.gfn, sp.ptep) == (1, 0, (2, 0))


@pytest.mark.parametrize(
    ("corrupt", "signature"),
    [
        (lambda mmu, root: root.sps.pop((2, 0)), "tdp_mmu_sp_links:unlinked_table"),
        (lambda mmu, root: root.levels[2].clear(0, 512 * 512), "tdp_mmu_sp_links:dangling_sp"),
        (lambda mmu, root: root.levels[1].assign(512 * 512, 512 * 512 + 1, Leaf(0, 1, True, False)), "orphan_leaf"),
    ],
)
def test_broken_links_are_reported(corrupt: object, signature: str) -> None:
    mmu, root = _root_with_a_leaf()
    corrupt(mmu, root)  # type: ignore[operator]
    with pytest.raises(Violation) as e:
        oracle.check_root_links(root)
    assert signature in e.value.signature


def test_freed_root_takes_its_pages_out_of_the_count() -> None:
    mmu, root = _root_with_a_leaf()
    assert mmu.nr_pages == 2
    root.invalid = True
    root.refcount = 1
    mmu.put_root(root)
    assert mmu.nr_pages == 0 and not root.sps
