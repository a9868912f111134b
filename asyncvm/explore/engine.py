"""Programs and replay(): one execution of a scenario under a strategy, or one recorded schedule again."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..runtime.executor import ExecutionResult, Executor
from ..runtime.failures import Failure, ToolError
from ..runtime.lockdep import Lockdep
from ..runtime.strategies import RandomStrategy, ReplayStrategy, Strategy, attach_runner, make_strategy
from .schedule import Schedule, ScheduleError

ScenarioFn = Callable[..., Coroutine[Any, Any, Any]]

DEFAULT_MAX_STEPS = 200_000


def scenario_name(scenario: ScenarioFn) -> str:
    """The name a schedule file records: the registered name, else module:qualname."""
    name = getattr(scenario, "scenario_name", None)
    if name:
        return str(name)
    return f"{getattr(scenario, '__module__', '?')}:{getattr(scenario, '__qualname__', repr(scenario))}"


def scenario_params(scenario: ScenarioFn, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Declared defaults overridden by `params`; unknown names, and values of the wrong type or out
    of their declared range, are a one-line ValueError."""
    declared = dict(getattr(scenario, "scenario_params", {}) or {})
    given = dict(params or {})
    if declared:
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ValueError(
                f"scenario {scenario_name(scenario)} has no parameter {', '.join(unknown)} "
                f"(it takes: {', '.join(sorted(declared)) or 'none'})"
            )
        from .params import check_params

        check_params(scenario_name(scenario), getattr(scenario, "scenario_param_decls", declared), given)
    declared.update(given)
    return declared


@dataclass
class Program:
    """A scenario bound to its parameters, kernel profile and injected bugs: what one execution runs."""

    scenario: ScenarioFn
    params: dict[str, Any] = field(default_factory=dict)
    profile: str = "6.18"
    bugs: tuple[str, ...] = ()
    max_steps: int = DEFAULT_MAX_STEPS
    data_probs: dict[str, float] = field(default_factory=dict)
    #: whether executions check lock order (each execution has its own graph; a campaign merges them)
    lockdep: bool = True
    #: whether executions run the happens-before data-race detector (check/races.py)
    detect_races: bool = False

    @property
    def name(self) -> str:
        return scenario_name(self.scenario)

    def __post_init__(self) -> None:
        if not self.detect_races and self.bugs:
            from ..bugs import needs_race_detector

            self.detect_races = needs_race_detector(self.bugs)

    @property
    def module(self) -> str | None:
        """The --module that registered the scenario, if one did (a schedule records it)."""
        return getattr(self.scenario, "scenario_source", None)

    def main(self) -> Callable[[], Coroutine[Any, Any, Any]]:
        def start() -> Coroutine[Any, Any, Any]:
            # The world is built inside the execution so its oracles attach to this executor.
            world = make_world(self.profile, self.bugs)
            return self.scenario(world, **self.params)

        return start

    def run(
        self,
        strategy: Strategy,
        *,
        lockdep: Lockdep | None = None,
        record: bool = False,
        count_preemptions: bool = False,
    ) -> ExecutionResult:
        if lockdep is None and self.lockdep:
            lockdep = Lockdep()
        detector = None
        if self.detect_races:
            from ..check.races import RaceDetector

            detector = RaceDetector()
        exe = Executor(
            strategy,
            max_steps=self.max_steps,
            lockdep=lockdep,
            record=record,
            count_preemptions=count_preemptions,
            data_probs={**getattr(self.scenario, "scenario_data", {}), **self.data_probs},
            hb=detector,
        )
        result = exe.run(self.main())
        if lockdep is not None:
            result.lockdep_edges = lockdep.new_edges
        return result

    def new_lockdep(self) -> Lockdep | None:
        return Lockdep() if self.lockdep else None

    def replay(
        self, schedule: Schedule, *, strict: bool = True, record: bool = False, choices: list[Any] | None = None
    ) -> ExecutionResult:
        """Run `schedule` (its preludes first, sharing one lockdep graph), counting preemptions."""
        stream = schedule.choices if choices is None else choices
        return self.rerun(stream, prelude=schedule.prelude, execution=schedule.execution, strict=strict, record=record)

    def rerun(
        self,
        choices: list[Any],
        *,
        prelude: Iterable[list[Any]] = (),
        execution: int = 0,
        strict: bool = True,
        record: bool = False,
    ) -> ExecutionResult:
        """Run execution `execution` as `choices` say, after the `prelude` streams (sharing one
        lockdep graph), counting preemptions."""
        lockdep = self.new_lockdep()
        for i, stream in enumerate(prelude):
            if lockdep is not None:
                lockdep.execution = -1 - i
            self._follow(stream, True, lockdep=lockdep)
        if lockdep is not None:
            lockdep.execution = execution
        return self._follow(choices, strict, lockdep=lockdep, record=record, count_preemptions=True)

    def _follow(self, choices: list[Any], strict: bool, **run: Any) -> ExecutionResult:
        """One execution that follows `choices`; a strict replay must use up the whole stream."""
        strategy = ReplayStrategy(choices, strict=strict)
        result = self.run(strategy, **run)
        strategy.check_consumed()
        return result


def make_world(profile: str, bugs: Iterable[str]) -> Any:
    """The emulated /dev/kvm a scenario receives."""
    from ..kvm.kvm import Kvm

    return Kvm(profile=profile, bugs=tuple(bugs))


def calibrate_steps(program: Program, seed: int, samples: int = 3) -> int:
    """Execution length for PCT's change points: the longest of a few seeded random executions."""
    longest = 1
    for i in range(samples):
        s = RandomStrategy(seed ^ 0x5EED)
        s.new_execution(i)
        longest = max(longest, program.run(s).steps)
    return longest


def build_strategy(
    program: Program,
    strategy: str | Strategy,
    seed: int,
    *,
    depth: int = 3,
    steps: int | None = None,
    preemptions: int = 2,
) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if steps is None and strategy in ("pct", "idpct", "portfolio"):
        steps = calibrate_steps(program, seed)
    built = make_strategy(strategy, seed, depth=depth, steps=steps or 1000, preemptions=preemptions)
    attach_runner(built, program.run)
    return built


def confirm(
    program: Program, choices: list[Any], failure: Failure, *, prelude: Iterable[list[Any]] = (), execution: int = 0
) -> ExecutionResult:
    """Replay a new failure once: it must reproduce (else something escaped the scheduler),
    and the replay measures what hunting does not (preemptions)."""
    again = program.rerun(choices, prelude=prelude, execution=execution)
    if again.failure is None or again.failure.signature != failure.signature:
        got = again.failure.signature if again.failure else "no failure"
        raise ToolError(
            f"uncontrolled nondeterminism: execution {execution} failed with "
            f"{failure.signature} but its replay gave {got}"
        )
    return again


def resolve(scenario: ScenarioFn | str) -> ScenarioFn:
    """A scenario function, or the registered scenario of that name (UnknownScenario if none)."""
    if isinstance(scenario, str):
        from .scenarios import get_scenario

        return get_scenario(scenario).fn
    check_scenario(scenario)
    return scenario


def check_scenario(scenario: object) -> None:
    """The scenario argument of the public API is a registered scenario's name or a function."""
    if not (isinstance(scenario, str) or callable(scenario)):
        raise TypeError(
            f"scenario must be a scenario function or a registered scenario's name, not {type(scenario).__name__}"
        )


def _program_for(schedule: Schedule, scenario: ScenarioFn | str) -> Program:
    fn = resolve(scenario)
    try:
        # Not even force=True runs a scenario with a parameter it does not take, or out of range.
        scenario_params(fn, schedule.params)
    except ValueError as e:
        raise ScheduleError(f"schedule for {schedule.scenario}: {e}") from None
    return Program(
        fn,
        dict(schedule.params),
        schedule.profile,
        tuple(schedule.bugs),
        schedule.max_steps,
        dict(schedule.data_probs),
        schedule.lockdep,
        detect_races=schedule.detect_races,
    )


def load_schedule(source: str | Path | Schedule) -> Schedule:
    return source if isinstance(source, Schedule) else Schedule.load(source)


def check_compatible(schedule: Schedule, scenario: ScenarioFn | str, *, force: bool = False) -> None:
    """Refuse a schedule recorded by another asyncvm version or for other scenario parameters."""
    scenario = resolve(scenario)
    if force:
        return
    if schedule.asyncvm_version != __version__:
        raise ScheduleError(
            f"schedule was recorded by asyncvm {schedule.asyncvm_version}, this is {__version__} "
            "(pass force=True / --force to replay anyway)"
        )
    registered = getattr(scenario, "scenario_name", None)
    if registered and registered != schedule.scenario:
        raise ScheduleError(f"schedule is for scenario {schedule.scenario!r}, not {registered!r}")
    declared = getattr(scenario, "scenario_params", None)
    if declared:
        unknown = sorted(set(schedule.params) - set(declared))
        if unknown:
            raise ScheduleError(
                f"schedule sets parameters {', '.join(unknown)} that scenario {schedule.scenario} does not "
                "declare (pass force=True / --force to replay anyway)"
            )


def replay(
    source: str | Path | Schedule,
    scenario: ScenarioFn | str,
    *,
    force: bool = False,
    record: bool = True,
) -> ExecutionResult:
    """Re-run a recorded schedule exactly; any choice that no longer fits raises ReplayDivergence.

    `scenario` is the scenario function or a registered scenario's name."""
    schedule = load_schedule(source)
    check_compatible(schedule, scenario, force=force)
    return _program_for(schedule, scenario).replay(schedule, record=record)
