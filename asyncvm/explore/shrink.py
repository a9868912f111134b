"""shrink(): make a failing schedule as small as it can be while it still fails the same way.

Size is ordered "fewer preemptions first, then fewer steps", because a reader follows a schedule
by its context switches (the stream's length and its unusual data draws only break ties). A step
is one scheduling decision: a task choice together with the data draws made while that task ran.

Shrinking is delta debugging over the choice stream (as Lockstep's truncation and decimation, and
Hypothesis' shrinker over its choice sequence). Each candidate is an edited stream replayed
leniently (a choice that no longer fits falls back to "keep running the current task"), so any
edit yields a complete execution; a candidate is kept only if it fails with the same signature
and is strictly smaller. The edits, tried until a whole round of them changes nothing:

1. each preemption, latest first: let the preempted task run on to where it stopped on its own
   (its later steps move forward), or just its next stretch; run it for one more step instead;
   drop the preempting step; or stop following the stream there;
2. each block of steps, halving the block size down to single steps;
3. each unusual data draw back to its ordinary value (0).

When a round ends without a change the schedule is 1-minimal: no single edit of a remaining
preemption, no single step or block of steps removed, gives a smaller schedule that still fails
this way. Local edits cannot reach an interleaving of another shape, though (the same race with
the tasks meeting at a lock instead of a preemption), so a bounded search follows: seeded walks
that replay a prefix of the schedule (none of it, or up to one of its context switches) and then
run on without preempting, data drawn at its own odds (SEARCH_SHARE of the attempts, at least
SEARCH_MIN). A smaller failure it finds is edited again. The shrunk schedule says whether it is
1-minimal (its strategy's ``"minimal"``; false when `max_attempts` or the time bound ran out
first, and then ``"stopped"`` says which) and what it was shrunk from (``"original"``). The kept
stream is the one the candidate execution made; it replays strictly.

Shrinking is bounded by time as well as by attempts (`time_budget`, DEFAULT_TIME). A hang is
shrunk against its loop's signature: every candidate is an execution that either reaches the
stuck loop within a few rounds or is no witness, so candidates run under a step bound near the
original's length (HANG_STEP_FACTOR) instead of the program's, which is what makes a witness of
a loop that never ends cost about as much as any other. A livelock (a loop that is not a spin on
unchanged state) is only seen at the step bound, so each candidate costs the whole bound: the
time bound is what keeps its shrinking short.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from ..runtime.executor import Choice, ExecutionResult
from ..runtime.failures import ToolError
from ..runtime.strategies import R, ReplayStrategy
from .engine import ScenarioFn, _program_for, check_compatible, load_schedule
from .schedule import Schedule, ScheduleError

#: Candidate executions one shrink may run (each costs about one execution of the scenario).
DEFAULT_ATTEMPTS = 2000

#: Seconds one shrink may take by default (None: only the attempts bound it).
DEFAULT_TIME = 60.0

#: A hang's candidates run under a step bound of this many times the original's steps (at least
#: HANG_MIN_STEPS): a candidate that has not reached the stuck loop by then is no witness.
HANG_STEP_FACTOR = 2
HANG_MIN_STEPS = 2000

#: The share of the attempts one search by walks may use (at least SEARCH_MIN).
SEARCH_SHARE = 0.1
SEARCH_MIN = 100

#: (preemptions, steps, stream length, unusual draws): smaller is better, in that order.
Size = tuple[int, int, int, int]


def size_of(result: ExecutionResult) -> Size:
    """How big an execution's schedule is, in the order shrinking minimizes."""
    choices = result.raw_choices
    draws = [c for c in choices if type(c) is tuple]
    return (result.preemptions, result.steps, len(choices), sum(1 for c in draws if c[0] != 0))


class _OutOfAttempts(Exception):
    """The attempts or the time ran out; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Walk(ReplayStrategy):
    """Follows `prefix` (leniently), then runs on without preempting: where the running task
    blocked, yielded or finished, a seeded pick among the runnable tasks; data at its own odds."""

    name = "shrink-walk"

    def __init__(self, prefix: list[Choice], seed: int) -> None:
        super().__init__(prefix, strict=False)
        self._walk = random.Random(seed)

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        if self._i < len(self.choices):
            return super().next_task(runnable, current, is_yielding)
        if current is not None and not is_yielding and current in runnable:
            return current
        return runnable[int(self._walk.random() * len(runnable))]

    def next_value(self, kind: str, n: int, p: float) -> int:
        if self._i < len(self.choices):
            return super().next_value(kind, n, p)
        if n == 2:
            return 1 if self._walk.random() < p else 0
        return self._walk.randrange(n)


class _Shrinker:
    def __init__(
        self,
        replay: Callable[[list[Choice]], ExecutionResult],
        walk: Callable[[_Walk], ExecutionResult] | None,
        target: str,
        first: ExecutionResult,
        max_attempts: int,
        progress: Callable[[int, tuple[int, int]], None] | None,
        deadline: float | None = None,
        step_cap: int | None = None,
    ) -> None:
        self.replay = replay
        self.deadline = deadline
        #: candidates that run into this many steps are no witness (a hang's candidates; see shrink)
        self.step_cap = step_cap
        #: why shrinking stopped before a fixpoint: "attempts", "time", or None
        self.stopped: str | None = None
        self.walk = walk
        self.target = target
        self.best = first
        self.choices: list[Choice] = first.choices
        self.size = size_of(first)
        self.max_attempts = max_attempts
        self.progress = progress
        self.attempts = 0
        self.minimal = False
        #: candidates already run: a candidate that was not smaller once never becomes smaller
        self.tried: set[tuple[Choice, ...]] = set()

    def _run(self, execute: Callable[[], ExecutionResult]) -> bool:
        if self.attempts >= self.max_attempts:
            raise _OutOfAttempts("attempts")
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            raise _OutOfAttempts("time")
        self.attempts += 1
        r = execute()
        if r.failure is None or r.failure.signature != self.target:
            return False
        if self.step_cap is not None and r.steps >= self.step_cap:
            return False  # ended by the lowered step bound: with the program's it would go on
        size = size_of(r)
        if size >= self.size:
            return False
        self.best, self.choices, self.size = r, r.choices, size
        self.minimal = False
        if self.progress is not None:
            self.progress(self.attempts, size[:2])
        return True

    def attempt(self, choices: list[Choice]) -> bool:
        """Replay an edited stream; keep it if it fails the same way and is smaller."""
        key = tuple(choices)
        if key in self.tried:
            return False
        self.tried.add(key)
        return self._run(lambda: self.replay(choices))

    def minimize(self) -> bool:
        """Edit to a fixpoint, search, repeat; True if the result is 1-minimal (see the module)."""
        try:
            while True:
                changed = self._preemptions()
                changed |= self._blocks()
                changed |= self._draws()
                if changed:
                    continue
                self.minimal = True
                if not self._search():
                    return True
        except _OutOfAttempts as e:
            if not self.minimal:
                self.stopped = e.reason
            return self.minimal

    def _preemptions(self) -> bool:
        changed = False
        again = True
        while again:
            again = False
            for i in reversed(self.best.preempted_at):
                if any(self.attempt(c) for c in without_preemption(self.choices, self.best.preempted_at, i)):
                    changed = again = True
                    break
        return changed

    def _blocks(self) -> bool:
        changed = False
        size = len(steps_of(self.choices)) // 2
        while size >= 1:
            start = 0
            while True:
                steps = steps_of(self.choices)
                if start >= len(steps):
                    break
                if self.attempt(_join(steps[:start] + steps[start + size :])):
                    changed = True  # the next block moved into place: try it at the same start
                else:
                    start += size
            size //= 2
        return changed

    def _draws(self) -> bool:
        changed = False
        i = 0
        while i < len(self.choices):
            c = self.choices[i]
            if type(c) is tuple and c[0] != 0 and self.attempt([*self.choices[:i], (0,), *self.choices[i + 1 :]]):
                changed = True
            i += 1
        return changed

    def _search(self) -> bool:
        """Walks without preemptions after each prefix (none, or up to each context switch), round robin."""
        walk = self.walk
        if walk is None:
            return False
        prefixes = [0, *switches(self.choices)]
        budget = max(SEARCH_MIN, int(self.max_attempts * SEARCH_SHARE))
        for n in range(budget):
            strategy = _Walk(self.choices[: prefixes[n % len(prefixes)]], n // len(prefixes))
            if self._run(partial(walk, strategy)):
                return True
        return False


def steps_of(choices: list[Choice]) -> list[list[Choice]]:
    """The stream cut into steps: a task choice and the draws made while that task ran."""
    steps: list[list[Choice]] = []
    for c in choices:
        if type(c) is int or not steps:
            steps.append([c])
        else:
            steps[-1].append(c)
    return steps


def switches(choices: list[Choice]) -> list[int]:
    """Stream indices where another task than the one before runs (preempting or not)."""
    out: list[int] = []
    last = None
    for i, c in enumerate(choices):
        if type(c) is int:
            if last is not None and c != last:
                out.append(i)
            last = c
    return out


def _join(steps: list[list[Choice]]) -> list[Choice]:
    return [c for s in steps for c in s]


def without_preemption(choices: list[Choice], preempted_at: list[int], i: int) -> Iterator[list[Choice]]:
    """Edits of `choices` that take away the preemption at stream index `i`, most natural first."""
    steps = steps_of(choices)
    step_at: dict[int, int] = {}  # stream index of a task choice -> its step
    n = 0
    for k, s in enumerate(steps):
        step_at[n] = k
        n += len(s)
    u = step_at.get(i, 0)
    if u == 0:
        return
    preempted = steps[u - 1][0]
    switch = {step_at[p] for p in preempted_at if p in step_at}
    # The preempted task's later steps: its next stretch, and every stretch up to the one that
    # ended without a preemption (where it blocked, yielded or finished on its own).
    stretch: list[int] = []
    run_on: list[int] = []
    k = u
    while True:
        k = next((j for j in range(k, len(steps)) if steps[j][0] == preempted), len(steps))
        if k == len(steps):
            break
        while k < len(steps) and steps[k][0] == preempted:
            run_on.append(k)
            k += 1
        if not stretch:
            stretch = list(run_on)
        if k not in switch:
            break
    for moved in (run_on, stretch):
        if moved:
            gone = set(moved)
            rest = [steps[j] for j in range(u, len(steps)) if j not in gone]
            yield _join(steps[:u] + [steps[j] for j in moved] + rest)
    yield [*choices[:i], preempted, *choices[i + 1 :]]
    yield _join(steps[:u] + steps[u + 1 :])
    yield choices[:i]


def shrink(
    source: str | Path | Schedule,
    scenario: ScenarioFn,
    *,
    force: bool = False,
    max_attempts: int = DEFAULT_ATTEMPTS,
    progress: Callable[[int, tuple[int, int]], None] | None = None,
    time_budget: float | None = DEFAULT_TIME,
) -> Schedule:
    """Return the smallest schedule found that reproduces `source`'s failure signature.

    `progress(attempts, (preemptions, steps))` hears of each improvement. Shrinking stops after
    `max_attempts` candidates or `time_budget` seconds (None: no time bound), whichever comes
    first; the schedule's strategy then says ``"stopped"``: ``"attempts"`` or ``"time"``.
    """
    t0 = time.perf_counter()
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
    # A hang is shrunk against its loop: candidates get a step bound near the original's length.
    candidates = program
    step_cap = None
    if first.failure.kind == "hang":
        step_cap = max(HANG_MIN_STEPS, HANG_STEP_FACTOR * first.steps)
        if step_cap < program.max_steps:
            candidates = replace(program, max_steps=step_cap)
        else:
            step_cap = None

    def candidate(choices: list[Choice]) -> ExecutionResult:
        return candidates.replay(schedule, strict=False, choices=choices)

    # Walks run the execution alone: a schedule with a prelude (a lock-order inversion across
    # executions) is only edited.
    walk = None if schedule.prelude else (lambda s: candidates.run(s, count_preemptions=True))
    deadline = None if time_budget is None else t0 + time_budget
    shrinker = _Shrinker(candidate, walk, target, first, max_attempts, progress, deadline, step_cap)
    minimal = shrinker.minimize()
    again = run(shrinker.choices, strict=True) if shrinker.best is not first else first
    if again.failure is None or again.failure.signature != target or again.choices != shrinker.choices:
        raise ToolError(f"uncontrolled nondeterminism: the shrunk schedule of {target} does not replay exactly")
    return Schedule.from_execution(
        schedule,
        again,
        strategy={
            "name": "shrink",
            "from": schedule.strategy,
            "original": {"preemptions": first.preemptions, "steps": first.steps, "execution": schedule.execution},
            "minimal": minimal,
            "attempts": shrinker.attempts,
            # No wall time here: the same failure shrinks to the same file on every machine.
            "stopped": shrinker.stopped,
        },
        seed=schedule.seed,
        execution=schedule.execution,
        prelude=schedule.prelude,
    )


def shrunk_path(path: str | Path) -> Path:
    """Where the shrunk schedule of `path` goes: schedule.json -> schedule.shrunk.json."""
    p = Path(path)
    return (
        p.with_name(p.name[: -len(".json")] + ".shrunk.json")
        if p.name.endswith(".json")
        else p.with_name(p.name + ".shrunk")
    )
