"""Scheduling strategies: who runs next, and which value a nondeterministic draw takes.

A strategy is Shuttle's three-method scheduler and sees nothing of the run but its arguments:

* ``new_execution(index) -> bool`` prepares execution number `index`; False means a systematic
  strategy has exhausted its space (DFS backtracks here, over the choices it made itself).
* ``next_task(runnable, current, is_yielding) -> task`` picks who runs next. `runnable` is sorted
  by task id; `current` is the task that ran last (None before the first step), still runnable
  exactly when ``current in runnable``; `is_yielding` says it stopped at a voluntary yield.
* ``next_value(kind, n, p) -> int`` picks a data value in 0..n-1 (for n == 2, 1 has probability p).

Of a task a strategy reads only the `Runnable` view (id, name, and what its next operation
touches); it gets no executor reference and counts its own steps. A strategy whose `next_task` is
exactly ``runnable[int(f() * len(runnable))]`` for a float source `f` may offer `f` as its
`uniform` attribute: the executor reads that once per execution and makes the same pick inline,
without a Python call per decision. Every randomized strategy seeds execution `index` from
``(seed, index)`` alone, so an execution is a pure function of its index: a campaign finds the same
failures however its executions are spread over processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .failures import ReplayDivergence, ToolError

if TYPE_CHECKING:
    from .executor import Choice


class Runnable(Protocol):
    """What a strategy may read of a task: nothing else, and nothing it may change."""

    @property
    def tid(self) -> int:
        """Stable id: the spawn order."""
        ...

    @property
    def name(self) -> str:
        """The task's name, for messages (`vcpu0`, `punch_hole`)."""
        ...

    @property
    def target(self) -> object | None:
        """The object the task's next operation touches (the lock it takes or waits for, the cell it
        updates), or None: nothing in particular, or a voluntary yield. Two runnable tasks whose
        targets are the same object race with each other."""
        ...


R = TypeVar("R", bound=Runnable)


@runtime_checkable
class Strategy(Protocol):
    """The scheduler interface: the executor calls these three methods and nothing else."""

    def new_execution(self, index: int) -> bool:
        """Prepare execution `index`; False once a systematic strategy has nothing left to try."""
        ...

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        """The task to run next, one of `runnable` (never empty)."""
        ...

    def next_value(self, kind: str, n: int, p: float) -> int:
        """A data value in 0..n-1 for the draw named `kind`."""
        ...


def _rng(seed: int, index: int) -> random.Random:
    return random.Random((seed << 32) ^ index)


class SeededStrategy:
    """What the bundled strategies share: a per-execution seeded source, data draws, a description."""

    name = "strategy"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.index = 0
        self.rng = _rng(seed, 0)

    def new_execution(self, index: int) -> bool:
        self.index = index
        self.rng = _rng(self.seed, index)
        return True

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        raise NotImplementedError

    def next_value(self, kind: str, n: int, p: float) -> int:
        if n == 2:
            return 1 if self.rng.random() < p else 0
        return self.rng.randrange(n)

    @property
    def uniform(self) -> Callable[[], float] | None:
        """The float source of a uniform random pick, if that is what `next_task` does."""
        return None

    @property
    def coin(self) -> Callable[[], float] | None:
        """The float source of a yes/no draw, if `next_value` is this class's: a yes/no draw is then
        ``1 if coin() < p else 0``, and the executor makes it without a call per draw."""
        return self.rng.random if type(self).next_value is SeededStrategy.next_value else None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


class RandomStrategy(SeededStrategy):
    """Uniform random walk: each decision picks a runnable task uniformly."""

    name = "random"

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        return runnable[int(self.rng.random() * len(runnable))]

    @property
    def uniform(self) -> Callable[[], float] | None:
        return self.rng.random


class PCTStrategy(SeededStrategy):
    """Probabilistic Concurrency Testing (Burckhardt et al., ASPLOS 2010).

    Tasks get distinct random priorities >= depth; the highest-priority runnable task always runs.
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
        self._d = depth
        self._step = 0

    def _depth_for(self, index: int) -> int:
        return self.depth

    def new_execution(self, index: int) -> bool:
        super().new_execution(index)
        d = self._depth_for(index)
        self._prio = {}
        points = self.rng.sample(range(1, self.steps + 1), min(d - 1, self.steps))
        # The j-th change point lowers the running task to d-1-j: later changes go lower still.
        self._changes = {step: d - 1 - j for j, step in enumerate(sorted(points))}
        self._d = d
        self._step = 0
        return True

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        prio = self._prio
        self._step = step = self._step + 1
        low = self._changes.get(step)
        if low is not None and current is not None:
            prio[current.tid] = low
        if current is not None and is_yielding and len(runnable) > 1:
            # A voluntary yield goes below everyone else (priorities stay distinct).
            prio[current.tid] = min(prio.values(), default=0.0) - 1.0
        best = None
        best_p = float("-inf")
        for t in runnable:
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


class POSStrategy(SeededStrategy):
    """Partial-order sampling (Yuan, Yang, Gu; CAV 2018).

    Every pending operation carries a random priority and the highest runnable one runs. After it
    runs, the operations of other tasks that touch the same object (they race with it) get fresh
    priorities, and so does the runner's next operation. Independent operations keep their order,
    which spreads probability over partial orders instead of over interleavings.

    A priority belongs to one operation: a task keeps it only until it runs, so the object an
    operation touches is read once, when its priority is drawn, and remembered (by identity)
    beside it. That covers the tasks blocked on the object too, which are not runnable.
    """

    name = "pos"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._prio: dict[int, float] = {}
        self._touches: dict[int, int] = {}

    def new_execution(self, index: int) -> bool:
        super().new_execution(index)
        self._prio = {}
        # tid -> id() of what the prioritized operation touches; the operation keeps it alive.
        self._touches = {}
        return True

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        prio = self._prio
        touches = self._touches
        rand = self.rng.random
        best = None
        best_p = float("-inf")
        for t in runnable:
            p = prio.get(t.tid)
            if p is None:
                # A spinning task redraws at every step, so it cannot starve the task it waits for.
                p = prio[t.tid] = rand()
                touches[t.tid] = id(t.target)
            if p > best_p:
                best, best_p = t, p
        assert best is not None
        obj = best.target
        del prio[best.tid]
        if obj is not None:
            key = id(obj)
            for tid in [tid for tid in prio if touches[tid] == key]:
                del prio[tid]
        return best


class DFSStrategy(SeededStrategy):
    """Bounded depth-first search over all schedules with at most `preemptions` preemptions.

    A preemption is switching away from a task that could have continued. Data draws are
    explored exhaustively too. ``new_execution`` backtracks over the previous execution's choices
    and returns False once the bounded space is exhausted; the campaign reports that the program
    is correct up to the bound.
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

    def new_execution(self, index: int) -> bool:
        super().new_execution(index)
        if self._pos:
            self._backtrack()
        self._pos = 0
        self._pre = 0
        return not self.exhausted

    def _backtrack(self) -> None:
        """Advance to the next schedule: the deepest decision of the last one with an untried option."""
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

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        running = current is not None and current in runnable
        if running and is_yielding:
            assert current is not None
            # Switching away from a voluntary yield is free, and the default.
            options = [t.tid for t in runnable if t is not current] + [current.tid]
            costly = False
        elif running:
            assert current is not None
            options = [current.tid] + [t.tid for t in runnable if t is not current]
            costly = len(options) > 1
        else:
            options = [t.tid for t in runnable]
            costly = False
        tid = self._decide(options, costly)
        for t in runnable:
            if t.tid == tid:
                return t
        raise AssertionError("unreachable")

    def next_value(self, kind: str, n: int, p: float) -> int:
        return self._decide(list(range(n)), False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "preemptions": self.bound}


class ReplayStrategy(SeededStrategy):
    """Follows a recorded choice stream.

    Strict replay (the default) refuses any choice that no longer fits: a task that is not
    runnable, a data draw where a task choice was recorded (or the reverse), or a stream that ends
    early; after the run, the driver calls ``check_consumed()`` to refuse a stream that was not
    used up. Lenient replay, used by the shrinker, falls back to the non-preemptive choice instead
    (keep running the current task, else the lowest id; draw 0), so an edited stream still yields
    a complete, strictly replayable execution.
    """

    name = "replay"

    def __init__(self, choices: Sequence[Choice], *, strict: bool = True) -> None:
        super().__init__(0)
        self.choices = list(choices)
        self.strict = strict
        self._i = 0
        self._step = 0

    def new_execution(self, index: int) -> bool:
        super().new_execution(index)
        self._i = 0
        self._step = 0
        return True

    def _next(self) -> Choice | None:
        i = self._i
        self._i = i + 1
        if i < len(self.choices):
            return self.choices[i]
        return None

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        self._step += 1
        c = self._next()
        if type(c) is int:
            for t in runnable:
                if t.tid == c:
                    return t
            if self.strict:
                names = ", ".join(t.name for t in runnable)
                raise ReplayDivergence(self._step, f"recorded task {c} is not enabled (enabled: {names})")
        elif self.strict:
            if c is None:
                raise ReplayDivergence(
                    self._step, f"the schedule ended after {len(self.choices)} choices but tasks remain"
                )
            raise ReplayDivergence(self._step, "recorded a data draw where the program asks which task runs")
        if current is not None and not is_yielding and current in runnable:
            return current
        for t in runnable:
            if t is not current:
                return t
        return runnable[0]

    def next_value(self, kind: str, n: int, p: float) -> int:
        c = self._next()
        # A draw happens inside the step now running, which the report numbers one past it.
        step = self._step + 1
        if type(c) is tuple:
            value = c[0]
            if 0 <= value < n:
                return value
            if self.strict:
                raise ReplayDivergence(step, f"recorded value {value} for a draw of {kind} with {n} outcomes")
        elif self.strict:
            if c is None:
                raise ReplayDivergence(
                    step, f"the schedule ended after {len(self.choices)} choices but {kind} is drawn"
                )
            raise ReplayDivergence(step, f"recorded a task choice where the program draws {kind}")
        return 0

    def check_consumed(self) -> None:
        """After the run: a strict replay must have followed the whole recorded stream."""
        if self.strict and self._i < len(self.choices):
            raise ReplayDivergence(
                self._step,
                f"the execution ended after {self._i} of {len(self.choices)} recorded choices",
            )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class PortfolioStrategy(SeededStrategy):
    """Rotates its member strategies over executions: execution i uses member i mod n."""

    name = "portfolio"

    def __init__(self, members: Sequence[SeededStrategy], seed: int = 0) -> None:
        super().__init__(seed)
        if not members:
            raise ValueError("a portfolio needs at least one strategy")
        self.members = list(members)
        self._active = self.members[0]

    def new_execution(self, index: int) -> bool:
        self.index = index
        self._active = self.members[index % len(self.members)]
        return self._active.new_execution(index // len(self.members))

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        return self._active.next_task(runnable, current, is_yielding)

    def next_value(self, kind: str, n: int, p: float) -> int:
        return self._active.next_value(kind, n, p)

    @property
    def uniform(self) -> Callable[[], float] | None:
        return self._active.uniform

    @property
    def active(self) -> SeededStrategy:
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
) -> SeededStrategy:
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
