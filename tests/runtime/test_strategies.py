"""The strategies find the classic bugs, and leave the fixed programs alone."""

from __future__ import annotations

import pytest

import asyncvm

from .programs import abba, locked_update, lost_update, ordered

SEEDS = range(10)


@pytest.mark.parametrize("strategy", ["pct", "random", "dfs", "pos", "idpct", "portfolio"])
def test_lost_update_found_within_100_runs_for_seeds_0_to_9(strategy: str) -> None:
    for seed in SEEDS:
        report = asyncvm.explore(lost_update, strategy=strategy, runs=100, seed=seed, stop_on_first_failure=True)
        assert report.failures, f"{strategy} seed {seed} missed the lost update"
        assert report.failures[0].kind == "exception"
        assert "lost update" in report.failures[0].message


@pytest.mark.parametrize("strategy", ["pct", "random", "dfs", "pos"])
def test_abba_deadlock_found_within_100_runs_for_seeds_0_to_9(strategy: str) -> None:
    for seed in SEEDS:
        report = asyncvm.explore(
            abba, strategy=strategy, runs=100, seed=seed, stop_on_first_failure=True, lockdep=False
        )
        assert report.failures, f"{strategy} seed {seed} missed the deadlock"
        found = report.failures[0]
        assert found.kind == "deadlock"
        # The report names each blocked task, what it waits for and who holds it.
        assert "ab waits for mutex B held by ba" in found.message
        assert "ba waits for mutex A held by ab" in found.message
        assert "wait-for cycle" in found.message


def test_dfs_with_preemption_bound_2_reports_exhaustion() -> None:
    report = asyncvm.explore(locked_update, strategy="dfs", preemptions=2, runs=100_000)
    assert report.exhausted
    assert report.ok
    assert 1 < report.runs < 100_000


def test_dfs_bound_0_explores_only_non_preemptive_schedules() -> None:
    report = asyncvm.explore(lost_update, strategy="dfs", preemptions=0, runs=1000)
    assert report.exhausted
    assert report.ok  # the lost update needs one preemption


@pytest.mark.parametrize("program", [locked_update, ordered])
@pytest.mark.parametrize("strategy", ["pct", "random", "pos"])
def test_correct_programs_never_fail_in_1000_runs(program: object, strategy: str) -> None:
    report = asyncvm.explore(program, strategy=strategy, runs=1000, seed=7)  # type: ignore[arg-type]
    assert report.ok, report.summary()
    assert report.runs == 1000


def test_pct_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        asyncvm.explore(lost_update, strategy="pct", depth=0, runs=1)


def test_unknown_strategy_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        asyncvm.explore(lost_update, strategy="bogus", runs=1)


def test_same_seed_same_failures() -> None:
    a = asyncvm.explore(lost_update, strategy="random", runs=50, seed=3)
    b = asyncvm.explore(lost_update, strategy="random", runs=50, seed=3)
    assert [f.schedule.choices for f in a.failures] == [f.schedule.choices for f in b.failures]
    assert a.failing_runs == b.failing_runs


@pytest.mark.parametrize("strategy", ["random", "pct", "pos", "idpct", "portfolio"])
def test_an_execution_depends_only_on_seed_and_index(strategy: str) -> None:
    from asyncvm.explore.engine import Program, build_strategy

    program = Program(lost_update)
    sequential = build_strategy(program, strategy, seed=4, steps=10)
    runs = []
    for i in range(30):
        sequential.new_execution(i)
        runs.append(program.run(sequential).choices)
    for i in (0, 7, 29):
        alone = build_strategy(program, strategy, seed=4, steps=10)
        alone.new_execution(i)
        assert program.run(alone).choices == runs[i]
