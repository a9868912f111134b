"""Schedules replay exactly, refuse to diverge silently, load with one-line errors, and shrink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import asyncvm
from asyncvm.explore.engine import Program, build_strategy
from asyncvm.explore.schedule import FORMAT_VERSION, Schedule, ScheduleError

from .programs import lost_update, one_order_per_execution, three_counters


def test_200_recorded_schedules_replay_to_identical_event_sequences(tmp_path: Path) -> None:
    program = Program(three_counters)
    strategy = build_strategy(program, "random", seed=11)
    outcomes = set()
    for i in range(200):
        strategy.new_execution(i)
        original = program.run(strategy, record=True)
        outcomes.add(original.failed)
        path = Schedule.from_execution(program, original, strategy=strategy.describe(), seed=11, execution=i).save(
            tmp_path / f"s{i}.json"
        )
        again = asyncvm.replay(path, three_counters)
        assert again.events() == original.events(), f"execution {i} replayed differently"
        assert (again.failure is None) == (original.failure is None)
    assert outcomes == {True, False}, "the sample should hold passing and failing schedules"


def _failing_schedule(tmp_path: Path) -> Path:
    report = asyncvm.explore(lost_update, strategy="random", runs=100, seed=1)
    return report.failures[0].schedule.save(tmp_path / "fail.json")


def test_tampered_schedule_is_a_divergence_naming_the_step(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    data = json.loads(path.read_text())
    data["choices"][2] = 7  # no task 7 exists
    path.write_text(json.dumps(data))
    with pytest.raises(asyncvm.ReplayDivergence, match=r"replay diverged at step 3: recorded task 7 is not enabled"):
        asyncvm.replay(path, lost_update)


def test_schedule_ending_early_is_a_divergence(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    data = json.loads(path.read_text())
    del data["choices"][-2:]
    path.write_text(json.dumps(data))
    with pytest.raises(asyncvm.ReplayDivergence, match="ended after"):
        asyncvm.replay(path, lost_update)


def test_extra_choices_are_a_divergence(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    data = json.loads(path.read_text())
    data["choices"] += [0, 0]
    path.write_text(json.dumps(data))
    with pytest.raises(asyncvm.ReplayDivergence, match="recorded choices"):
        asyncvm.replay(path, lost_update)


def test_truncated_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    path.write_text(path.read_text()[:40])
    with pytest.raises(ScheduleError) as e:
        Schedule.load(path)
    assert "truncated" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["this is not json", "[1, 2, 3]", '{"format": "other"}', ""])
def test_bad_files_are_one_line_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ScheduleError) as e:
        asyncvm.replay(path, lost_update)
    assert "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="no such file"):
        Schedule.load(tmp_path / "absent.json")


def test_other_asyncvm_version_is_refused_unless_forced(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    data = json.loads(path.read_text())
    data["asyncvm"] = "0.0.1"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match=r"recorded by asyncvm 0\.0\.1"):
        asyncvm.replay(path, lost_update)
    assert asyncvm.replay(path, lost_update, force=True).failed


def test_schedule_file_is_versioned_data(tmp_path: Path) -> None:
    data = json.loads(_failing_schedule(tmp_path).read_text())
    assert data["format"] == "asyncvm-schedule"
    assert data["version"] == FORMAT_VERSION == 2
    assert data["asyncvm"] == asyncvm.__version__
    assert data["strategy"]["name"] == "random"
    assert data["failure"]["signature"].startswith("exception:AssertionError")
    assert all(isinstance(c, int) or (isinstance(c, list) and len(c) == 1) for c in data["choices"])


def test_replay_reproduces_the_failure(tmp_path: Path) -> None:
    path = _failing_schedule(tmp_path)
    result = asyncvm.replay(path, lost_update)
    assert result.failure is not None
    assert result.failure.signature == Schedule.load(path).signature


def test_data_draws_are_recorded_and_replayed(tmp_path: Path) -> None:
    program = Program(three_counters)
    strategy = build_strategy(program, "random", seed=5)
    strategy.new_execution(3)
    original = program.run(strategy, record=True)
    draws = [c for c in original.choices if isinstance(c, tuple)]
    assert draws, "three_counters draws at every iteration"
    again = asyncvm.replay(Schedule.from_execution(program, original, strategy={}, seed=5, execution=3), three_counters)
    assert again.choices == original.choices


def test_shrink_leaves_no_more_preemptions_than_the_bug_needs(tmp_path: Path) -> None:
    report = asyncvm.explore(three_counters, strategy="random", runs=300, seed=2)
    found = report.first("exception")
    assert found is not None
    original = found.schedule
    shrunk = asyncvm.shrink(original, three_counters)
    assert shrunk.failure is not None and shrunk.failure.signature == original.failure.signature  # type: ignore[union-attr]
    # A lost update needs exactly one preemption: read, switch away, the other task writes.
    assert shrunk.preemptions == 1
    assert shrunk.steps <= original.steps
    assert asyncvm.replay(shrunk, three_counters).failure.signature == shrunk.failure.signature  # type: ignore[union-attr]


def test_shrunk_path_sits_next_to_the_original(tmp_path: Path) -> None:
    from asyncvm.explore import shrunk_path

    assert shrunk_path(tmp_path / "schedule.json") == tmp_path / "schedule.shrunk.json"


def test_shrinking_a_passing_schedule_is_refused() -> None:
    program = Program(lost_update)
    strategy = build_strategy(program, "dfs", seed=0)
    strategy.new_execution(0)
    result = program.run(strategy)
    assert not result.failed
    with pytest.raises(ScheduleError, match="nothing to shrink"):
        asyncvm.shrink(Schedule.from_execution(program, result, strategy={}, seed=0, execution=0), lost_update)


def test_lockdep_reports_inversion_from_two_executions_that_did_not_deadlock() -> None:
    report = asyncvm.explore(one_order_per_execution, strategy="random", runs=50, seed=0)
    assert len(report.failures) == 1
    found = report.failures[0]
    assert found.kind == "lockdep"
    assert found.signature == "lockdep:A,B"
    # Both acquisition sites are named, from the two executions.
    assert found.message.count("programs.py") >= 4
    assert len(found.failure.evidence["executions"]) == 2
    assert found.first_run > 0
    # Each execution alone is a single task: no deadlock was possible.
    assert found.schedule.prelude, "the other execution's schedule travels with the failure"
    again = asyncvm.replay(found.schedule, one_order_per_execution)
    assert again.failure is not None and again.failure.signature == "lockdep:A,B"
