"""pytest plugin: race tests as ordinary async tests, explored under the controlled runtime.

::

    @pytest.mark.asyncvm(runs=500, strategy="pct", seed=0)
    async def test_prefault_vs_punch_hole(kvm):
        ...                      # one execution's worth of scenario code

The test body runs once per schedule with a fresh emulated ``kvm``. A failing exploration fails
the test with its failures, saves the shrunk schedule of each failure signature under
``logs/pytest/<test>/<signature>/`` and prints the command that replays it (``pytest <nodeid>
--asyncvm-replay <file>``). A schedule records the test it belongs to: ``--asyncvm-replay``
replays it for that test only (the other selected tests run as usual), and refuses a file of a
test that is not selected. Unmarked tests may still take the ``kvm`` fixture: they get a
live-mode Kvm for asyncio/trio tests.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

MARK = "asyncvm"
EXPLORE_KEYS = (
    "runs",
    "strategy",
    "seed",
    "depth",
    "preemptions",
    "profile",
    "bugs",
    "params",
    "max_steps",
    "data_probs",
    "time_budget",
    "stop_on_first_failure",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncvm")
    group.addoption("--asyncvm-replay", metavar="FILE", help="replay this schedule for the selected asyncvm test")
    group.addoption("--asyncvm-runs", type=int, metavar="N", help="override runs= of every asyncvm test")
    group.addoption("--asyncvm-logs", default="logs/pytest", metavar="DIR", help="where failing schedules go")


REPLAY = pytest.StashKey[Any]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "asyncvm(runs=1000, strategy='pct', seed=0, profile='6.18', bugs=(), params={}): explore this async "
        "test under the controlled scheduler; it fails if any schedule fails",
    )
    runs = config.getoption("--asyncvm-runs", None)
    if runs is not None and runs < 1:
        raise pytest.UsageError(f"--asyncvm-runs {runs}: must be at least 1")
    file = config.getoption("--asyncvm-replay", None)
    if file:
        from .explore.schedule import Schedule, ScheduleError

        try:
            config.stash[REPLAY] = Schedule.load(file)
        except ScheduleError as e:
            raise pytest.UsageError(f"--asyncvm-replay: {e}") from None


def pytest_collection_finish(session: pytest.Session) -> None:
    """A replay file belongs to one test: it must be among the selected ones."""
    schedule = session.config.stash.get(REPLAY, None)
    if schedule is None or any(_belongs(schedule, item) for item in session.items):
        return
    file = session.config.getoption("--asyncvm-replay")
    raise pytest.UsageError(
        f"--asyncvm-replay {file}: recorded for test {schedule.scenario}, which is not selected "
        f"(run: pytest '{schedule.scenario}' --asyncvm-replay {file})"
    )


def _belongs(schedule: Any, item: pytest.Item) -> bool:
    return schedule.scenario == item.nodeid


@pytest.fixture
def kvm() -> Any:
    """An emulated /dev/kvm (live mode); marked asyncvm tests get a fresh one per execution instead."""
    from .kvm.kvm import Kvm

    return Kvm()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker(MARK)
    if marker is None:
        return None
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: @pytest.mark.asyncvm needs an async def test")
    options = dict(marker.kwargs)
    unknown = set(options) - set(EXPLORE_KEYS)
    if unknown:
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: unknown asyncvm() options {sorted(unknown)}")
    if marker.args:
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: @pytest.mark.asyncvm takes keyword options only")
    _check_marker(pyfuncitem.nodeid, options)
    fixtures = {k: v for k, v in pyfuncitem.funcargs.items() if k in pyfuncitem._fixtureinfo.argnames and k != "kvm"}

    async def scenario(kvm: Any) -> None:
        await fn(kvm=kvm, **fixtures)

    scenario.__qualname__ = pyfuncitem.name
    scenario.__module__ = getattr(fn, "__module__", "?")
    # Schedules name the test they belong to.
    scenario.scenario_name = pyfuncitem.nodeid  # type: ignore[attr-defined]
    config = pyfuncitem.config
    schedule = config.stash.get(REPLAY, None)
    if schedule is not None and _belongs(schedule, pyfuncitem):
        _replay(scenario, schedule)
        return True
    from .explore.driver import explore

    if config.getoption("--asyncvm-runs"):
        options["runs"] = config.getoption("--asyncvm-runs")
    from .runtime.failures import ToolError

    try:
        report = explore(scenario, **options)
    except ToolError as e:  # e.g. the test's own set-up failed before anything raced
        pytest.fail(f"@pytest.mark.asyncvm: {e}", pytrace=False)
    if report.failures:
        lines = [f"{len(report.failures)} failure signature(s) in {report.runs} runs:"]
        for found in report.failures:
            path = _save(Path(config.getoption("--asyncvm-logs")), pyfuncitem.nodeid, found, scenario)
            lines += [
                f"{found.failure}",
                f"  shrunk schedule: {path}",
                f"  replay it with: pytest '{pyfuncitem.nodeid}' --asyncvm-replay {path}",
            ]
        pytest.fail("\n".join(lines), pytrace=False)
    return True


def _check_marker(nodeid: str, options: dict[str, Any]) -> None:
    """The marker's options against `MarkerOptions`: a bad one is a usage error naming it."""
    from pydantic import ValidationError

    try:
        _marker_model().model_validate(options)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise pytest.UsageError(f"{nodeid}: @pytest.mark.asyncvm({key}={options.get(key)!r}): {where}: {msg}") from None


def _marker_model() -> Any:
    """What each @pytest.mark.asyncvm option must be (the explore() arguments they become)."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

    from .explore import files

    class MarkerOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        runs: Annotated[StrictInt, Field(ge=1, le=files.MAX_RUNS)] = 1000
        strategy: files.StrategyName = "pct"
        seed: files.Seed = 0
        depth: Annotated[StrictInt, Field(ge=1)] = 3
        preemptions: Annotated[StrictInt, Field(ge=0)] = 2
        profile: files.ProfileName = "6.18"
        # a list or tuple of names: a bare string would be taken letter by letter
        bugs: list[files.BugName] | tuple[files.BugName, ...] = ()
        params: dict[StrictStr, Any] = {}
        max_steps: files.MaxSteps = 200_000
        data_probs: dict[StrictStr, files.Probability] = {}
        time_budget: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = None
        stop_on_first_failure: StrictBool = False

    return MarkerOptions


def _save(folder: Path, nodeid: str, found: Any, scenario: Any) -> Path:
    """The failure's schedule and its shrunk twin, in a folder of their own per signature."""
    from .explore.runner import slug
    from .explore.shrink import shrink

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]
    target = folder / name / slug(found.signature)
    target.mkdir(parents=True, exist_ok=True)
    found.schedule.save(target / "schedule.json")
    try:
        shrunk = shrink(found.schedule, scenario, max_attempts=300)
    except Exception:  # noqa: BLE001 - keep the unshrunk schedule if shrinking is not possible
        return target / "schedule.json"
    return shrunk.save(target / "schedule.shrunk.json")


def _replay(scenario: Any, schedule: Any) -> None:
    import io

    from .explore.engine import replay
    from .runtime.failures import ToolError
    from .trace.log import print_events

    try:
        result = replay(schedule, scenario, force=True)
    except ToolError as e:
        pytest.fail(f"cannot replay the schedule: {e}", pytrace=False)
    if result.failure is not None:
        out = io.StringIO()
        print_events(result.events(), out, result.failure, context=30)
        pytest.fail(f"replayed failure: {result.failure}\n{out.getvalue()}", pytrace=False)
