"""Shrinking a hang is fast: candidates are shrunk against the loop's signature under a step bound
near the witness's length, and shrinking is bounded by time and says so when it stops early
(issue 14)."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm.explore import engine
from asyncvm.explore.schedule import Schedule
from asyncvm.explore.shrink import HANG_MIN_STEPS, shrink
from asyncvm.runtime import TaskGroup
from asyncvm.runtime.sync import Completion, Word, signal_pending, spin_wait
from asyncvm.runtime.traps import yield_point

STEP_BOUND = 100_000


async def hang_after_a_race(kvm: Any) -> None:
    """Two workers race to a flag; whoever loses spins on a word nobody writes: a hang."""
    word = Word("never written")
    state = {"first": ""}

    async def worker(name: str) -> None:
        for _ in range(3):
            await yield_point()
        if not state["first"]:
            state["first"] = name
            return
        while True:
            if signal_pending():
                return
            await spin_wait(word, word.version)

    async with TaskGroup() as tg:
        tg.spawn(worker, "a", name="a")
        tg.spawn(worker, "b", name="b")


async def livelock(kvm: Any) -> None:
    """A task that spins with voluntary yields on a flag that a blocked task would set."""
    flag = {"set": False}

    async def spinner() -> None:
        while not flag["set"]:
            await yield_point()

    async def blocked() -> None:
        await Completion("never").wait()
        flag["set"] = True

    async with TaskGroup() as tg:
        tg.spawn(spinner, name="spinner")
        tg.spawn(blocked, name="blocked")


def witness(scenario: Any, max_steps: int = STEP_BOUND) -> Schedule:
    report = asyncvm.explore(
        scenario, strategy="random", runs=20, seed=4, max_steps=max_steps, data_probs={"signal": 0}
    )
    assert report.failures, report.summary()
    return report.failures[0].schedule


def test_a_hang_shrinks_to_1_minimal_under_a_low_step_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = witness(hang_after_a_race)
    assert schedule.failure is not None and schedule.failure.signature == "hang:test_shrink_hang.py:worker"
    bounds: list[int] = []
    real_run = engine.Program.run

    def counting_run(self: engine.Program, *args: Any, **kw: Any) -> Any:
        bounds.append(self.max_steps)
        return real_run(self, *args, **kw)

    monkeypatch.setattr(engine.Program, "run", counting_run)
    small = shrink(schedule, hang_after_a_race)
    assert small.failure is not None and small.failure.signature == schedule.failure.signature
    assert small.strategy["minimal"] is True and small.strategy["stopped"] is None
    assert small.preemptions <= schedule.preemptions
    # every candidate ran under the loop's bound, not the program's
    candidates = bounds[1:-1]
    assert candidates and max(candidates) <= max(HANG_MIN_STEPS, 2 * schedule.steps) < STEP_BOUND


def test_shrinking_stops_at_the_time_bound_and_says_so() -> None:
    schedule = witness(livelock, max_steps=3_000)
    assert schedule.failure is not None and schedule.failure.kind == "livelock"
    small = shrink(schedule, livelock, time_budget=0.0)
    assert small.strategy["minimal"] is False and small.strategy["stopped"] == "time"
    assert small.strategy["attempts"] == 0


def test_shrinking_stops_when_the_attempts_run_out_and_says_so() -> None:
    schedule = witness(livelock, max_steps=3_000)
    small = shrink(schedule, livelock, max_attempts=1, time_budget=None)
    assert small.strategy["minimal"] is False and small.strategy["stopped"] == "attempts"
