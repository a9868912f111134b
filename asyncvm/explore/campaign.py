"""Campaigns: what one asks for (CampaignSpec), what a chunk of its executions found
(ChunkResult, run_chunk) and what the whole campaign found (Report, FoundFailure).

Execution i depends only on (seed, i): a chunk [first, first + count) gives the same result in
any process. `driver.Campaign` runs the chunks and merges them in execution order.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..runtime.executor import ExecutionResult
from ..runtime.failures import Failure, ToolError
from ..runtime.lockdep import Edge
from ..runtime.strategies import attach_runner, make_strategy
from .engine import DEFAULT_MAX_STEPS, Program, ScenarioFn, scenario_params
from .scenarios import get_scenario
from .schedule import Schedule


@dataclass
class FoundFailure:
    """A distinct failure signature found by a campaign.

    `first_run` is the first execution that failed this way; `schedule` is the smallest witness
    the campaign saw (fewest preemptions, then fewest steps, then the earliest), the one to shrink,
    and `failure` is as that execution reported it. `shrunk` is its shrunk schedule, once made.
    """

    failure: Failure
    schedule: Schedule
    count: int = 1
    first_run: int = 0
    shrunk: Schedule | None = None
    #: the known kernel behaviour this failure is (the scenario declares it for the profile), or
    #: None for a new finding
    known: str | None = None

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
        known = f" [{self.known}]" if self.known else ""
        return f"{self.failure} (first in run {self.first_run}, {self.count} runs){known}"


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

    @property
    def findings(self) -> list[FoundFailure]:
        """The failures that are not a known kernel behaviour of the profile."""
        return [f for f in self.failures if f.known is None]

    def first(self, signature_prefix: str = "") -> FoundFailure | None:
        for f in self.failures:
            if f.signature.startswith(signature_prefix):
                return f
        return None

    def summary(self) -> str:
        head = f"{self.scenario}: {self.runs} runs, {self.failing_runs} failing, {len(self.failures)} distinct"
        if len(self.findings) < len(self.failures):
            head += f" ({len(self.failures) - len(self.findings)} known kernel behaviour)"
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
                    "witness_run": f.schedule.execution,
                    "preemptions": f.schedule.preemptions,
                    "steps": f.schedule.steps,
                    "shrunk": None if f.shrunk is None else _size(f.shrunk),
                    "known": f.known,
                }
                for f in self.failures
            ],
        }


def _size(shrunk: Schedule) -> dict[str, Any]:
    return {
        "preemptions": shrunk.preemptions,
        "steps": shrunk.steps,
        "minimal": bool(shrunk.strategy.get("minimal", False)),
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
    detect_races: bool = False
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
            detect_races=self.detect_races,
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
    #: index -> (preemptions, steps) of the failing executions that may be their signature's
    #: smallest witness (see run_chunk)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "count": self.count,
            "runs": self.runs,
            "steps": self.steps,
            "exhausted": self.exhausted,
            "stopped": self.stopped,
            "failures": [[i, f.to_json(), _enc(c)] for i, f, c in self.failures],
            "edges": [[i, [e._asdict() for e in es], _enc(c)] for i, es, c in self.edges],
            "sizes": [[i, p, s] for i, (p, s) in self.sizes.items()],
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
            sizes={int(i): (int(p), int(s)) for i, p, s in d.get("sizes", [])},
        )


def _enc(choices: list[Any]) -> list[Any]:
    return [c if type(c) is int else [c[0]] for c in choices]


def _dec(raw: list[Any]) -> list[Any]:
    return [c if type(c) is int else (c[0],) for c in raw]


def run_chunk(
    spec: CampaignSpec, first: int, count: int, fn: ScenarioFn | None = None, *, deadline: float | None = None
) -> ChunkResult:
    """Run executions first .. first+count-1 of the campaign (in a worker or in-process).

    With a `deadline` the chunk ends early once it passed (for DFS, whose one chunk is the campaign).

    Hunting does not count preemptions (it would slow every execution down). A failing execution
    is replayed once with counting when it may be its signature's smallest witness: unless this
    chunk already has one of that signature with no preemptions and no more steps. The smallest of
    the chunk is always measured, so the campaign finds the same smallest witness for any chunking.
    """
    program = spec.program(fn)
    strat = make_strategy(
        spec.strategy, spec.seed, depth=spec.depth, steps=spec.steps or 1000, preemptions=spec.preemptions
    )
    # A strategy that learns across executions rebuilds its state for `first` by running the program.
    attach_runner(strat, program.run)
    res = ChunkResult(first, count)
    seen: set[tuple[str, str]] = set()
    smallest: dict[str, tuple[int, int]] = {}
    for index in range(first, first + count):
        if deadline is not None and time.perf_counter() > deadline:
            break
        if not strat.new_execution(index):
            res.exhausted = True
            break
        r = program.run(strat)
        if r.failure is not None:
            check_setup(program, r)
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
            size = _measure(program, r, index, smallest.get(r.failure.signature))
            if size is not None:
                res.sizes[index] = size
                smallest[r.failure.signature] = min(size, smallest.get(r.failure.signature, size))
    return res


def check_setup(program: Program, r: ExecutionResult) -> None:
    """An exception the scenario raised in its own set-up, before it started any task, is a usage
    error (parameters the model refuses, a broken scenario), not a race: raise it as one."""
    f = r.failure
    if f is not None and f.kind == "exception" and len(r.task_names) <= 1:
        given = ", ".join(f"{k}={v!r}" for k, v in program.params.items())
        raise ToolError(
            f"scenario {program.name} failed in its set-up, before any task started: {f.message}"
            f"{f' (parameters: {given})' if given else ''}; not a finding"
        )


def _measure(
    program: Program, r: ExecutionResult, index: int, smallest: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(preemptions, steps) of failing execution `index`, unless it cannot beat `smallest`."""
    if smallest is not None and smallest[0] == 0 and smallest[1] <= r.steps:
        return None
    try:
        again = program.rerun(r.choices, execution=index)
    except ToolError:
        return None  # the merge's own replay reports it if this one is ever kept
    if again.failure is None or r.failure is None or again.failure.signature != r.failure.signature:
        return None
    return (again.preemptions, again.steps)


def _with_execution(e: Edge, index: int) -> Edge:
    return e if e.execution == index else Edge(e.before, e.after, e.before_site, e.after_site, e.task, index)
