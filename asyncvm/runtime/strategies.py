"""Scheduling strategies: who runs next, and which value a nondeterministic draw takes.

A strategy is the small interface Shuttle uses: ``start(index)`` prepares execution number
`index` (returning False once a systematic strategy has exhausted its space), ``pick(enabled,
current)`` chooses the next task among the enabled ones, ``draw(kind, n, p)`` chooses a data value,
and ``end(result)`` lets it learn from the finished execution. Every randomized strategy seeds
execution `index` from ``(seed, index)`` alone, so an execution is a pure function of its index:
a campaign finds the same failures however its executions are spread over processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .failures import ReplayDivergence, ToolError
from .traps import YIELDING

if TYPE_CHECKING:
    from .executor import Choice, ExecutionResult, Executor, Task


def _rng(seed: int, index: int) -> random.Random:
    return random.Random((seed << 32) ^ index)


class Strategy:
    """Base class: seeded randomness for data draws, and the bookkeeping every strategy shares."""

    name = "strategy"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.index = 0
        self.rng = _rng(seed, 0)
        self.exe: Executor | None = None

    def start(self, index: int) -> bool:
        self.index = index
        self.rng = _rng(self.seed, index)
        return True

    def begin(self, exe: Executor) -> None:
        self.exe = exe

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        raise NotImplementedError

    def draw(self, kind: str, n: int, p: float) -> int:
        if n == 2:
            return 1 if self.rng.random() < p else 0
        return self.rng.randrange(n)

    def end(self, result: ExecutionResult) -> None:
        pass

    def uniform_source(self) -> Callable[[], float] | None:
        """If this execution picks uniformly at random, the float source it picks with.

        The executor then makes the pick itself, ``enabled[int(source() * len(enabled))]``,
        which is exactly what ``pick`` would do, without a Python call per decision.
        """
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


class RandomStrategy(Strategy):
    """Uniform random walk: each decision picks an enabled task uniformly."""

    name = "random"

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        return enabled[int(self.rng.random() * len(enabled))]

    def uniform_source(self) -> Callable[[], float] | None:
        return self.rng.random


class PCTStrategy(Strategy):
    """Probabilistic Concurrency Testing (Burckhardt et al., ASPLOS 2010).

    Tasks get distinct random priorities >= depth; the highest-priority enabled task always runs.
    At depth-1 change points drawn uniformly from the first `steps` steps the running task drops to
    a priority below every initial one. A bug of depth d among n tasks and k steps is found with
    probability at least 1/(n*k^(d-1)) per execution. `steps` is the expected execution length;
    campaigns measure it with a calibration run.
    """

    name = "pct"

    def __init__(self, seed: int = 0, depth: int = 3, steps: int = 1000) -> None:
        super().__init__(seed)
        if depth < 1:
            raise ValueError("PCT depth must be >= 1")
        self.depth = depth
        self.steps = max(1, steps)
        self._prio: dict[int, float] = {}
        self._changes: dict[int, int] = {}

    def _depth_for(self, index: int) -> int:
        return self.depth

    def start(self, index: int) -> bool:
        super().start(index)
        d = self._depth_for(index)
        self._prio = {}
        points = self.rng.sample(range(1, self.steps + 1), min(d - 1, self.steps))
        # The j-th change point lowers the running task to d-1-j: later changes go lower still.
        self._changes = {step: d - 1 - j for j, step in enumerate(sorted(points))}
        self._d = d
        return True

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        prio = self._prio
        assert self.exe is not None
        low = self._changes.get(self.exe.step + 1)
        if low is not None and current is not None:
            prio[current.tid] = low
        if current is not None and current.pending is YIELDING and len(enabled) > 1:
            # A voluntary yield goes below everyone else (priorities stay distinct).
            prio[current.tid] = min(prio.values(), default=0.0) - 1.0
        best = None
        best_p = float("-inf")
        for t in enabled:
            p = prio.get(t.tid)
            if p is None:
                p = prio[t.tid] = self._d + self.rng.random()
            if p > best_p:
                best, best_p = t, p
        assert best is not None
        return best

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "depth": self.depth, "steps": self.steps}


class IterativePCTStrategy(PCTStrategy):
    """PCT whose depth cycles 1, 2, ..., depth over successive executions (Lockstep's idpct)."""

    name = "idpct"

    def _depth_for(self, index: int) -> int:
        return 1 + index % self.depth


class POSStrategy(Strategy):
    """Partial-order sampling (Yuan, Yang, Gu; CAV 2018).

    Every pending operation carries a random priority and the highest enabled one runs. After it
    runs, the operations of other tasks that touch the same object (they race with it) get fresh
    priorities, and so does the runner's next operation. Independent operations keep their order,
    which spreads probability over partial orders instead of over interleavings.
    """

    name = "pos"

    def start(self, index: int) -> bool:
        super().start(index)
        self._prio: dict[int, float] = {}
        return True

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        prio = self._prio
        rand = self.rng.random
        best = None
        best_p = float("-inf")
        for t in enabled:
            p = prio.get(t.tid)
            if p is None:
                # A spinning task redraws at every step, so it cannot starve the task it waits for.
                p = prio[t.tid] = rand()
            if p > best_p:
                best, best_p = t, p
        assert best is not None
        obj = _target(best.pending)
        del prio[best.tid]
        if obj is not None:
            for t in enabled:
                if t is not best and _target(t.pending) is obj:
                    prio.pop(t.tid, None)
            for t in getattr(obj, "_waiters", ()):
                prio.pop(t.tid, None)
        return best


def _target(pending: Any) -> Any:
    if type(pending) is tuple:
        return pending[0]
    return None if pending is YIELDING else pending


class DFSStrategy(Strategy):
    """Bounded depth-first search over all schedules with at most `preemptions` preemptions.

    A preemption is switching away from a task that could have continued. Data draws are
    explored exhaustively too. ``start`` returns False once the bounded space is exhausted; the
    campaign reports that the program is correct up to the bound.
    """

    name = "dfs"

    def __init__(self, seed: int = 0, preemptions: int = 2) -> None:
        super().__init__(seed)
        self.bound = preemptions
        # Each entry: [options, index, preemptions before this decision, preempting alternatives]
        self._stack: list[list[Any]] = []
        self._pos = 0
        self._pre = 0
        self.exhausted = False

    def start(self, index: int) -> bool:
        super().start(index)
        self._pos = 0
        self._pre = 0
        return not self.exhausted

    def _decide(self, options: list[int], costly: bool) -> int:
        stack = self._stack
        if self._pos < len(stack):
            entry = stack[self._pos]
            if entry[0] != options:
                raise ToolError(
                    f"DFS found the program nondeterministic at step {self._pos + 1}: options {entry[0]} were {options}"
                )
        else:
            entry = [options, 0, self._pre, costly]
            stack.append(entry)
        self._pos += 1
        if entry[3] and entry[1] > 0:
            self._pre += 1
        return int(entry[0][entry[1]])

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        if current is not None and current.enabled and current.pending is YIELDING:
            # Switching away from a voluntary yield is free, and the default.
            options = [t.tid for t in enabled if t is not current] + [current.tid]
            costly = False
        elif current is not None and current.enabled:
            options = [current.tid] + [t.tid for t in enabled if t is not current]
            costly = len(options) > 1
        else:
            options = [t.tid for t in enabled]
            costly = False
        tid = self._decide(options, costly)
        for t in enabled:
            if t.tid == tid:
                return t
        raise AssertionError("unreachable")

    def draw(self, kind: str, n: int, p: float) -> int:
        return self._decide(list(range(n)), False)

    def end(self, result: ExecutionResult) -> None:
        stack = self._stack
        del stack[self._pos :]
        while stack:
            entry = stack[-1]
            entry[1] += 1
            cost = entry[2] + (1 if entry[3] else 0)
            if entry[1] < len(entry[0]) and cost <= self.bound:
                return
            stack.pop()
        self.exhausted = True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "preemptions": self.bound}


class ReplayStrategy(Strategy):
    """Follows a recorded choice stream.

    Strict replay (the default) refuses any choice that no longer fits: a task that is not
    enabled, a data draw where a task choice was recorded (or the reverse), or a stream that ends
    early. Lenient replay, used by the shrinker, falls back to the non-preemptive choice instead
    (keep running the current task, else the lowest id; draw 0), so an edited stream still yields
    a complete, strictly replayable execution.
    """

    name = "replay"

    def __init__(self, choices: Sequence[Choice], *, strict: bool = True) -> None:
        super().__init__(0)
        self.choices = list(choices)
        self.strict = strict
        self._i = 0

    def start(self, index: int) -> bool:
        super().start(index)
        self._i = 0
        return True

    def _next(self) -> Choice | None:
        i = self._i
        self._i = i + 1
        if i < len(self.choices):
            return self.choices[i]
        return None

    def _diverge(self, message: str) -> None:
        step = self.exe.step + 1 if self.exe is not None else self._i
        raise ReplayDivergence(step, message)

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        c = self._next()
        if type(c) is int:
            for t in enabled:
                if t.tid == c:
                    return t
            if self.strict:
                names = ", ".join(t.name for t in enabled)
                self._diverge(f"recorded task {c} is not enabled (enabled: {names})")
        elif self.strict:
            if c is None:
                self._diverge(f"the schedule ended after {len(self.choices)} choices but tasks remain")
            self._diverge("recorded a data draw where the program asks which task runs")
        if current is not None and current.enabled and current.pending is not YIELDING:
            return current
        for t in enabled:
            if t is not current:
                return t
        return enabled[0]

    def draw(self, kind: str, n: int, p: float) -> int:
        c = self._next()
        if type(c) is tuple:
            value = c[0]
            if 0 <= value < n:
                return value
            if self.strict:
                self._diverge(f"recorded value {value} for a draw of {kind} with {n} outcomes")
        elif self.strict:
            if c is None:
                self._diverge(f"the schedule ended after {len(self.choices)} choices but {kind} is drawn")
            self._diverge(f"recorded a task choice where the program draws {kind}")
        return 0

    def end(self, result: ExecutionResult) -> None:
        if self.strict and self._i < len(self.choices):
            raise ReplayDivergence(
                result.steps,
                f"the execution ended after {self._i} of {len(self.choices)} recorded choices",
            )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class PortfolioStrategy(Strategy):
    """Rotates its member strategies over executions: execution i uses member i mod n."""

    name = "portfolio"

    def __init__(self, members: Sequence[Strategy], seed: int = 0) -> None:
        super().__init__(seed)
        if not members:
            raise ValueError("a portfolio needs at least one strategy")
        self.members = list(members)
        self._active = self.members[0]

    def start(self, index: int) -> bool:
        self.index = index
        self._active = self.members[index % len(self.members)]
        return self._active.start(index // len(self.members))

    def begin(self, exe: Executor) -> None:
        self._active.begin(exe)
        self.exe = exe

    def pick(self, enabled: Sequence[Task], current: Task | None) -> Task:
        return self._active.pick(enabled, current)

    def draw(self, kind: str, n: int, p: float) -> int:
        return self._active.draw(kind, n, p)

    def end(self, result: ExecutionResult) -> None:
        self._active.end(result)

    def uniform_source(self) -> Callable[[], float] | None:
        return self._active.uniform_source()

    @property
    def active(self) -> Strategy:
        return self._active

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "members": [m.describe() for m in self.members]}


STRATEGIES = ("random", "pct", "idpct", "pos", "dfs", "portfolio")


def make_strategy(
    name: str,
    seed: int = 0,
    *,
    depth: int = 3,
    steps: int = 1000,
    preemptions: int = 2,
) -> Strategy:
    """Build a strategy by name with its knobs (the names the CLI and schedule files use)."""
    if name == "random":
        return RandomStrategy(seed)
    if name == "pct":
        return PCTStrategy(seed, depth=depth, steps=steps)
    if name == "idpct":
        return IterativePCTStrategy(seed, depth=depth, steps=steps)
    if name == "pos":
        return POSStrategy(seed)
    if name == "dfs":
        return DFSStrategy(seed, preemptions=preemptions)
    if name == "portfolio":
        return PortfolioStrategy(
            [
                RandomStrategy(seed),
                PCTStrategy(seed, depth=depth, steps=steps),
                POSStrategy(seed),
                IterativePCTStrategy(seed, depth=max(depth, 3), steps=steps),
            ],
            seed,
        )
    raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
