"""Every named bug is found by the default campaign on its scenario, shrinks, and is the only
reason that scenario fails: without it the same campaign is clean."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm.bugs import BUGS, check_bug_names
from asyncvm.explore.scenarios import REGISTRY, load_bundled

load_bundled()

#: `asyncvm stress SCENARIO --bug NAME` defaults: PCT, 1000 runs, seed 0
DEFAULT = {"strategy": "pct", "runs": 1000, "seed": 0}


@pytest.mark.parametrize("name", sorted(BUGS))
def test_default_campaign_finds_and_shrinks_the_bug(name: str) -> None:
    bug = BUGS[name]
    report = asyncvm.explore(bug.scenario, bugs=[name], stop_on_first_failure=True, profile=bug.profile, **DEFAULT)
    assert report.failures, f"{name} not found by the default campaign on {bug.scenario}"
    found = report.failures[0]
    fn = REGISTRY[bug.scenario].fn
    shrunk = asyncvm.shrink(found.schedule, fn, max_attempts=300)
    assert shrunk.failure is not None and shrunk.failure.signature == found.signature
    # Fewer preemptions first, then fewer steps.
    assert (shrunk.preemptions, shrunk.steps) <= (found.schedule.preemptions, found.schedule.steps)
    again = asyncvm.replay(shrunk, fn)
    assert again.failure is not None and again.failure.signature == found.signature


@pytest.mark.parametrize(("scenario", "profile"), sorted({(b.scenario, b.profile) for b in BUGS.values()}))
def test_bug_scenarios_are_clean_without_bugs(scenario: str, profile: str) -> None:
    report = asyncvm.explore(scenario, profile=profile, **DEFAULT)
    assert report.ok, report.summary()


def test_unknown_bug_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"unknown bug 'no_such_bug' \(known bugs: "):
        check_bug_names(["no_such_bug"])
    with pytest.raises(ValueError, match="did you mean 'drop_invalidate_retry'"):
        check_bug_names(["drop_invalidate_retyr"])
    with pytest.raises(ValueError, match="unknown bug"):
        asyncvm.explore(REGISTRY["prefault_vs_punch_hole"].fn, bugs=["no_such_bug"], runs=1)


def test_every_bug_documents_what_it_changes_and_where() -> None:
    for bug in BUGS.values():
        assert bug.changes and bug.kernel and bug.scenario in REGISTRY
