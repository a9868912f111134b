"""pytest plugin: race tests as ordinary async tests, explored under the controlled runtime.

::

    @pytest.mark.asyncvm(runs=500, strategy="pct", seed=0)
    async def test_prefault_vs_punch_hole(kvm):
        ...                      # one execution's worth of scenario code

The test body runs once per schedule with a fresh emulated ``kvm``. A failing exploration fails
the test with the failure, saves the shrunk schedule under ``logs/pytest/`` and prints the
command that replays it (``pytest <nodeid> --asyncvm-replay <file>``). Unmarked tests may still
take the ``kvm`` fixture: they get a live-mode Kvm for asyncio/trio tests.
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "asyncvm(runs=1000, strategy='pct', seed=0, profile='6.18', bugs=(), params={}): explore this async "
        "test under the controlled scheduler; it fails if any schedule fails",
    )


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
    fixtures = {k: v for k, v in pyfuncitem.funcargs.items() if k in pyfuncitem._fixtureinfo.argnames and k != "kvm"}

    async def scenario(kvm: Any) -> None:
        await fn(kvm=kvm, **fixtures)

    scenario.__qualname__ = pyfuncitem.name
    scenario.__module__ = getattr(fn, "__module__", "?")
    config = pyfuncitem.config
    replay_file = config.getoption("--asyncvm-replay")
    if replay_file:
        _replay(scenario, replay_file)
        return True
    from .explore.driver import explore

    if config.getoption("--asyncvm-runs"):
        options["runs"] = config.getoption("--asyncvm-runs")
    report = explore(scenario, **options)
    if report.failures:
        found = report.failures[0]
        path = _save(Path(config.getoption("--asyncvm-logs")), pyfuncitem.nodeid, found, scenario)
        pytest.fail(
            f"{len(report.failures)} failure signature(s) in {report.runs} runs; first: {found.failure}\n"
            f"shrunk schedule: {path}\n"
            f"replay it with: pytest '{pyfuncitem.nodeid}' --asyncvm-replay {path}",
            pytrace=False,
        )
    return True


def _save(folder: Path, nodeid: str, found: Any, scenario: Any) -> Path:
    from .explore.shrink import shrink

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    found.schedule.save(target / "schedule.json")
    try:
        shrunk = shrink(found.schedule, scenario, max_attempts=300)
    except Exception:  # noqa: BLE001 - keep the unshrunk schedule if shrinking is not possible
        return target / "schedule.json"
    return shrunk.save(target / "schedule.shrunk.json")


def _replay(scenario: Any, file: str) -> None:
    from .explore.engine import replay
    from .explore.schedule import ScheduleError
    from .trace.log import format_event

    try:
        result = replay(file, scenario, force=True)
    except ScheduleError as e:
        raise pytest.UsageError(str(e)) from None
    if result.failure is not None:
        tail = "\n".join(format_event(e) for e in result.events()[-30:])
        pytest.fail(f"replayed failure: {result.failure}\n{tail}", pytrace=False)
