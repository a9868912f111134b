"""Issue 12's own case: pre-fault vs PUNCH_HOLE with ``drop_invalidate_retry``. A PCT campaign
keeps each signature's smallest witness, and a random-strategy failure of a signature that has a
0-preemption witness shrinks to 0 preemptions; whatever shrinking leaves is 1-minimal."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm.explore.campaign import CampaignSpec
from asyncvm.explore.scenarios import REGISTRY, load_bundled
from asyncvm.explore.schedule import Schedule
from asyncvm.runtime.strategies import make_strategy

from ..runtime.test_shrink_minimal import _single_edits

load_bundled()

SCENARIO, BUG = "prefault_vs_punch_hole", "drop_invalidate_retry"
SPEC = {"scenario": SCENARIO, "bugs": [BUG]}
#: the signature the issue names: a stale install while the guest_memfd invalidation runs
STALE = "stale_install:guest_memfd"


def _first_failures(seed: int, runs: int = 200) -> list[Schedule]:
    """Each signature's first failing execution of a random walk, as found (not the smallest)."""
    spec = CampaignSpec(**SPEC, strategy="random", seed=seed)  # type: ignore[arg-type]
    program = spec.program()
    strategy = make_strategy("random", seed)
    out: dict[str, Schedule] = {}
    for i in range(runs):
        strategy.new_execution(i)
        r = program.run(strategy)
        if r.failure is not None and r.failure.signature not in out:
            again = program.rerun(r.choices, execution=i)
            out[r.failure.signature] = Schedule.from_execution(
                program, again, strategy=strategy.describe(), seed=seed, execution=i
            )
    return list(out.values())


def test_pct_campaign_keeps_a_0_preemption_witness() -> None:
    report = asyncvm.explore(SCENARIO, bugs=[BUG], strategy="pct", runs=600, seed=1)
    found = report.first(STALE)
    assert found is not None
    assert found.schedule.preemptions == 0, (found.first_run, found.schedule.execution, found.schedule.preemptions)
    for f in report.failures:
        assert asyncvm.replay(f.schedule, REGISTRY[SCENARIO].fn).failure.signature == f.signature  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [1])
def test_random_failures_shrink_to_the_minimum_and_say_so(seed: int) -> None:
    fn = REGISTRY[SCENARIO].fn
    failures = _first_failures(seed)
    stale = [s for s in failures if s.signature == STALE]
    assert stale and stale[0].preemptions > 0, [(s.signature, s.preemptions) for s in failures]
    shrunk = {s.signature: asyncvm.shrink(s, fn) for s in failures}
    assert shrunk[STALE].preemptions == 0, (stale[0].preemptions, shrunk[STALE].preemptions)
    program = CampaignSpec(**SPEC).program()  # type: ignore[arg-type]
    for small in shrunk.values():
        assert small.strategy["minimal"] is True
        result = program.rerun(small.choices, execution=small.execution)
        assert result.failure is not None and result.failure.signature == small.signature
        for edit in _single_edits(small.choices, result.preempted_at):
            r = program.rerun(edit, execution=small.execution, strict=False)
            if r.failure is not None and r.failure.signature == small.signature:
                assert (r.preemptions, r.steps) >= (small.preemptions, small.steps), (small.signature, edit)
