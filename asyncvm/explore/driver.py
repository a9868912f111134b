"""The campaign driver: the one loop behind explore(), `asyncvm stress` (runner.py), the pytest
plugin and Dask campaigns.

It sizes the chunks, runs DFS as one sequential chunk, picks the executor (this process, worker
processes or a Dask cluster), keeps the deadline, merges chunk results in execution order and
tells its callers' hooks (progress, a ledger, failure artifacts) about each step.

Execution i depends only on (seed, i), and the merge visits executions in index order, so a
campaign finds the same failures, with the same representative schedules, however its chunks were
sized and spread. A signature's representative is the smallest witness the campaign saw (fewest
preemptions, then fewest steps, then the earliest): the best place for shrinking to start.
Lock-order inversions whose two halves lie in different executions are found by the merge: each
execution reports the lockdep edges it added, and the campaign graph takes them in order.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from ..runtime.failures import Failure, ToolError, Violation
from ..runtime.lockdep import Lockdep
from ..runtime.strategies import make_strategy
from .campaign import CampaignSpec, ChunkResult, FoundFailure, Report, run_chunk
from .engine import DEFAULT_MAX_STEPS, Program, ScenarioFn, calibrate_steps, check_scenario, confirm, scenario_name
from .executors import EXECUTION_LOCK, connect_dask, dask_slots, run_dask, run_here, run_pool
from .files import MAX_JOBS, SpecModel, explain
from .known import known_behaviour
from .schedule import Schedule

#: the largest chunk: big enough to amortize the IPC and the ledger's fsync
CHUNK = 250
#: under a deadline, the longest a chunk should take, as a share of the time budget
DEADLINE_SHARE = 1 / 20


def chunks(first: int, runs: int, size: int, done: Iterable[tuple[int, int]] = ()) -> Iterator[tuple[int, int]]:
    """The campaign's chunk grid: (first, count) pairs covering executions [first, first + runs)
    that no `done` chunk (first, count) covers already (a resumed campaign, perhaps extended past
    a last chunk that was cut short)."""
    end = first + runs
    for done_first, done_count in [*sorted(done), (end, 0)]:
        stop = min(done_first, end)
        while first < stop:
            n = min(size, stop - first)
            yield first, n
            first += n
        first = max(first, done_first + done_count)


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
                self._record(index, failure, choices, size=chunk.sizes.get(index))

    def _record(
        self,
        index: int,
        failure: Failure,
        choices: list[Any],
        merged: bool = False,
        size: tuple[int, int] | None = None,
    ) -> None:
        """Count a failing execution; a new signature's first, or a smaller witness of a known one
        (`size`: its (preemptions, steps), when the chunk measured it), is replayed and kept."""
        found = self.by_sig.get(failure.signature)
        if found is not None:
            found.count += 1
            if size is not None and size < (found.schedule.preemptions, found.schedule.steps):
                found.schedule, found.failure = self._witness(index, failure, choices, merged)
            return
        schedule, kept = self._witness(index, failure, choices, merged)
        known = known_behaviour(self.program.scenario, self.program.profile, kept)
        found = FoundFailure(kept, schedule, 1, index, known=known)
        self.by_sig[failure.signature] = found
        self.report.failures.append(found)
        if self.on_failure is not None:
            self.on_failure(found)

    def _witness(self, index: int, failure: Failure, choices: list[Any], merged: bool) -> tuple[Schedule, Failure]:
        """Execution `index`'s schedule, replayed once to confirm it and count its preemptions."""
        prelude: list[list[Any]] = []
        if merged:
            # The executions whose lockdep edges close the cycle run first. (An execution that
            # failed lockdep on its own did so with its own graph: it needs no prelude.)
            prelude = [
                self.contributors[i]
                for i in failure.evidence.get("executions", [])
                if i != index and i in self.contributors
            ]
        if merged:
            # Replayed after its preludes the execution fails at the closing acquisition, before
            # its end: keep the stream up to there.
            choices = self.program.rerun(choices, prelude=prelude, execution=index, strict=False).choices
        again = confirm(self.program, choices, failure, prelude=prelude, execution=index)
        schedule = Schedule.from_execution(
            self.program, again, strategy=self.report.strategy, seed=self.spec.seed, execution=index, prelude=prelude
        )
        return schedule, again.failure or failure


class Campaign:
    """One campaign: `spec`'s executions, run in chunks by one executor and merged in order.

    `fn` is the scenario when the caller has it (explore() may get an unregistered one); otherwise
    the spec names a registered scenario. `jobs` > 1 runs chunks on worker processes; `dask` (a
    scheduler address, a ``distributed.Client`` or a cluster) runs them on Dask instead. `chunk`
    fixes the chunk size (a resumed campaign keeps the grid its ledger was written in); otherwise
    it is sized here. Use it as a context manager, or call close(): it may hold a Dask client.
    """

    def __init__(
        self,
        spec: CampaignSpec,
        *,
        fn: ScenarioFn | None = None,
        jobs: int = 1,
        dask: Any = None,
        time_budget: float | None = None,
        chunk: int | None = None,
    ) -> None:
        self.spec = spec
        self.program = spec.program(fn)
        if spec.steps is None and spec.strategy in ("pct", "idpct", "portfolio"):
            spec.steps = calibrate_steps(self.program, spec.seed)  # PCT's change points need a length
        self.jobs = max(1, jobs)
        parallel = (self.jobs > 1 or dask is not None) and spec.strategy != "dfs"
        if parallel and fn is not None and getattr(fn, "scenario_name", None) is None:
            raise ToolError("explore(jobs > 1) needs a registered scenario (@asyncvm.scenario)")
        self.time_budget = time_budget or None
        self.report: Report | None = None
        self.client = None if dask is None else connect_dask(dask)
        self._own_client = self.client is not None and self.client is not dask
        try:
            self.chunk = chunk or self._chunk_size()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._own_client and self.client is not None:
            self.client.close()
        self.client = None

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _chunk_size(self) -> int:
        """Small enough to keep every worker busy, the ledger fresh and the deadline close; large
        enough to amortize IPC. Under a deadline a chunk takes at most DEADLINE_SHARE of the time
        budget on whatever share of a core each worker gets, so the campaign ends within about one
        chunk's duration of the deadline however many jobs there are."""
        spec = self.spec
        workers = dask_slots(self.client) if self.client is not None else self.jobs
        size = max(20, min(CHUNK, spec.runs // (workers * 4) or 1))
        if spec.stop_on_first_failure:
            size = min(size, 20)
        period = getattr(make_strategy(spec.strategy, spec.seed), "period", None)
        if period:
            # A strategy that learns within an epoch (feedback): chunks on epoch boundaries need
            # no warm-up executions (a chunk that starts mid-epoch re-runs the epoch's first part).
            size = max(period, size - size % period)
        if self.time_budget is not None and spec.strategy != "dfs":
            t0 = time.perf_counter()
            calibrate_steps(self.program, spec.seed, samples=3)
            per_run = (time.perf_counter() - t0) / 3
            if self.client is None and self.jobs > 1:
                per_run *= max(1.0, self.jobs / _cores())  # more workers than cores share them
            size = max(1, min(size, int(self.time_budget * DEADLINE_SHARE / per_run)))
        return size

    def run(
        self,
        *,
        done: Iterable[ChunkResult] = (),
        on_chunk: Callable[[ChunkResult], None] | None = None,
        on_failure: Callable[[FoundFailure], None] | None = None,
        progress: Callable[[Report, int], None] | None = None,
    ) -> Report:
        """Run the campaign and return its report.

        `done` are chunks a previous run finished (a ledger): they are merged first and not run
        again. `on_chunk` sees each new chunk before it is merged, `on_failure` each new failure
        signature as the merge finds it, `progress` the report after each chunk (and its run count).
        """
        merger = Merger(self.spec, self.program, on_failure)
        self.report = merger.report  # so far: what a caller interrupted mid-campaign still has
        have: dict[int, int] = {}
        for chunk in done:
            have[chunk.first] = chunk.count
            merger.add(chunk)
        t0 = time.perf_counter()
        deadline = t0 + self.time_budget if self.time_budget else None
        produced = self._produce(have, deadline)
        try:
            for chunk in produced if not merger.done else ():
                if on_chunk is not None:
                    on_chunk(chunk)
                with EXECUTION_LOCK:  # an in-process Dask worker may be running a chunk right now
                    merger.add(chunk)
                merger.report.elapsed = time.perf_counter() - t0
                if progress is not None:
                    progress(merger.report, chunk.runs)
                if merger.done:
                    break
        finally:
            produced.close()  # stop the executor (its workers, its Dask futures) at once
        merger.report.elapsed = time.perf_counter() - t0
        return merger.report

    def _produce(self, have: dict[int, int], deadline: float | None) -> Generator[ChunkResult, None, None]:
        spec = self.spec
        if spec.strategy == "dfs":
            # DFS keeps its search stack across executions: one sequential chunk in this process,
            # which checks the deadline between executions.
            if spec.first_run not in have:
                yield run_chunk(spec, spec.first_run, spec.runs, self.program.scenario, deadline=deadline)
            return
        todo = chunks(spec.first_run, spec.runs, self.chunk, have.items())
        if self.client is not None:
            yield from run_dask(spec, todo, deadline, self.client)
        elif self.jobs > 1:
            yield from run_pool(spec, todo, deadline, self.jobs)
        else:
            yield from run_here(spec, todo, deadline, self.program.scenario)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    detect_races: bool = False,
) -> Report:
    """Run `scenario` under `runs` schedules chosen by `strategy`; return the distinct failures.

    `scenario` is an ``async def scenario(kvm, **params)`` or a registered scenario's name.
    Execution i depends only on (seed, i), so the same seed finds the same failures whatever
    `jobs` is. With `jobs` > 1 the scenario must be registered (workers look it up by name).
    """
    from ..bugs import check_bug_names

    check_scenario(scenario)
    if isinstance(bugs, str):  # its letters would be taken as bug names
        raise ValueError(f"bugs must be a list of bug names, not the string {bugs!r}")
    if not isinstance(bugs, Iterable):
        raise TypeError(f"bugs must be a list of bug names, not {bugs!r}")
    bugs = list(bugs)
    if not all(isinstance(b, str) for b in bugs):
        raise TypeError(f"bugs must be a list of bug names, not {bugs!r}")
    check_bug_names(bugs)
    for name, mapping in (("params", params), ("data_probs", data_probs)):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"{name} must be a mapping (a dict), not {mapping!r}")
    if time_budget is not None and (
        isinstance(time_budget, bool)
        or not isinstance(time_budget, (int, float))
        or not (math.isfinite(time_budget) and time_budget > 0)
    ):
        raise ValueError(f"time_budget must be a positive, finite number of seconds, not {time_budget!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 0 <= jobs <= MAX_JOBS:
        raise ValueError(f"jobs must be an integer from 0 to {MAX_JOBS}, not {jobs!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable or None, not {progress!r}")
    fn = None if isinstance(scenario, str) else scenario
    spec = CampaignSpec(
        scenario=scenario if isinstance(scenario, str) else scenario_name(scenario),
        params=dict(params or {}),
        profile=profile,
        bugs=list(bugs),
        max_steps=max_steps,
        data_probs=dict(data_probs or {}),
        lockdep=lockdep,
        detect_races=detect_races,
        strategy=strategy,
        seed=seed,
        depth=depth,
        steps=steps,
        preemptions=preemptions,
        runs=runs,
        first_run=first_run,
        stop_on_first_failure=stop_on_first_failure,
    )
    try:  # the limits a campaign.json is read back with, so every campaign can be resumed
        SpecModel.model_validate(spec.to_json())
    except ValidationError as e:
        raise ValueError(f"explore(): {explain(e)}") from None
    with Campaign(spec, fn=fn, jobs=jobs, time_budget=time_budget) as campaign:
        return campaign.run(progress=None if progress is None else lambda report, _runs: progress(report))
