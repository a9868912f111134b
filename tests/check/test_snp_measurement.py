"""The SNP measurement oracle: the launch digest covers exactly the pages that stay in the guest."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm.check import snp as oracle
from asyncvm.explore.scenarios import load_bundled
from asyncvm.kvm import trace as kvm_trace

load_bundled()

BUG = "populate_without_invalidate_lock"
SCENARIO = "snp_launch_update_vs_punch_hole"


def test_populate_without_the_invalidate_lock_racing_punch_hole_fires() -> None:
    report = asyncvm.explore(SCENARIO, bugs=[BUG], runs=300, seed=0)
    assert "snp_measured_page_gone:populate" in report.signatures, report.summary()
    failure = next(f for f in report.failures if f.signature == "snp_measured_page_gone:populate")
    again = asyncvm.replay(failure.schedule, SCENARIO)
    assert again.failure is not None and again.failure.signature == failure.signature


def _is_populated(cell: object) -> bool:
    try:
        return getattr(cell.cell_contents, "__name__", "") == "populated"  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return False


def test_without_the_oracle_the_truncated_page_goes_unnoticed() -> None:
    """The model keeps the truncated folio alive until populate drops it and the RMP hooks
    clean up, so no other oracle sees that the digest covers a page the guest lost."""
    tp = kvm_trace.trace_kvm_gmem_populated
    mine = [p for p in tp.probes if any(_is_populated(c) for c in p.__closure__ or ())]
    assert len(mine) == 1
    tp.unregister(mine[0])
    try:
        report = asyncvm.explore(SCENARIO, bugs=[BUG], runs=300, seed=0)
    finally:
        tp.register(mine[0])
    assert not [s for s in report.signatures if s.startswith("snp_measured")]
    assert report.ok, report.summary()


@pytest.mark.parametrize(
    "scenario",
    [SCENARIO, "snp_launch_update_vs_fallocate", "snp_launch_update_vs_prefault", "snp_post_launch_faults"],
)
def test_correct_model_is_clean(scenario: str) -> None:
    report = asyncvm.explore(scenario, runs=200, seed=0)
    assert report.ok, report.summary()


def test_a_replaced_page_at_launch_finish_is_reported() -> None:
    """Direct check of the finish rule: a measured gfn that maps another page when the digest
    becomes final (the guest would run unmeasured content as measured)."""

    class _Slot:
        gmem_file = None

    class _Vm:
        def gfn_to_memslot(self, gfn: int) -> object:
            return _Slot()

    o = oracle.SnpOracles.__new__(oracle.SnpOracles)
    o.vm = _Vm()  # type: ignore[assignment]
    o.measured = {2: 0x100}
    o._guest_pfn = lambda gfn: 0x200  # type: ignore[method-assign]
    with pytest.raises(asyncvm.runtime.Violation, match="not the measured pfn"):
        o.launch_finish()
    o._guest_pfn = lambda gfn: None  # type: ignore[method-assign]
    o.launch_finish()  # a hole the VMM punched is fine


def test_a_punched_measured_page_leaves_the_finish_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAUNCH_UPDATE, PUNCH_HOLE, a new page at that gfn, LAUNCH_FINISH: legal for the VMM (the
    guest must validate the new page), so the finish rule forgets a measured page once it is freed."""

    class _Folio:
        pfn = 0x100
        npages = 1

    class _Firmware:
        def __init__(self) -> None:
            self.rmp: dict[int, object] = {}

    o = oracle.SnpOracles.__new__(oracle.SnpOracles)
    o.measured = {2: 0x100, 3: 0x101}
    o._guest_pfn = lambda gfn: 0x200 if gfn == 2 else 0x101  # type: ignore[method-assign]
    sev = type("Sev", (), {"firmware": _Firmware()})()
    monkeypatch.setattr(oracle, "to_kvm_sev", lambda vm: sev)
    o.vm = object()  # type: ignore[assignment]
    o.page_freed(_Folio())  # type: ignore[arg-type]
    assert o.measured == {3: 0x101}
    o.launch_finish()
