"""@pytest.mark.asyncvm options are checked: a bad one is a usage error naming the marker, and a
marker that would explore nothing (runs=0) never passes silently (issue 16)."""

from __future__ import annotations

import pytest

TEST = """
import pytest
from asyncvm import TaskGroup

@pytest.mark.asyncvm({options})
async def test_marked(kvm):
    async def nothing():
        pass

    async with TaskGroup() as tg:
        tg.spawn(nothing)
        tg.spawn(nothing)
"""


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ("runs=0", "runs=0"),
        ("runs=-3", "runs=-3"),
        ("runs=2.5", "runs=2.5"),
        ("bugs='drop_invalidate_retry'", "bugs="),
        ("bugs=['no_such_bug']", "unknown bug 'no_such_bug'"),
        ("profile='9.9'", "unknown profile '9.9'"),
        ("strategy='bogus'", "unknown strategy 'bogus'"),
        ("seed=float('nan')", "seed="),
        ("time_budget=float('nan')", "time_budget="),
    ],
)
def test_a_bad_marker_option_is_a_usage_error_naming_it(options: str, needle: str, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad=TEST.format(options=options))
    result = pytester.runpytest("-p", "asyncvm")
    assert result.ret != 0
    assert result.parseoutcomes().get("passed", 0) == 0
    out = result.stdout.str() + result.stderr.str()
    assert "@pytest.mark.asyncvm(" in out and needle in out, out
    assert "Traceback" not in out, out


def test_a_good_marker_still_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_good=TEST.format(options="runs=5, bugs=['drop_invalidate_retry'], profile='7.0'"))
    pytester.runpytest("-p", "asyncvm").assert_outcomes(passed=1)


def test_asyncvm_runs_zero_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_good=TEST.format(options="runs=5"))
    result = pytester.runpytest("-p", "asyncvm", "--asyncvm-runs", "0")
    assert result.ret != 0
    assert "--asyncvm-runs 0" in result.stdout.str() + result.stderr.str()
