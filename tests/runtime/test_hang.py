"""Hangs that only a signal ends: a spin loop that re-checks unchanged state while nobody else can
run is a hung task, whether a drawn signal, the retry bound or the step bound ends it (issue 14)."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm.runtime import TaskGroup
from asyncvm.runtime.executor import HANG_ROUNDS, HANG_SIGNAL_ROUNDS, ExecutionResult, Executor
from asyncvm.runtime.strategies import RandomStrategy
from asyncvm.runtime.sync import Completion, Word, signal_pending, spin_wait


def run(main: object, seed: int, *, signal: float, max_steps: int = 50_000) -> ExecutionResult:
    strategy = RandomStrategy(seed)
    strategy.new_execution(0)
    exe = Executor(strategy, max_steps=max_steps, data_probs={"signal": signal})
    return exe.run(main)  # type: ignore[arg-type]


def spin_until_signalled(word: Word, out: dict[str, Any]) -> Any:
    """A kernel retry loop: re-check, spin for a write, leave once the state changed or with
    -EINTR on a signal."""

    async def loop() -> None:
        while not out.get("written"):
            if signal_pending():
                out["eintr"] = True
                return
            await spin_wait(word, word.version)

    return loop


def test_a_loop_only_a_signal_ends_is_a_hang_at_the_loop_site() -> None:
    word = Word("never written")
    out: dict[str, Any] = {}
    r = run(spin_until_signalled(word, out), 0, signal=0.05)
    assert r.failure is not None and r.failure.kind == "hang", r.failure
    assert r.failure.signature == "hang:test_hang.py:loop", r.failure
    assert "test_hang.py" in r.failure.evidence["signal"]
    assert "signal" in r.failure.message


def test_without_signals_the_retry_bound_reports_the_same_hang_early() -> None:
    word = Word("never written")
    r = run(spin_until_signalled(word, {}), 0, signal=0.0)
    assert r.failure is not None and r.failure.signature == "hang:test_hang.py:loop", r.failure
    assert "signal" not in r.failure.evidence
    # HANG_ROUNDS forced re-checks, not the 50 000-step bound
    assert r.steps <= 2 * HANG_ROUNDS + 10, r.steps


def test_the_step_bound_ending_forced_re_checks_is_a_hang_not_a_livelock() -> None:
    word = Word("never written")
    r = run(spin_until_signalled(word, {}), 0, signal=0.0, max_steps=HANG_ROUNDS // 2)
    assert r.failure is not None and r.failure.kind == "hang", r.failure
    assert "step bound" in r.failure.message


def spinner_and_writer() -> Any:
    word = Word("flag")
    out: dict[str, Any] = {}
    go = Completion("go")

    async def writer() -> None:
        await go.wait()
        out["written"] = True
        word.write()

    async def main() -> None:
        async with TaskGroup() as tg:
            tg.spawn(spin_until_signalled(word, out), name="spinner")
            tg.spawn(writer, name="writer")
            await go.complete()

    return main


def test_a_signal_while_the_writer_can_still_run_is_an_ordinary_eintr() -> None:
    """Signals stay: one drawn while another task can still write ends the loop with -EINTR."""
    for seed in range(20):
        r = run(spinner_and_writer(), seed, signal=0.3)
        assert r.failure is None, r.failure


def test_a_signal_in_the_first_rounds_is_not_yet_a_hang() -> None:
    """A loop that a draw (a BUSY from outside the model) might still end is given a few rounds."""
    word = Word("never written")
    out: dict[str, Any] = {}
    seeds_with_early_eintr = 0
    for seed in range(40):
        r = run(spin_until_signalled(word, out), seed, signal=0.3)
        if out.pop("eintr", False) and r.failure is None:
            seeds_with_early_eintr += 1
        else:
            assert r.failure is not None and r.failure.kind == "hang", r.failure
    assert HANG_SIGNAL_ROUNDS > 1 and seeds_with_early_eintr > 0


def test_a_spinner_the_writer_releases_is_clean() -> None:
    word = Word("flag")
    state = {"set": False}

    async def spinner() -> None:
        while not state["set"]:
            await spin_wait(word, word.version)

    async def writer() -> None:
        for _ in range(30):
            await asyncvm.runtime.traps.point(None)
        state["set"] = True
        word.write()

    async def main() -> None:
        async with TaskGroup() as tg:
            tg.spawn(spinner, name="spinner")
            tg.spawn(writer, name="writer")

    for seed in range(10):
        assert run(main, seed, signal=0.02).failure is None


# -- the model: KVM_PRE_FAULT_MEMORY on a KVM_MEMSLOT_INVALID slot --------------------------------


@pytest.mark.parametrize("signal", [0.02, 0.0])
def test_610_prefault_retrying_forever_on_an_invalid_memslot_is_a_hang(signal: float) -> None:
    """[6.10] kvm_tdp_map_page() retries RET_PF_RETRY on an INVALID slot while holding kvm->srcu, so
    the memslot delete's synchronize_srcu() never returns: only a signal (or nothing) ends it. The
    default 2% signal used to end it quietly and count the run as progress."""
    report = asyncvm.explore(
        "prefault_vs_memslot_delete",
        strategy="random",
        runs=30,
        seed=1,
        profile="6.10",
        data_probs={"signal": signal},
    )
    assert report.failures, report.summary()
    assert {f.signature for f in report.failures} == {"hang:prefault.py:kvm_tdp_map_page"}, report.summary()


def test_618_prefault_returns_eagain_on_an_invalid_memslot_and_stays_clean() -> None:
    """[~6.18] the same race returns -EAGAIN: no hang."""
    report = asyncvm.explore("prefault_vs_memslot_delete", strategy="random", runs=100, seed=1, profile="6.18")
    assert report.ok, report.summary()
