"""Campaigns: many executions of one program, split into chunks that run in this process, in
worker processes or on Dask, and merged back in execution order.

Execution i depends only on (seed, i), and the merge visits executions in index order, so a
campaign finds the same failures, with the same representative schedules, however its chunks were
spread. Lock-order inversions whose two halves lie in different executions are found by the merge:
each execution reports the lockdep edges it added, and the campaign graph takes them in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..check.lockdep import Edge, Lockdep
from ..runtime.failures import Failure, ToolError, Violation
from ..runtime.strategies import make_strategy
from .engine import (
    DEFAULT_MAX_STEPS,
    Program,
    ScenarioFn,
    _confirm,
    calibrate_steps,
    scenario_name,
    scenario_params,
)
from .scenarios import get_scenario
from .schedule import Schedule

CHUNK = 250


@dataclass
class FoundFailure:
    """A distinct failure signature found by a campaign, with its first failing schedule."""

    failure: Failure
    schedule: Schedule
    count: int = 1
    first_run: int = 0

    @property
    def signature(self) -> str:
        return self.failure.signature

    @property
    def kind(self) -> str:
        return self.failure.kind

    @property
    def message(self) -> str:
        return self.failure.message

    @property
    def task(self) -> str | None:
        return self.failure.task

    def __str__(self) -> str:
        return f"{self.failure} (first in run {self.first_run}, {self.count} runs)"


@dataclass
class Report:
    """What a campaign found."""

    scenario: str
    strategy: dict[str, Any]
    runs: int = 0
    failing_runs: int = 0
    failures: list[FoundFailure] = field(default_factory=list)
    exhausted: bool = False
    elapsed: float = 0.0
    steps: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def signatures(self) -> list[str]:
        return [f.signature for f in self.failures]

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.elapsed if self.elapsed > 0 else 0.0

    def first(self, signature_prefix: str = "") -> FoundFailure | None:
        for f in self.failures:
            if f.signature.startswith(signature_prefix):
                return f
        return None

    def summary(self) -> str:
        head = f"{self.scenario}: {self.runs} runs, {self.failing_runs} failing, {len(self.failures)} distinct"
        if self.exhausted:
            head += " (schedule space exhausted)"
        return "\n".join([head] + [f"  {f}" for f in self.failures])

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "strategy": self.strategy,
            "runs": self.runs,
            "failing_runs": self.failing_runs,
            "exhausted": self.exhausted,
            "elapsed_s": round(self.elapsed, 3),
            "runs_per_second": round(self.runs_per_second, 1),
            "steps": self.steps,
            "failures": [
                {
                    "signature": f.signature,
                    "kind": f.kind,
                    "message": f.message,
                    "task": f.task,
                    "first_run": f.first_run,
                    "count": f.count,
                    "preemptions": f.schedule.preemptions,
                    "steps": f.schedule.steps,
                }
                for f in self.failures
            ],
        }


@dataclass
class CampaignSpec:
    """Everything a worker needs to run executions of a campaign (picklable, JSON-able)."""

    scenario: str
    module: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    profile: str = "6.18"
    bugs: list[str] = field(default_factory=list)
    max_steps: int = DEFAULT_MAX_STEPS
    data_probs: dict[str, float] = field(default_factory=dict)
    lockdep: bool = True
    strategy: str = "pct"
    seed: int = 0
    depth: int = 3
    steps: int | None = None
    preemptions: int = 2
    runs: int = 1000
    first_run: int = 0
    stop_on_first_failure: bool = False

    def program(self, fn: ScenarioFn | None = None) -> Program:
        if fn is None:
            fn = get_scenario(self.scenario, self.module).fn
        return Program(
            fn,
            scenario_params(fn, self.params),
            self.profile,
            tuple(self.bugs),
            self.max_steps,
            dict(self.data_probs),
            self.lockdep,
        )

    def strategy_description(self) -> dict[str, Any]:
        return make_strategy(
            self.strategy, self.seed, depth=self.depth, steps=self.steps or 1000, preemptions=self.preemptions
        ).describe()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChunkResult:
    """What one chunk of executions [first, first + count) produced."""

    first: int
    count: int
    runs: int = 0
    steps: int = 0
    exhausted: bool = False
    stopped: bool = False
    #: (index, failure, choices)
    failures: list[tuple[int, Failure, list[Any]]] = field(default_factory=list)
    #: (index, edges new to this chunk, choices)
    edges: list[tuple[int, list[Edge], list[Any]]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "count": self.count,
            "runs": self.runs,
            "steps": self.steps,
            "exhausted": self.exhausted,
            "stopped": self.stopped,
            "failures": [[i, f.to_json(), _enc(c)] for i, f, c in self.failures],
            "edges": [[i, [asdict(e) for e in es], _enc(c)] for i, es, c in self.edges],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkResult:
        return cls(
            first=d["first"],
            count=d["count"],
            runs=d["runs"],
            steps=d["steps"],
            exhausted=d["exhausted"],
            stopped=d.get("stopped", False),
            failures=[(i, Failure.from_json(f), _dec(c)) for i, f, c in d["failures"]],
            edges=[(i, [Edge(**e) for e in es], _dec(c)) for i, es, c in d["edges"]],
        )


def _enc(choices: list[Any]) -> list[Any]:
    return [c if type(c) is int else [c[0]] for c in choices]


def _dec(raw: list[Any]) -> list[Any]:
    return [c if type(c) is int else (c[0],) for c in raw]


def run_chunk(spec: CampaignSpec, first: int, count: int, fn: ScenarioFn | None = None) -> ChunkResult:
    """Run executions first .. first+count-1 of the campaign (in a worker or in-process)."""
    program = spec.program(fn)
    strat = make_strategy(
        spec.strategy, spec.seed, depth=spec.depth, steps=spec.steps or 1000, preemptions=spec.preemptions
    )
    res = ChunkResult(first, count)
    seen: set[tuple[str, str]] = set()
    for index in range(first, first + count):
        if not strat.start(index):
            res.exhausted = True
            break
        r = program.run(strat)
        res.runs += 1
        res.steps += r.steps
        fresh = [e for e in r.lockdep_edges if (e.before, e.after) not in seen]
        if fresh:
            for e in fresh:
                seen.add((e.before, e.after))
            res.edges.append((index, [_with_execution(e, index) for e in fresh], r.choices))
        if r.failure is not None:
            res.failures.append((index, r.failure, r.choices))
            if spec.stop_on_first_failure:
                res.stopped = True
                break
    return res


def _with_execution(e: Edge, index: int) -> Edge:
    return e if e.execution == index else Edge(e.before, e.after, e.before_site, e.after_site, e.task, index)


class Merger:
    """Merges chunk results in execution order into a Report (and tells a sink about each find)."""

    def __init__(
        self,
        spec: CampaignSpec,
        program: Program,
        on_failure: Callable[[FoundFailure], None] | None = None,
    ) -> None:
        self.spec = spec
        self.program = program
        self.report = Report(program.name, spec.strategy_description())
        self.graph = Lockdep()
        self.contributors: dict[int, list[Any]] = {}
        self.by_sig: dict[str, FoundFailure] = {}
        self.on_failure = on_failure
        self._pending: dict[int, ChunkResult] = {}
        self.next_first = spec.first_run
        self.done = False

    def add(self, chunk: ChunkResult) -> None:
        self._pending[chunk.first] = chunk
        while self.next_first in self._pending and not self.done:
            c = self._pending.pop(self.next_first)
            self._merge(c)
            self.next_first = c.first + c.count
            if c.exhausted or c.stopped:
                self.done = True

    def _merge(self, chunk: ChunkResult) -> None:
        rep = self.report
        rep.runs += chunk.runs
        rep.steps += chunk.steps
        rep.exhausted |= chunk.exhausted
        events: list[tuple[int, int, Any]] = [(i, 0, (es, c)) for i, es, c in chunk.edges]
        events += [(i, 1, (f, c)) for i, f, c in chunk.failures]
        failing: set[int] = set()
        for index, kind, payload in sorted(events, key=lambda e: (e[0], e[1])):
            if kind == 0:
                edges, choices = payload
                self.contributors[index] = choices
                for e in edges:
                    try:
                        self.graph.merge(e)
                    except Violation as v:
                        if index not in failing:
                            failing.add(index)
                            rep.failing_runs += 1
                        f = Failure(v.kind, v.signature, v.message, 0, e.task, dict(v.evidence))
                        self._record(index, f, choices, merged=True)
            else:
                failure, choices = payload
                if index not in failing:
                    failing.add(index)
                    rep.failing_runs += 1
                self._record(index, failure, choices)

    def _record(self, index: int, failure: Failure, choices: list[Any], merged: bool = False) -> None:
        found = self.by_sig.get(failure.signature)
        if found is not None:
            found.count += 1
            return
        schedule = Schedule(
            scenario=self.program.name,
            params=dict(self.program.params),
            profile=self.program.profile,
            bugs=list(self.program.bugs),
            strategy=self.report.strategy,
            seed=self.spec.seed,
            execution=index,
            failure=failure,
            max_steps=self.program.max_steps,
            data_probs=dict(self.program.data_probs),
            lockdep=self.program.lockdep,
            choices=list(choices),
        )
        if failure.kind == "lockdep":
            schedule.prelude = [
                self.contributors[i]
                for i in failure.evidence.get("executions", [])
                if i != index and i in self.contributors
            ]
        if merged:
            # Replayed after its preludes the execution fails at the closing acquisition, before
            # its end: keep the stream up to there.
            schedule.choices = self.program.replay(schedule, strict=False).choices
        again = _confirm(self.program, schedule)
        schedule.failure = again.failure
        schedule.tasks = list(again.task_names)
        schedule.steps = again.steps
        found = FoundFailure(again.failure or failure, schedule, 1, index)
        self.by_sig[failure.signature] = found
        self.report.failures.append(found)
        if self.on_failure is not None:
            self.on_failure(found)


def chunks(first: int, runs: int, size: int) -> Iterator[tuple[int, int]]:
    end = first + runs
    while first < end:
        n = min(size, end - first)
        yield first, n
        first += n


def prepare(spec: CampaignSpec, fn: ScenarioFn | None = None) -> Program:
    """Resolve the program and fill in what the spec leaves to measurement (PCT's step count)."""
    program = spec.program(fn)
    if spec.steps is None and spec.strategy in ("pct", "idpct", "portfolio"):
        spec.steps = calibrate_steps(program, spec.seed)
    return program


def explore(
    scenario: ScenarioFn | str,
    *,
    strategy: str = "pct",
    runs: int = 1000,
    seed: int = 0,
    depth: int = 3,
    steps: int | None = None,
    preemptions: int = 2,
    params: Mapping[str, Any] | None = None,
    profile: str = "6.18",
    bugs: Iterable[str] = (),
    max_steps: int = DEFAULT_MAX_STEPS,
    data_probs: Mapping[str, float] | None = None,
    stop_on_first_failure: bool = False,
    time_budget: float | None = None,
    first_run: int = 0,
    lockdep: bool = True,
    jobs: int = 1,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Run `scenario` under `runs` schedules chosen by `strategy`; return the distinct failures.

    `scenario` is an ``async def scenario(kvm, **params)`` or a registered scenario's name.
    Execution i depends only on (seed, i), so the same seed finds the same failures whatever
    `jobs` is. With `jobs` > 1 the scenario must be registered (workers look it up by name).
    """
    from ..bugs import check_bug_names

    check_bug_names(bugs)
    fn = None if isinstance(scenario, str) else scenario
    name = scenario if isinstance(scenario, str) else scenario_name(scenario)
    spec = CampaignSpec(
        scenario=name,
        params=dict(params or {}),
        profile=profile,
        bugs=list(bugs),
        max_steps=max_steps,
        data_probs=dict(data_probs or {}),
        lockdep=lockdep,
        strategy=strategy,
        seed=seed,
        depth=depth,
        steps=steps,
        preemptions=preemptions,
        runs=runs,
        first_run=first_run,
        stop_on_first_failure=stop_on_first_failure,
    )
    program = prepare(spec, fn)
    merger = Merger(spec, program)
    t0 = time.perf_counter()
    if jobs > 1 and spec.strategy != "dfs":
        if fn is not None and getattr(fn, "scenario_name", None) is None:
            raise ToolError("explore(jobs > 1) needs a registered scenario (@asyncvm.scenario)")
        from .parallel import run_local_pool

        for chunk in run_local_pool(spec, jobs, time_budget=time_budget):
            merger.add(chunk)
            _tick(merger, t0, progress)
            if merger.done:
                break
    else:
        deadline = t0 + time_budget if time_budget else None
        # DFS keeps its search stack across executions: it runs as one sequential chunk.
        if spec.strategy == "dfs":
            size = spec.runs
        elif progress or deadline or stop_on_first_failure:
            size = 1
        else:
            size = CHUNK
        for first, n in chunks(spec.first_run, spec.runs, size):
            merger.add(run_chunk(spec, first, n, fn))
            _tick(merger, t0, progress)
            if merger.done or (deadline is not None and time.perf_counter() > deadline):
                break
    merger.report.elapsed = time.perf_counter() - t0
    return merger.report


def _tick(merger: Merger, t0: float, progress: Callable[[Report], None] | None) -> None:
    if progress is not None:
        merger.report.elapsed = time.perf_counter() - t0
        progress(merger.report)
