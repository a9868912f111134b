"""The pytest plugin: marked async tests are explored; a race fails the test with a replay command."""

from __future__ import annotations

from pathlib import Path

import pytest

RACY = """
from pathlib import Path

import pytest
from asyncvm import TaskGroup
from asyncvm.runtime import Mutex, yield_point

@pytest.mark.asyncvm(runs=200, strategy="pct", seed=1)
async def test_counter(kvm):
    state = {"x": 0}
    lock = Mutex("m")

    async def inc():
        {body}

    async with TaskGroup() as tg:
        tg.spawn(inc)
        tg.spawn(inc)
    assert state["x"] == 2, "lost update"
"""
RACE = """v = state["x"]
        await yield_point()
        state["x"] = v + 1"""
FIXED = """async with lock:
            v = state["x"]
            await yield_point()
            state["x"] = v + 1"""


def test_racy_marked_test_fails_with_schedule_and_replay_command(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_racy=RACY.replace("{body}", RACE))
    result = pytester.runpytest("-p", "asyncvm", "--asyncvm-logs", str(pytester.path / "logs"))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lost update*", "*shrunk schedule:*", "*--asyncvm-replay*"])
    saved = list((pytester.path / "logs").rglob("schedule.shrunk.json"))
    assert saved, "the shrunk schedule is saved"
    again = pytester.runpytest("-p", "asyncvm", "--asyncvm-replay", str(saved[0]))
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*replayed failure*lost update*"])


def test_fixed_marked_test_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fixed=RACY.replace("{body}", FIXED))
    result = pytester.runpytest("-p", "asyncvm")
    result.assert_outcomes(passed=1)


def test_marker_on_a_sync_test_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sync="""
from pathlib import Path

import pytest
@pytest.mark.asyncvm(runs=10)
def test_sync(kvm):
    pass
"""
    )
    result = pytester.runpytest("-p", "asyncvm")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*needs an async def test*"])


TWO_TESTS = """
from pathlib import Path

import pytest
from asyncvm import TaskGroup
from asyncvm.runtime import yield_point

@pytest.mark.asyncvm(runs=300, strategy="pct", seed=1)
async def test_two_races(kvm):
    state = {"x": 0, "y": 0}

    async def inc():
        x = state["x"]
        await yield_point()
        state["x"] = x + 1
        y = state["y"]
        await yield_point()
        state["y"] = y + 1

    async with TaskGroup() as tg:
        tg.spawn(inc)
        tg.spawn(inc)
    if state["x"] != 2:
        raise AssertionError("lost update of x")
    if state["y"] != 2:
        raise ValueError("lost update of y")

@pytest.mark.asyncvm(runs=20, strategy="pct", seed=1)
async def test_clean(kvm):
    await yield_point()
"""


def _replay_files(pytester: pytest.Pytester) -> list[str]:
    pytester.makepyfile(test_two=TWO_TESTS)
    first = pytester.runpytest("-p", "asyncvm", "--asyncvm-logs", str(pytester.path / "logs"))
    first.assert_outcomes(failed=1, passed=1)
    return [str(p) for p in sorted((pytester.path / "logs").rglob("schedule.shrunk.json"))]


def test_every_failing_signature_is_saved(pytester: pytest.Pytester) -> None:
    saved = _replay_files(pytester)
    assert len(saved) == 2, saved  # AssertionError (x) and ValueError (y): one folder each
    assert len({Path(p).parent for p in saved}) == 2


def test_replay_applies_only_to_the_test_named_in_the_file(pytester: pytest.Pytester) -> None:
    saved = _replay_files(pytester)
    again = pytester.runpytest("-p", "asyncvm", "--asyncvm-replay", saved[0], "-v")
    again.assert_outcomes(failed=1, passed=1)  # the other selected test runs as usual
    again.stdout.fnmatch_lines(["*replayed failure*lost update*"])
    assert "test_two.py::test_clean PASSED" in again.stdout.str()


def test_a_replay_file_of_another_test_is_one_line_naming_it(pytester: pytest.Pytester) -> None:
    saved = _replay_files(pytester)
    result = pytester.runpytest("-p", "asyncvm", "test_two.py::test_clean", "--asyncvm-replay", saved[0])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1, result.stderr.str()
    assert "recorded for test test_two.py::test_two_races" in errors[0] and "Traceback" not in result.stderr.str()


def test_a_missing_replay_file_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest("-p", "asyncvm", "--asyncvm-replay", "nope.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert errors == ["ERROR: --asyncvm-replay: nope.json: no such file"], result.stderr.str()
