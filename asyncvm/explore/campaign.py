"""Campaigns: what one asks for (CampaignSpec), what a chunk of its executions found
(ChunkResult, run_chunk) and what the whole campaign found (Report, FoundFailure).

Execution i depends only on (seed, i): a chunk [first, first + count) gives the same result in
any process. `driver.Campaign` runs the chunks and merges them in execution order.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..runtime.failures import Failure
from ..runtime.lockdep import Edge
from ..runtime.strategies import make_strategy
from .engine import DEFAULT_MAX_STEPS, Program, ScenarioFn, scenario_params
from .scenarios import get_scenario
from .schedule import Schedule


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


def run_chunk(
    spec: CampaignSpec, first: int, count: int, fn: ScenarioFn | None = None, *, deadline: float | None = None
) -> ChunkResult:
    """Run executions first .. first+count-1 of the campaign (in a worker or in-process).

    With a `deadline` the chunk ends early once it passed (for DFS, whose one chunk is the campaign).
    """
    program = spec.program(fn)
    strat = make_strategy(
        spec.strategy, spec.seed, depth=spec.depth, steps=spec.steps or 1000, preemptions=spec.preemptions
    )
    res = ChunkResult(first, count)
    seen: set[tuple[str, str]] = set()
    for index in range(first, first + count):
        if deadline is not None and time.perf_counter() > deadline:
            break
        if not strat.new_execution(index):
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
