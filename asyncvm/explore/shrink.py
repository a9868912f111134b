"""shrink(): make a failing schedule as small as it can be while it still fails the same way.

The order is "fewer preemptions first, then fewer steps", because a reader follows a schedule
by its context switches. Each candidate is an edited choice stream replayed leniently (a choice
that no longer fits falls back to "keep running the current task"), so any edit yields a complete
execution; a candidate is kept only if it fails with the same signature and is strictly smaller.
The kept schedule is the stream the candidate execution actually made, so it replays strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..runtime.executor import Choice, ExecutionResult
from .engine import ScenarioFn, _program_for, check_compatible, load_schedule
from .schedule import Schedule, ScheduleError


@dataclass
class _Best:
    choices: list[Choice]
    result: ExecutionResult

    @property
    def size(self) -> tuple[int, int]:
        return (self.result.preemptions, len(self.choices))


def shrink(
    source: str | Path | Schedule,
    scenario: ScenarioFn,
    *,
    force: bool = False,
    max_attempts: int = 2000,
    progress: Callable[[int, tuple[int, int]], None] | None = None,
) -> Schedule:
    """Return the smallest schedule found that reproduces `source`'s failure signature."""
    schedule = load_schedule(source)
    check_compatible(schedule, scenario, force=force)
    if schedule.failure is None:
        raise ScheduleError("schedule records no failure; there is nothing to shrink")
    target = schedule.failure.signature
    program = _program_for(schedule, scenario)

    def run(choices: list[Choice], strict: bool) -> ExecutionResult:
        return program.replay(schedule, strict=strict, choices=choices)

    first = run(schedule.choices, strict=True)
    if first.failure is None or first.failure.signature != target:
        got = first.failure.signature if first.failure else "no failure"
        raise ScheduleError(f"schedule does not reproduce its failure {target!r} (got {got})")
    best = _Best(list(first.choices), first)
    attempts = 0

    def attempt(choices: list[Choice]) -> bool:
        nonlocal best, attempts
        attempts += 1
        r = run(choices, strict=False)
        if r.failure is None or r.failure.signature != target:
            return False
        cand = _Best(list(r.choices), r)
        if cand.size < best.size:
            best = cand
            if progress is not None:
                progress(attempts, best.size)
            return True
        return False

    improved = True
    while improved and attempts < max_attempts:
        improved = False
        # 1. Remove context switches, latest first: delete the switching choice, or make the
        #    running task continue, or stop following the stream there altogether.
        for i in reversed(best.result.preempted_at):
            if attempts >= max_attempts:
                break
            cur = best.choices
            prev = _previous_task(cur, i)
            edits = [cur[:i] + cur[i + 1 :], cur[:i]]
            if prev is not None:
                edits.insert(1, [*cur[:i], prev, *cur[i + 1 :]])
            if any(attempt(e) for e in edits):
                improved = True
                break
        if improved:
            continue
        # 2. Fewer steps: drop chunks of the stream, halving the chunk size (delta debugging).
        n = len(best.choices)
        chunk = max(1, n // 2)
        while chunk >= 1 and not improved and attempts < max_attempts:
            start = 0
            while start < len(best.choices) and attempts < max_attempts:
                cur = best.choices
                if attempt(cur[:start] + cur[start + chunk :]):
                    improved = True
                    break
                start += chunk
            chunk //= 2
        # 3. Data draws back to their ordinary value (no signal, no failure).
        if not improved:
            for i, c in enumerate(best.choices):
                if type(c) is tuple and c[0] != 0 and attempts < max_attempts:
                    cur = best.choices
                    if attempt([*cur[:i], (0,), *cur[i + 1 :]]):
                        improved = True
                        break

    return Schedule.from_execution(
        schedule,
        best.result,
        strategy={"name": "shrink", "from": schedule.strategy},
        seed=schedule.seed,
        execution=schedule.execution,
        prelude=schedule.prelude,
    )


def _previous_task(choices: list[Choice], i: int) -> int | None:
    for j in range(i - 1, -1, -1):
        c = choices[j]
        if type(c) is int:
            return c
    return None


def shrunk_path(path: str | Path) -> Path:
    """Where the shrunk schedule of `path` goes: schedule.json -> schedule.shrunk.json."""
    p = Path(path)
    return (
        p.with_name(p.name[: -len(".json")] + ".shrunk.json")
        if p.name.endswith(".json")
        else p.with_name(p.name + ".shrunk")
    )
