"""The controlled executor: drives task coroutines itself, one at a time, in the strategy's order.

There is no event loop. Each task is a coroutine; the executor resumes exactly one with
``coro.send(None)`` and gets back the request the task stopped at (see ``traps``). Between two
requests a task runs atomically, so every interleaving the model can show is a sequence of
choices: which enabled task runs next, plus the nondeterministic data drawn on the way. Both kinds
of choice are recorded in one stream, which is what a schedule file replays.
"""

from __future__ import annotations

from bisect import insort
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from . import hb as hb_mod
from . import traps
from .failures import Failure, ToolError, Violation
from .sites import Site, fmt_site, model_site, short_site
from .traps import YIELDING

if TYPE_CHECKING:
    from .hb import Observer
    from .lockdep import Lockdep
    from .strategies import Strategy
    from .traps import Waitable

_by_tid = attrgetter("tid")

#: Forced re-check rounds in a row, with no write and nobody but the spinners running, after which
#: a spin loop is reported as a hang without waiting for the step bound (a draw such as a BUSY from
#: an agent outside the model may end such a loop by itself, but not this many times in a row).
HANG_ROUNDS = 200
#: Forced rounds in a row after which a signal that ends the loop counts as the only way out: a loop
#: that a draw could still end has ended long before (a BUSY at 5% three times in a row is 1e-4).
HANG_SIGNAL_ROUNDS = 4

#: A choice in the stream: an int is a task id, a 1-tuple ``(value,)`` is a data draw.
Choice = int | tuple[int]


class Task:
    """One controlled task: a coroutine with a stable id (spawn order) and a name."""

    __slots__ = (
        "coro",
        "done",
        "enabled",
        "group",
        "held",
        "name",
        "pending",
        "send",
        "srcu_reads",
        "tid",
    )

    def __init__(self, tid: int, name: str, coro: Coroutine[Any, Any, Any], group: Any) -> None:
        self.tid = tid
        self.name = name
        self.coro = coro
        self.send = coro.send
        self.enabled = True
        #: what the task will do when next resumed: None, an object, or an (object, arg) wait.
        self.pending: Any = None
        self.done = False
        self.group = group
        #: locks held, innermost last: (lock, mode, site) — for lockdep, leaks and might_sleep.
        self.held: list[tuple[Any, Any, Any]] = []
        self.srcu_reads: list[tuple[Any, int, Any]] = []

    @property
    def target(self) -> object | None:
        """What the next operation touches: the strategies' view of `pending` (``strategies.Runnable``)."""
        pending = self.pending
        if type(pending) is tuple:
            obj: object = pending[0]
            return obj
        return None if pending is YIELDING else pending

    def __repr__(self) -> str:
        return f"<Task {self.tid} {self.name}>"


#: The strategy's ``next_task`` as the loop calls it: (runnable, current, is_yielding) -> task.
_Pick = Callable[[list[Task], Task | None, bool], Task]


@dataclass
class ExecutionResult:
    """What one execution did: its choice stream, its outcome and (if recorded) its trace."""

    #: the stream as the executor made it (Task objects and draws); see `choices`
    raw_choices: list[Any]
    failure: Failure | None
    steps: int
    preemptions: int
    task_names: list[str]
    preempted_at: list[int] = field(default_factory=list)
    trace: list[tuple[Any, ...]] | None = None
    lockdep_edges: list[Any] = field(default_factory=list)
    virtual_time: float = 0.0

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def events(self) -> list[dict[str, Any]]:
        """The recorded trace as plain dicts (empty unless the execution recorded)."""
        from ..trace.events import render

        return render(self.trace or [], self.task_names)

    @property
    def choices(self) -> list[Choice]:
        """Task ids and (value,) draws, as schedule files record them (converted on demand)."""
        return [c.tid if type(c) is Task else c for c in self.raw_choices]


class _Clock:
    """The virtual clock as a waitable: a sleeper is ready once time reaches its deadline."""

    __slots__ = ("_live_event", "_waiters", "name", "now")

    def __init__(self) -> None:
        self.name = "clock"
        self._waiters: list[Task] = []
        self.now = 0.0
        self._live_event = None

    def _ready(self, task: Task, deadline: float) -> bool:
        return self.now >= deadline

    def _holders(self) -> list[Task]:
        return []

    def describe(self, arg: Any) -> str:
        return f"sleep until t={arg:g}"


class Executor:
    """Runs one execution of a program under a strategy."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_steps: int = 200_000,
        lockdep: Lockdep | None = None,
        record: bool = False,
        count_preemptions: bool = False,
        data_probs: dict[str, float] | None = None,
        hb: Observer | None = None,
    ) -> None:
        self.strategy = strategy
        #: the happens-before observer (a race detector) that sees every synchronization, or None
        self.hb = hb
        self.max_steps = max_steps
        self.lockdep = lockdep
        self.trace: list[tuple[Any, ...]] | None = [] if record else None
        #: whether a lock operation has anyone to tell (events recorded or an observer): the one
        #: test the lock paths make, so neither costs anything when off
        self.observed = record or hb is not None
        #: preemption counting is off the hot path: it is for shrinking and for failure reports.
        self.count_preemptions = count_preemptions or record
        self.data_probs = data_probs or {}
        #: the strategy's yes/no source when its draws are plain coin flips (see SeededStrategy.coin)
        self._coin: Callable[[], float] | None = getattr(strategy, "coin", None)
        self.tasks: list[Task] = []
        self.enabled: list[Task] = []
        self.current: Task | None = None
        #: the stream as it is made: Task objects for task choices, (value,) for draws.
        self.choices: list[Any] = []
        self.ndraws = 0
        #: scheduling points passed without a decision because no other task could run (see alone())
        self.forced = 0
        self.preemptions = 0
        #: indices into `choices` where the strategy switched away from a still-enabled task.
        self.preempted_at: list[int] = []
        self.clock = _Clock()
        self.failure: Failure | None = None
        self.lockdep_edges: list[Any] = []
        self._finalizers: list[Callable[[], None]] = []
        #: state the layers above keep for this execution only (the oracles' registries)
        self.scoped: dict[Any, Any] = {}
        # Hangs (see _unstick): the spinners last re-enabled with nothing else able to run, where
        # in the stream that happened, what they were waiting on, and how many such rounds in a row.
        self._stuck_tasks: frozenset[Task] = frozenset()
        self._stuck_at = 0
        self._stuck_key: tuple[Any, ...] = ()
        self._stuck_rounds = 0
        #: the spin loop each forced spinner is in (its spin_wait call site)
        self.spin_sites: dict[Task, Site] = {}

    @property
    def step(self) -> int:
        """Scheduling decisions made so far (the number of the step now running)."""
        return len(self.choices) - self.ndraws

    # -- tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None, group: Any = None) -> Task:
        """Add a task; it is enabled at once and runs when the strategy first picks it."""
        t = Task(len(self.tasks), name or f"task{len(self.tasks)}", coro, group)
        self.tasks.append(t)
        self.enabled.append(t)  # the newest task has the largest id: the list stays sorted
        if self.hb is not None:
            self.hb.spawn(self.current, t)
        if self.trace is not None:
            self.trace.append((self.step, self.current.tid if self.current else -1, "spawn", t.name, {}))
        return t

    def at_quiescence(self, check: Callable[[], None]) -> None:
        """Run `check` once every task has finished (oracles that look at the final state)."""
        self._finalizers.append(check)

    # -- the hooks traps call ---------------------------------------------------------------
    def alone(self) -> bool:
        """Whether the running task may pass its next scheduling point without yielding.

        When it is the only enabled task the strategy has nothing to choose: every schedule goes
        on with it, and blocked, sleeping or spin-waiting tasks can only be woken by what it does
        next. Such a forced step is not a decision, so it is neither yielded nor recorded (a
        task's set-up before it spawns, the last vCPU finishing alone). A lone task that never
        blocks still meets the step bound: after max_steps forced steps every point yields.
        """
        if len(self.enabled) == 1 and self.forced < self.max_steps:
            self.forced += 1
            return True
        return False

    def recheck(self, obj: Waitable) -> None:
        enabled = self.enabled
        for w in obj._waiters:
            ready = obj._ready(w, w.pending[1])
            if ready is not w.enabled:
                w.enabled = ready
                if ready:
                    insort(enabled, w, key=_by_tid)
                else:
                    enabled.remove(w)

    def draw(self, kind: str, n: int, p: float) -> int:
        if self.data_probs:
            p = self.data_probs.get(kind, p)
        if n == 2:
            if p <= 0.0:
                return 0
            coin = self._coin
            value = (1 if coin() < p else 0) if coin is not None else self.strategy.next_value(kind, n, p)
        else:
            value = self.strategy.next_value(kind, n, p)
        self.choices.append((value,))
        self.ndraws += 1
        if self.trace is not None:
            self.trace.append((self.step, self.current.tid if self.current else -1, "draw", kind, {"value": value}))
        return value

    def sync_event(self, kind: str, obj: Any, mode: Any) -> None:
        """A lock was taken or released (`kind` is ``lock_acquire`` / ``lock_release``): tell the
        happens-before observer and record it; called only when `observed`."""
        hb = self.hb
        if hb is not None:
            if kind == "lock_acquire":
                hb.acquire(self.current, obj, mode)
            else:
                hb.release(self.current, obj, mode)
        if self.trace is not None:
            self.emit(kind, obj, {"mode": mode})

    def emit(self, kind: str, obj: object | None, fields: dict[str, Any]) -> None:
        assert self.trace is not None
        name = getattr(obj, "name", None) if obj is not None else None
        self.trace.append((self.step, self.current.tid if self.current else -1, kind, name, fields))

    # -- running ----------------------------------------------------------------------------
    def run(self, main: Callable[[], Coroutine[Any, Any, Any]], name: str = "main") -> ExecutionResult:
        """Run `main()` as task 0 and everything it spawns to completion or to the first failure."""
        if traps._get_exe() is not None:
            raise ToolError("a controlled execution is already running in this thread")
        # Bound once per execution, in this context only: live code in other threads (or other
        # contexts of an event loop) still sees live mode while this runs.
        token = traps._current_exe.set(self)
        if self.hb is not None:
            hb_mod.ACTIVE += 1
        try:
            self.spawn(main(), name)
            self._loop()
            if self.failure is None:
                self._quiesce()
        finally:
            traps._current_exe.reset(token)
            if self.hb is not None:
                hb_mod.ACTIVE -= 1
            self._close_all()
        return ExecutionResult(
            raw_choices=self.choices,
            failure=self.failure,
            steps=self.step,
            preemptions=self.preemptions,
            task_names=[t.name for t in self.tasks],
            preempted_at=self.preempted_at,
            trace=self.trace,
            lockdep_edges=self.lockdep_edges,
            virtual_time=self.clock.now,
        )

    def _loop(self) -> None:
        # The hot path: one iteration per scheduling decision. Locals instead of attributes,
        # Task objects appended to the stream (ids are taken once, at the end), nothing allocated.
        # Leaving a wait is done by the wait trap itself, and tracing and preemption counting
        # wrap `pick`, so none of them costs anything here.
        enabled = self.enabled
        record = self.choices.append
        pick: _Pick = self.strategy.next_task
        # A uniform random walk needs no Python call per decision: its choice is made inline,
        # from the strategy's own seeded source, so it replays exactly as next_task() would.
        rand: Callable[[], float] | None = getattr(self.strategy, "uniform", None)
        if self.count_preemptions or self.trace is not None:
            if rand is not None:
                pick = _uniform_pick(rand)
                rand = None
            if self.count_preemptions:
                pick = self._counted(pick)
            if self.trace is not None:
                pick = self._traced(pick)
        cur: Task | None = None
        # Iterating a range is the cheapest step bound there is: running out of it is a livelock.
        for _ in range(self.max_steps):
            if not enabled and not self._unstick():
                return
            if rand is not None:
                t = enabled[int(rand() * len(enabled))]
            else:
                t = pick(enabled, cur, cur is not None and cur.pending is YIELDING)
            if t is not cur:
                cur = t
                self.current = t
            record(t)
            try:
                req = t.send(None)
            except StopIteration:
                self._finished(t)
                if self.failure is not None:
                    return
                continue
            except Violation as v:
                self._fail_violation(v, t)
                return
            except ToolError:
                raise
            except Exception as e:  # noqa: BLE001 - any model exception is a finding
                self._fail_exception(t, e)
                return
            t.pending = req
            if req is not None and type(req) is tuple:
                obj = req[0]
                obj._waiters.append(t)
                if not obj._ready(t, req[1]):
                    t.enabled = False
                    enabled.remove(t)
        self._livelock()

    def _counted(self, pick: _Pick) -> _Pick:
        def counted(enabled: list[Task], cur: Task | None, yielding: bool) -> Task:
            t = pick(enabled, cur, yielding)
            if t is not cur and cur is not None and cur.enabled and cur.pending is not YIELDING:
                self.preemptions += 1
                self.preempted_at.append(len(self.choices))
            return t

        return counted

    def _traced(self, pick: _Pick) -> _Pick:
        trace = self.trace
        assert trace is not None

        def traced(enabled: list[Task], cur: Task | None, yielding: bool) -> Task:
            t = pick(enabled, cur, yielding)
            trace.append((self.step + 1, t.tid, "run", t.pending, None))
            return t

        return traced

    def _finished(self, t: Task) -> None:
        t.done = True
        t.pending = None
        if t.enabled:
            t.enabled = False
            self.enabled.remove(t)
        if t.held:
            lock, _mode, site = t.held[-1]
            self._fail(
                "lock_leak",
                f"lock_leak:{lock.lock_class}",
                f"task {t.name} ended still holding {lock.name} (taken at {fmt_site(site)})",
                t,
                {"lock": lock.name, "site": fmt_site(site)},
            )
            return
        if t.srcu_reads:
            srcu = t.srcu_reads[-1][0]
            self._fail(
                "lock_leak",
                f"lock_leak:{srcu.lock_class}",
                f"task {t.name} ended inside a read section of {srcu.name}",
                t,
                {"lock": srcu.name},
            )
            return
        if t.group is not None:
            t.group._child_done(t)

    def _unstick(self) -> bool:
        """Nothing is enabled: finish, advance virtual time, or report the deadlock."""
        if self.failure is not None:
            return False
        blocked = [t for t in self.tasks if not t.done]
        if not blocked:
            return False
        sleepers = self.clock._waiters
        if sleepers:
            # Ties at the earliest deadline all become enabled together: the strategy orders them.
            self.clock.now = min(t.pending[1] for t in sleepers)
            self.recheck(self.clock)
            return True
        spinners = [t for t in blocked if getattr(t.pending[0], "spin", False)]
        if spinners:
            # Nobody is left to write what the spinners wait for: they re-check on their own now,
            # as a spin loop does. Rounds of this with nothing written and nobody else running are
            # a hang: Linux reports the task as hung until a signal (or nothing) ends the loop.
            # Virtual time moving on is progress too (a retry that gives up after a timeout).
            key = (self.clock.now, *((t.tid, t.pending[1]) for t in spinners))
            if key == self._stuck_key and self._only_stuck_ran():
                self._stuck_rounds += 1
            else:
                self._stuck_rounds = 1
            self._stuck_key = key
            self._stuck_at = len(self.choices)
            self._stuck_tasks = frozenset(spinners)
            if self._stuck_rounds > HANG_ROUNDS:
                self._hang(spinners, f"{HANG_ROUNDS} re-checks of unchanged state with nobody else able to run")
                return False
            for t in spinners:
                t.enabled = True
                insort(self.enabled, t, key=_by_tid)
            return True
        self._deadlock(blocked)
        return False

    def _deadlock(self, blocked: list[Task]) -> None:
        lines = []
        waits_for: dict[Task, list[Task]] = {}
        for t in blocked:
            obj, arg = t.pending
            holders = [h for h in obj._holders() if isinstance(h, Task)]
            waits_for[t] = holders
            held_by = ", ".join(h.name for h in holders) or "nobody"
            lines.append(f"{t.name} waits for {obj.describe(arg)} held by {held_by}")
        cycle = _find_cycle(waits_for)
        if cycle:
            lines.append("wait-for cycle: " + " -> ".join(t.name for t in cycle + cycle[:1]))
        what = sorted({t.pending[0].name for t in blocked})
        self._fail(
            "deadlock",
            "deadlock:" + ",".join(what),
            "; ".join(lines),
            None,
            {"blocked": lines, "cycle": [t.name for t in cycle]},
        )

    def _only_stuck_ran(self) -> bool:
        """Whether only the spinners last re-enabled by `_unstick` have run since (cold path)."""
        stuck = self._stuck_tasks
        return bool(stuck) and all(type(c) is not Task or c in stuck for c in self.choices[self._stuck_at :])

    def stuck_signal(self, site: Site) -> None:
        """A signal was drawn true at `site` (a signal_pending() check): if the running task is a
        spinner that has re-checked unchanged state for rounds with nobody else able to run, the
        signal is the only thing ending its loop, and the execution is a hang."""
        t = self.current
        if (
            t is not None
            and self._stuck_rounds >= HANG_SIGNAL_ROUNDS
            and t in self._stuck_tasks
            and self._only_stuck_ran()
        ):
            self._hang([t], f"a signal drawn at {fmt_site(site)} is all that ends it", signal_site=site)

    def _hang(self, tasks: list[Task], how: str, signal_site: Site = None) -> None:
        sites = [self.spin_sites.get(t) for t in tasks]
        where = sorted({short_site(s) for s in sites if s is not None}) or ["?"]
        lines = [f"{t.name} in the loop at {fmt_site(s)}" for t, s in zip(tasks, sites, strict=True)]
        evidence: dict[str, Any] = {"loop": [fmt_site(s) for s in sites], "tasks": [t.name for t in tasks]}
        if signal_site is not None:
            evidence["signal"] = fmt_site(signal_site)
        self._fail(
            "hang",
            "hang:" + ",".join(where),
            "hung task: " + "; ".join(lines) + f" re-checks unchanged state ({how})",
            tasks[0] if len(tasks) == 1 else None,
            evidence,
        )

    def _livelock(self) -> None:
        if self._stuck_tasks and self._only_stuck_ran():
            # The step bound ended forced re-checks: the spinners' loop never ended by itself.
            self._hang(sorted(self._stuck_tasks, key=_by_tid), f"the {self.max_steps}-step bound ended it")
            return
        # The spinners are the tasks still running in the last fifth of the bound.
        span = max(10, min(1000, self.max_steps // 5))
        window = [c.tid for c in self.choices[-span:] if type(c) is Task]
        spinning = Counter(window).most_common()
        names = [f"{self.tasks[tid].name} ({n} of the last {len(window)} steps)" for tid, n in spinning]
        self._fail(
            "livelock",
            "livelock:" + ",".join(sorted(self.tasks[tid].name for tid, _ in spinning)),
            f"no progress bound: {self.max_steps} steps exceeded; spinning: {', '.join(names)} (a bigger "
            "guest or more vCPUs make a correct execution longer too: raise the bound with --max-steps "
            "to tell the two apart)",
            None,
            {"spinning": names},
        )

    def _quiesce(self) -> None:
        for check in self._finalizers:
            try:
                check()
            except Violation as v:
                self._fail_violation(v, None)
                return

    def _fail_exception(self, t: Task, e: BaseException) -> None:
        site = model_site(e)
        self._fail(
            "exception",
            f"exception:{type(e).__name__}@{site}",
            f"{type(e).__name__}: {e}",
            t,
            {"site": site, "type": type(e).__name__},
        )

    def _fail(
        self,
        kind: str,
        signature: str,
        message: str,
        t: Task | None,
        evidence: dict[str, Any],
        step: int | None = None,
    ) -> None:
        if self.failure is not None:
            return
        task = t.name if t is not None else None
        step = self.step if step is None else step
        self.failure = Failure(kind, signature, message, step, task, dict(evidence))
        if self.trace is not None:
            self.trace.append((step, t.tid if t else -1, "failure", kind, {"message": message, **evidence}))

    def _fail_violation(self, v: Violation, t: Task | None) -> None:
        # Reported at the step that raised it: on its way out the exception may pass `finally:`
        # blocks that release locks, and each release is a scheduling point.
        self._fail(v.kind, v.signature, v.message, t, v.evidence, v.step)

    def fail(self, violation: Violation) -> None:
        """Record a violation found outside any task (e.g. by an oracle hook)."""
        self._fail_violation(violation, self.current)

    def _close_all(self) -> None:
        # Unfinished coroutines are closed with the executor detached, so their cleanup code
        # cannot schedule; whatever it raises belongs to an execution that is already over.
        for t in self.tasks:
            if not t.done:
                try:
                    t.coro.close()
                except BaseException:  # noqa: BLE001
                    pass


def _uniform_pick(rand: Callable[[], float]) -> _Pick:
    def pick(enabled: list[Task], cur: Task | None, yielding: bool) -> Task:
        return enabled[int(rand() * len(enabled))]

    return pick


def _find_cycle(graph: dict[Task, list[Task]]) -> list[Task]:
    for start in graph:
        path: list[Task] = []
        seen: set[Task] = set()
        node: Task | None = start
        while node is not None and node not in seen:
            seen.add(node)
            path.append(node)
            nxt = graph.get(node) or []
            node = nxt[0] if nxt else None
        if node is not None and node in path:
            return path[path.index(node) :]
    return []


class TaskGroup:
    """``async with asyncvm.TaskGroup() as tg: tg.spawn(fn, *args, name=...)``; joins on exit.

    Under a controlled execution the children are executor tasks with stable ids in spawn order;
    in live mode the group is an anyio task group, so the same scenario code embeds unchanged.
    """

    def __init__(self) -> None:
        self.name = "taskgroup"
        self._waiters: list[Task] = []
        self._live_event: Any = None
        self._exe: Executor | None = None
        self._live: Any = None
        self.children: list[Task] = []

    async def __aenter__(self) -> TaskGroup:
        self._exe = traps.active()
        if self._exe is None:
            import anyio

            self._live = anyio.create_task_group()
            await self._live.__aenter__()
        return self

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None) -> None:
        """Start `fn(*args)` as a new task; it first runs when the strategy picks it."""
        label = name or getattr(fn, "__name__", "task")
        if self._live is not None:
            self._live.start_soon(fn, *args, name=label)
            return
        if self._exe is None:
            raise RuntimeError("TaskGroup.spawn() outside 'async with'")
        self.children.append(self._exe.spawn(fn(*args), label, self))

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if self._live is not None:
            return bool(await self._live.__aexit__(exc_type, exc, tb))
        if exc_type is None:
            self.name = "join(" + ",".join(c.name for c in self.children) + ")"
            await traps.wait(self, None)
            exe = self._exe
            if exe is not None and exe.hb is not None:
                exe.hb.join(exe.current, self.children)
        return None

    def _ready(self, task: Any, arg: Any) -> bool:
        return all(c.done for c in self.children)

    def _holders(self) -> list[Task]:
        return [c for c in self.children if not c.done]

    def describe(self, arg: Any) -> str:
        return "join of " + ", ".join(c.name for c in self.children if not c.done)

    def _child_done(self, t: Task) -> None:
        traps.notify(self)
