"""The pytest plugin: marked async tests are explored; a race fails the test with a replay command."""

from __future__ import annotations

import pytest

RACY = """
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
import pytest
@pytest.mark.asyncvm(runs=10)
def test_sync(kvm):
    pass
"""
    )
    result = pytester.runpytest("-p", "asyncvm")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*needs an async def test*"])
