"""Spinning on a Word: a retry loop waits for a write instead of re-checking unchanged state, and
a spinner nobody will ever release is still a livelock."""

from __future__ import annotations

from asyncvm.runtime import TaskGroup, traps
from asyncvm.runtime.executor import ExecutionResult, Executor
from asyncvm.runtime.strategies import RandomStrategy
from asyncvm.runtime.sync import Word, spin_wait, spin_yield


def run(main: object, seed: int, max_steps: int = 2_000) -> ExecutionResult:
    strategy = RandomStrategy(seed)
    strategy.new_execution(0)
    return Executor(strategy, max_steps=max_steps).run(main)  # type: ignore[arg-type]


def flag_program(spin: str) -> object:
    """A writer sets a flag after a few steps of its own; a spinner waits for it."""
    state = {"flag": False, "checks": 0}
    word = Word("flag")

    async def writer() -> None:
        for _ in range(20):
            await traps.point(None)
        state["flag"] = True
        word.write()

    async def spinner() -> None:
        while True:
            seen = word.version
            state["checks"] += 1
            if state["flag"]:
                return
            if spin == "wait":
                await spin_wait(word, seen)
            else:
                await spin_yield()

    async def main() -> None:
        async with TaskGroup() as tg:
            tg.spawn(spinner, name="spinner")
            tg.spawn(writer, name="writer")

    main.state = state  # type: ignore[attr-defined]
    return main


def test_a_spinner_re_checks_only_after_a_write() -> None:
    for seed in range(5):
        waiting = flag_program("wait")
        r = run(waiting, seed)
        assert r.failure is None, r.failure
        assert waiting.state["checks"] == 2  # type: ignore[attr-defined]
        stuttering = flag_program("yield")
        s = run(stuttering, seed)
        assert s.failure is None
        assert stuttering.state["checks"] >= 2  # type: ignore[attr-defined]
        assert r.steps <= s.steps


def test_a_spinner_nobody_releases_is_a_hang() -> None:
    word = Word("never written")

    async def main() -> None:
        while True:
            await spin_wait(word, word.version)

    r = run(main, 0, max_steps=500)
    assert r.failure is not None and r.failure.kind == "hang", r.failure


def test_a_task_alone_passes_its_points_without_a_decision() -> None:
    """Scheduling points with one enabled task are forced: not yielded, not recorded as choices."""
    done: list[str] = []

    async def worker(name: str, points: int) -> None:
        for _ in range(points):
            await traps.point(None)
        done.append(name)

    async def main() -> None:
        for _ in range(50):  # set-up alone: no decisions
            await traps.point(None)
        async with TaskGroup() as tg:
            tg.spawn(worker, "short", 2, name="short")
            tg.spawn(worker, "long", 200, name="long")

    for seed in range(5):
        r = run(main, seed)
        assert r.failure is None and sorted(done) == ["long", "short"]
        done.clear()
        # Two workers contend for a few steps; once the short one is done the long one runs alone.
        assert r.steps < 20, r.steps


def test_a_lone_task_that_never_blocks_still_meets_the_step_bound() -> None:
    async def forever() -> None:
        while True:
            await traps.point(None)

    r = run(forever, 0, max_steps=500)
    assert r.failure is not None and r.failure.kind == "livelock"
