"""The feedback-directed strategy (Reads-From Fuzzing's idea): coverage of ordered access pairs and
lock-class pairs from what the runnable tasks touch, a corpus of schedules that reached new
coverage, mutations of them, and per-(seed, index) determinism however executions are chunked
(issue 14)."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm.explore.campaign import CampaignSpec, run_chunk
from asyncvm.explore.engine import Program, build_strategy
from asyncvm.runtime.strategies import (
    STRATEGIES,
    FeedbackStrategy,
    PortfolioStrategy,
    attach_runner,
    make_strategy,
)

from .programs import abba, lost_update, three_counters

BUGGY = CampaignSpec(
    scenario="prefault_vs_punch_hole", bugs=["drop_invalidate_retry"], strategy="feedback", seed=3, runs=100
)


def test_feedback_is_a_named_strategy_and_a_portfolio_member() -> None:
    assert "feedback" in STRATEGIES
    assert isinstance(make_strategy("feedback", 1), FeedbackStrategy)
    portfolio = make_strategy("portfolio", 1)
    assert isinstance(portfolio, PortfolioStrategy)
    assert any(isinstance(m, FeedbackStrategy) for m in portfolio.members)
    assert portfolio.period == len(portfolio.members) * FeedbackStrategy(1).epoch


def test_coverage_is_ordered_access_pairs_and_lock_class_pairs() -> None:
    program = Program(abba, lockdep=False)
    s = FeedbackStrategy(seed=2)
    for i in range(10):
        s.new_execution(i)
        program.run(s)
    s.new_execution(10)  # the last execution is taken in
    access = {c for c in s.coverage if len(c) == 3 and c[0] != "lock-order"}
    # both orders of the two tasks at one lock were seen
    assert any((label, b, a) in access for label, a, b in access), access
    assert any(c[0] == "lock-order" for c in s.coverage), s.coverage
    assert s.corpus and all(e.new == len(e.pairs) > 0 for e in s.corpus)
    assert sum(e.new for e in s.corpus) == len(s.coverage)


def test_an_execution_without_new_coverage_stays_out_of_the_corpus() -> None:
    program = Program(three_counters)
    s = FeedbackStrategy(seed=0)
    for i in range(30):
        s.new_execution(i)
        program.run(s)
    s.new_execution(30)
    # a three-task program has few access orders: most executions add nothing
    assert 0 < len(s.corpus) < 30


@pytest.mark.parametrize("mode", ["reverse", "prefix"])
def test_mutations_use_the_corpus(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FeedbackStrategy, "MUTATE", 1.0)
    monkeypatch.setattr(FeedbackStrategy, "REVERSE", 1.0 if mode == "reverse" else 0.0)
    program = Program(three_counters)
    s = FeedbackStrategy(seed=5)
    s.new_execution(0)
    program.run(s)
    s.new_execution(1)
    if mode == "reverse":
        # steered toward the reverse of a pair the first execution reached first
        ((label, b, a),) = s._wanted
        assert (label, a, b) in s.corpus[0].pairs
    else:
        parent = s._parent
        assert parent is s.corpus[0]
        program.run(s)
        cut = s._cut
        if not s._flips:
            assert s._decisions[:cut] == parent.decisions[:cut]


@pytest.mark.parametrize("strategy", ["feedback", "portfolio"])
def test_an_execution_depends_only_on_seed_and_index(strategy: str) -> None:
    program = Program(lost_update)
    sequential = build_strategy(program, strategy, seed=4, steps=10)
    runs = []
    for i in range(60):
        sequential.new_execution(i)
        runs.append(program.run(sequential).choices)
    for i in (0, 7, 49, 50, 59):
        alone = build_strategy(program, strategy, seed=4, steps=10)
        alone.new_execution(i)
        assert program.run(alone).choices == runs[i], i


def test_without_a_runner_an_execution_out_of_order_starts_from_an_empty_corpus() -> None:
    program = Program(abba, lockdep=False)
    bare = FeedbackStrategy(seed=4)
    bare.new_execution(7)
    assert not bare.corpus
    warmed = FeedbackStrategy(seed=4)
    attach_runner(warmed, program.run)
    warmed.new_execution(7)
    assert warmed.corpus


def test_chunks_of_any_size_find_the_same_failures() -> None:
    whole = run_chunk(BUGGY, 0, 100)
    split = [run_chunk(BUGGY, 0, 37), run_chunk(BUGGY, 37, 26), run_chunk(BUGGY, 63, 37)]
    assert whole.failures, "the injected bug was not found"
    assert [(i, f.signature, c) for i, f, c in whole.failures] == [
        (i, f.signature, c) for chunk in split for i, f, c in chunk.failures
    ]


def test_same_seed_same_failures_with_jobs_1_and_2() -> None:
    kw = dict(strategy="feedback", runs=120, seed=3, bugs=["drop_invalidate_retry"], first_run=25)
    one = asyncvm.explore("prefault_vs_punch_hole", jobs=1, **kw)  # type: ignore[arg-type]
    two = asyncvm.explore("prefault_vs_punch_hole", jobs=2, **kw)  # type: ignore[arg-type]
    assert one.failures
    assert one.failing_runs == two.failing_runs
    assert [(f.signature, f.first_run, f.schedule.choices) for f in one.failures] == [
        (f.signature, f.first_run, f.schedule.choices) for f in two.failures
    ]


@pytest.mark.parametrize("program", [lost_update, abba])
def test_finds_the_classic_bugs_within_100_runs_for_seeds_0_to_9(program: object) -> None:
    for seed in range(10):
        report = asyncvm.explore(
            program,  # type: ignore[arg-type]
            strategy="feedback",
            runs=100,
            seed=seed,
            stop_on_first_failure=True,
            lockdep=False,
        )
        assert report.failures, f"seed {seed}"
