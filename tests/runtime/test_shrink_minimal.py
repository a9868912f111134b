"""Shrinking stops only at a 1-minimal schedule and says so; a campaign keeps, for each failure
signature, its smallest witness (fewest preemptions, then steps) as the schedule to shrink."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm.explore.campaign import CampaignSpec
from asyncvm.explore.driver import Campaign
from asyncvm.explore.engine import Program, build_strategy, scenario_name
from asyncvm.explore.schedule import Schedule

from .programs import lost_update, three_counters


def _steps(choices: list[Any]) -> list[list[Any]]:
    """A step: a task choice and the data draws made while that task ran."""
    steps: list[list[Any]] = []
    for c in choices:
        if isinstance(c, int) or not steps:
            steps.append([c])
        else:
            steps[-1].append(c)
    return steps


def _single_edits(choices: list[Any], preempted_at: list[int]) -> list[list[Any]]:
    """Every single step removed; every preemption replaced by the preempted task running on,
    dropped with its step, or cut off with the rest of the stream."""
    steps = _steps(choices)
    edits = [[c for j, s in enumerate(steps) if j != k for c in s] for k in range(len(steps))]
    for i in preempted_at:
        before = next(c for c in reversed(choices[:i]) if isinstance(c, int))
        edits.append([*choices[:i], before, *choices[i + 1 :]])
        edits.append(choices[:i])
    return edits


def _failing_schedules(fn: Any, seeds: range, per_seed: int = 1) -> list[Schedule]:
    out = []
    for seed in seeds:
        report = asyncvm.explore(fn, strategy="random", runs=200, seed=seed)
        out += [f.schedule for f in report.failures[:per_seed]]
    return out


@pytest.mark.parametrize("fn", [lost_update, three_counters], ids=["lost_update", "three_counters"])
def test_shrunk_schedule_is_1_minimal(fn: Any) -> None:
    """No single step removed and no single preemption taken away gives a smaller schedule that
    still fails the same way (fewer preemptions, or as many and fewer steps)."""
    schedules = _failing_schedules(fn, range(4))
    assert schedules
    for original in schedules:
        shrunk = asyncvm.shrink(original, fn)
        target = shrunk.signature
        assert target == original.signature
        program = Program(fn)
        result = program.rerun(shrunk.choices)
        assert result.failure is not None and result.failure.signature == target
        assert (result.preemptions, result.steps) == (shrunk.preemptions, shrunk.steps)
        for edit in _single_edits(shrunk.choices, result.preempted_at):
            r = program.rerun(edit, strict=False)
            if r.failure is not None and r.failure.signature == target:
                assert (r.preemptions, r.steps) >= (shrunk.preemptions, shrunk.steps), (shrunk.choices, edit)
        assert shrunk.strategy["minimal"] is True
        assert shrunk.strategy["original"] == {
            "preemptions": original.preemptions,
            "steps": original.steps,
            "execution": original.execution,
        }
        assert (shrunk.preemptions, shrunk.steps) <= (original.preemptions, original.steps)


def test_shrink_says_when_its_attempts_ran_out() -> None:
    original = _failing_schedules(three_counters, range(1))[0]
    cut = asyncvm.shrink(original, three_counters, max_attempts=1)
    assert cut.strategy["minimal"] is False and cut.strategy["attempts"] == 1
    assert cut.signature == original.signature
    assert asyncvm.replay(cut, three_counters).failure.signature == original.signature  # type: ignore[union-attr]


def _all_failures(fn: Any, seed: int, runs: int) -> list[tuple[int, str, int, int]]:
    """(index, signature, preemptions, steps) of every failing execution, measured one by one."""
    program = Program(fn)
    strategy = build_strategy(program, "random", seed)
    out = []
    for i in range(runs):
        strategy.new_execution(i)
        r = program.run(strategy)
        if r.failure is not None:
            again = program.rerun(r.choices, execution=i)
            out.append((i, r.failure.signature, again.preemptions, again.steps))
    return out


def test_campaign_keeps_the_smallest_witness_of_each_signature() -> None:
    runs = 300
    report = asyncvm.explore(three_counters, strategy="random", runs=runs, seed=2)
    every = _all_failures(three_counters, 2, runs)
    assert report.failures
    for found in report.failures:
        mine = [(p, s, i) for i, sig, p, s in every if sig == found.signature]
        p, s, i = min(mine)
        assert (found.schedule.preemptions, found.schedule.steps, found.schedule.execution) == (p, s, i)
        assert found.first_run == min(i for _, _, i in mine)
        assert found.count == len(mine)
        assert found.failure.signature == found.signature
        assert asyncvm.replay(found.schedule, three_counters).failure.signature == found.signature  # type: ignore[union-attr]
    smaller = [f for f in report.failures if f.schedule.execution != f.first_run]
    assert smaller, "the first failure of some signature should not be its smallest witness"


def test_smallest_witness_does_not_depend_on_the_chunking() -> None:
    fn = three_counters
    spec = dict(scenario=scenario_name(fn), strategy="random", seed=2, runs=300)
    picked = []
    for chunk in (7, 300):
        with Campaign(CampaignSpec(**spec), fn=fn, chunk=chunk) as campaign:  # type: ignore[arg-type]
            report = campaign.run()
        picked.append([(f.signature, f.first_run, f.schedule.execution, f.schedule.choices) for f in report.failures])
    assert picked[0] == picked[1]
