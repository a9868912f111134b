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
failures however its executions are spread over processes. The feedback strategy also learns from
the earlier executions of its epoch; it rebuilds them itself when asked for an execution out of
order (see FeedbackStrategy), so the same holds for it.
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


def _label(obj: object) -> str:
    """What an operation touches, as coverage names it: a lock class, a word's or cell's name, or
    the type of object (instances come and go between executions; their classes stay)."""
    label = getattr(obj, "lock_class", None) or getattr(obj, "name", None)
    return label if type(label) is str else type(obj).__name__


class _Seed:
    """A corpus entry: one execution's own decisions (task ids) and draws, and how much new
    coverage it reached (its weight when a schedule to mutate is chosen)."""

    __slots__ = ("decisions", "new", "pairs", "values")

    def __init__(self, decisions: list[int], values: list[int], pairs: list[tuple[str, ...]]) -> None:
        self.decisions = decisions
        self.values = values
        #: the coverage it reached first (access pairs and lock-class pairs)
        self.pairs = pairs
        self.new = len(pairs)


class FeedbackStrategy(POSStrategy):
    """Feedback-directed scheduling in the spirit of Reads-From Fuzzing (Wolff et al., "Greybox
    Fuzzing for Concurrency Testing", ASPLOS 2024): keep the schedules that reached new coverage
    and mutate them, instead of choosing blindly.

    Coverage is read from what the strategy already sees, the target of each operation it lets run
    (``Runnable.target``: the lock, word, atomic cell or object the operation touches): an ordered
    pair (object, the task that touched it last, the task touching it now) for two different tasks,
    which is a conflicting access pair and its order, and (lock class, lock class) for two
    lock operations of different tasks in a row, a lock-class pair and its order. Names stand for
    objects and tasks, so coverage means the same thing in every execution.

    Each execution either runs fresh (POS) or mutates a corpus schedule, chosen by the new
    coverage it reached: its decisions are followed up to a cut point, with a few of them flipped
    to another runnable task, and the rest is POS again (a re-randomized suffix); its data draws
    are followed while its decisions are. An execution that reaches coverage not seen before
    enters the corpus.

    Determinism: executions are grouped in epochs of `epoch` consecutive indices; the corpus starts
    empty at each epoch, so execution i depends on (seed, i) and the executions of its epoch before
    it. Run in order (a campaign chunk) they follow each other; a strategy asked for execution i
    out of order rebuilds its epoch first by running those executions itself through `runner` (set
    by whoever owns the program: ``run_chunk``, ``build_strategy``). So a campaign finds the same
    failures with any number of jobs, at the cost of up to epoch-1 extra executions per chunk that
    does not start on an epoch boundary. Without a runner an out-of-order execution starts from an
    empty corpus (still a function of (seed, i) alone, but not the same one).
    """

    name = "feedback"

    #: share of executions that mutate a corpus schedule once there is one
    MUTATE = 0.1
    #: corpus entries kept (the oldest goes first)
    CORPUS = 64
    #: share of free decisions that go to a task whose next operation makes an unseen access order
    STEER = 0.8
    #: share of mutations that reverse a corpus entry's new access pair (the rest replay a prefix
    #: with a re-randomized suffix, or flip a few decisions, half and half)
    REVERSE = 0.6

    def __init__(self, seed: int = 0, epoch: int = 50) -> None:
        super().__init__(seed)
        if epoch < 1:
            raise ValueError("the feedback strategy's epoch must be >= 1")
        self.epoch = epoch
        #: runs one whole execution of the program under the given strategy (see the class doc)
        self.runner: Callable[[Any], object] | None = None
        self.coverage: set[tuple[str, ...]] = set()
        self.corpus: list[_Seed] = []
        self._next = -1
        self._epoch_start = -1
        self._reset_execution(None)

    def _reset_execution(self, parent: _Seed | None) -> None:
        self._parent = parent
        #: access pairs this execution tries to make (the reverse of a corpus entry's new pair)
        self._wanted: frozenset[tuple[str, ...]] = frozenset()
        self._cut = 0
        self._flips: frozenset[int] = frozenset()
        self._decisions: list[int] = []
        self._values: list[int] = []
        self._cov: set[tuple[str, ...]] = set()
        self._last: dict[str, str] = {}
        self._last_lock: tuple[str, str] | None = None
        self._active = False

    def new_execution(self, index: int) -> bool:
        start = index - index % self.epoch
        if not (index == self._next and start == self._epoch_start):
            # The state is not the one execution `index` follows from: rebuild its epoch.
            self._absorb()
            self.coverage = set()
            self.corpus = []
            self._epoch_start = start
            self._active = False
            if self.runner is not None:
                for j in range(start, index):
                    self._begin(j)
                    self.runner(self)
        self._begin(index)
        return True

    def _begin(self, index: int) -> None:
        self._absorb()
        super().new_execution(index)
        self._next = index + 1
        rng = self.rng
        parent = None
        if self.corpus and rng.random() < self.MUTATE:
            parent = self._choose(rng)
        self._reset_execution(parent)
        self._active = True
        if parent is not None:
            n = len(parent.decisions)
            op = rng.random()
            access = [p for p in parent.pairs if len(p) == 3]
            if op < self.REVERSE and access:
                # the same two tasks at the same object, the other way round (RFF's mutation of a
                # reads-from pair): steered toward from a fresh schedule
                label, a, b = access[rng.randrange(len(access))]
                self._wanted = frozenset({(label, b, a)})
                self._parent = None
            elif op < (1 + self.REVERSE) / 2:
                # re-randomize a suffix, keeping the prefix as it was
                self._cut = rng.randrange(n + 1)
            else:
                # flip a few decisions and follow the rest of the schedule
                self._cut = n
                k = 1 + rng.randrange(3)
                self._flips = frozenset(rng.randrange(n) for _ in range(k)) if n else frozenset()

    def _choose(self, rng: random.Random) -> _Seed:
        total = sum(e.new for e in self.corpus)
        x = rng.random() * total
        for e in self.corpus:
            x -= e.new
            if x < 0:
                return e
        return self.corpus[-1]

    def _absorb(self) -> None:
        """The execution that just ran: into the corpus if it reached new coverage."""
        if not self._active:
            return
        self._active = False
        new = self._cov - self.coverage
        if new:
            self.coverage |= new
            self.corpus.append(_Seed(self._decisions, self._values, sorted(new)))
            if len(self.corpus) > self.CORPUS:
                del self.corpus[0]

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        k = len(self._decisions)
        parent = self._parent
        t: R | None = None
        if parent is not None and k < self._cut:
            want = parent.decisions[k]
            if k in self._flips and len(runnable) > 1:
                others = [r for r in runnable if r.tid != want]
                t = others[int(self.rng.random() * len(others))]
            else:
                for r in runnable:
                    if r.tid == want:
                        t = r
                        break
        if t is None and len(runnable) > 1 and self.rng.random() < self.STEER:
            # Steer toward an access order not seen yet in this epoch (or the one this execution
            # wants): a task whose next operation would make a new (object, last toucher, task).
            last = self._last
            seen = self.coverage
            wanted = self._wanted
            fresh = []
            aimed = []
            for r in runnable:
                target = r.target
                if target is not None:
                    label = _label(target)
                    prev = last.get(label)
                    if prev is not None and prev != r.name:
                        key = (label, prev, r.name)
                        if key in wanted:
                            aimed.append(r)
                        elif key not in seen and key not in self._cov:
                            fresh.append(r)
            pool = aimed or fresh
            if pool:
                t = pool[int(self.rng.random() * len(pool))]
        if t is None:
            t = super().next_task(runnable, current, is_yielding)
        self._decisions.append(t.tid)
        target = t.target
        if target is not None:
            label = _label(target)
            name = t.name
            prev = self._last.get(label)
            if prev is not None and prev != name:
                self._cov.add((label, prev, name))
            self._last[label] = name
            if getattr(target, "lock_class", None) is not None:
                before = self._last_lock
                if before is not None and before[1] != name:
                    self._cov.add(("lock-order", before[0], label))
                self._last_lock = (label, name)
        return t

    def next_value(self, kind: str, n: int, p: float) -> int:
        j = len(self._values)
        parent = self._parent
        if parent is not None and len(self._decisions) <= self._cut and j < len(parent.values) and parent.values[j] < n:
            value = parent.values[j]
        else:
            value = super().next_value(kind, n, p)
        self._values.append(value)
        return value

    @property
    def period(self) -> int:
        """Executions that share learned state: chunks of a multiple of it need no warm-up."""
        return self.epoch

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "epoch": self.epoch}


class PortfolioStrategy(SeededStrategy):
    """Rotates its member strategies over executions: execution i uses member i mod n."""

    name = "portfolio"

    def __init__(self, members: Sequence[SeededStrategy], seed: int = 0) -> None:
        super().__init__(seed)
        if not members:
            raise ValueError("a portfolio needs at least one strategy")
        self.members = list(members)
        self._active = self.members[0]

    @property
    def runner(self) -> Callable[[Any], object] | None:
        """How to run one execution (see FeedbackStrategy); a member runs its own executions."""
        return getattr(self, "_runner", None)

    @runner.setter
    def runner(self, run: Callable[[Any], object] | None) -> None:
        self._runner = run
        for m in self.members:
            if hasattr(m, "runner"):
                m.runner = run

    @property
    def period(self) -> int | None:
        """Executions that share learned state (a member's epoch, rotated over the members)."""
        epochs = [p for m in self.members if (p := getattr(m, "period", None))]
        return len(self.members) * max(epochs) if epochs else None

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


STRATEGIES = ("random", "pct", "idpct", "pos", "dfs", "feedback", "portfolio")


def attach_runner(strategy: object, run: Callable[[Any], object]) -> None:
    """Give a strategy that learns across executions (FeedbackStrategy, a portfolio with one) the
    means to run the program itself, so that any execution index can be asked for out of order."""
    if hasattr(strategy, "runner"):
        strategy.runner = run


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
    if name == "feedback":
        return FeedbackStrategy(seed)
    if name == "portfolio":
        return PortfolioStrategy(
            [
                RandomStrategy(seed),
                PCTStrategy(seed, depth=depth, steps=steps),
                POSStrategy(seed),
                IterativePCTStrategy(seed, depth=max(depth, 3), steps=steps),
                FeedbackStrategy(seed),
            ],
            seed,
        )
    raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
