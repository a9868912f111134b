"""The happens-before race detector: one test per rule, each with the racy program (fires) and
its correctly synchronized twin (silent), on bare runtime primitives and on the model."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from asyncvm import TaskGroup
from asyncvm.check.races import RaceDetector
from asyncvm.runtime import SRCU, Atomic, Completion, Executor, Mutex, RandomStrategy, RWLock, hb, yield_point
from asyncvm.runtime.executor import ExecutionResult

Program = Callable[[], Coroutine[Any, Any, None]]


def run(program: Program, seed: int = 0, detector: bool = True) -> ExecutionResult:
    return Executor(RandomStrategy(seed), hb=RaceDetector() if detector else None).run(program)


def races(make: Callable[[], Program], seeds: int = 20) -> list[str]:
    """The data-race signatures over a few schedules (a race needs no particular one); `make`
    builds the program afresh each time (a failed run leaves its locks held)."""
    out = []
    for seed in range(seeds):
        failure = run(make(), seed).failure
        if failure is not None:
            assert failure.kind == "data_race", failure
            out.append(failure.signature)
    return out


def two(a: Program, b: Program) -> Program:
    async def main() -> None:
        async with TaskGroup() as tg:
            tg.spawn(a, name="a")
            tg.spawn(b, name="b")

    return main


WORD = ("spte", 1, 0x10)


# -- rule: a plain store racing a cmpxchg --------------------------------------------------------
def store_vs_cmpxchg(store_kind: int) -> Program:
    async def cmpxchg() -> None:
        await yield_point()
        hb.access(hb.ATOMIC_RMW, *WORD)

    async def store() -> None:
        await yield_point()
        hb.access(store_kind, *WORD)

    return two(cmpxchg, store)


def test_plain_store_racing_cmpxchg_is_reported() -> None:
    found = races(lambda: store_vs_cmpxchg(hb.PLAIN_WRITE))
    assert len(found) == 20  # whatever the order: nothing orders the two
    assert found[0] == "data_race:spte:test_races.py:cmpxchg|test_races.py:store"


def test_marked_store_racing_cmpxchg_is_silent() -> None:
    assert races(lambda: store_vs_cmpxchg(hb.WRITE_ONCE)) == []


# -- rule: a counter read-modify-written without its lock ----------------------------------------
def counter(locked_b: bool) -> Program:
    lock = Mutex("counter_lock")

    async def locked() -> None:
        async with lock:
            hb.access(hb.PLAIN_RMW, "nr_premapped")

    async def b() -> None:
        if locked_b:
            await locked()
        else:
            await yield_point()
            hb.access(hb.PLAIN_RMW, "nr_premapped")

    return two(locked, b)


def test_counter_rmw_without_its_lock_is_reported() -> None:
    assert set(races(lambda: counter(locked_b=False))) == {
        "data_race:nr_premapped:test_races.py:b|test_races.py:locked"
    }


def test_counter_rmw_under_its_lock_is_silent() -> None:
    assert races(lambda: counter(locked_b=True)) == []


def rw_program(a_kind: int, a_write: bool, b_kind: int) -> Program:
    """Task a touches the word under mmu_lock (write side if `a_write`), task b under the read side."""

    async def main() -> None:
        lock = RWLock("mmu_lock")

        async def a() -> None:
            await (lock.write_lock() if a_write else lock.read_lock())
            hb.access(a_kind, *WORD)
            await (lock.write_unlock() if a_write else lock.read_unlock())

        async def b() -> None:
            await lock.read_lock()
            hb.access(b_kind, *WORD)
            await lock.read_unlock()

        await two(a, b)()

    return main


def test_two_readers_of_an_rwlock_are_not_ordered() -> None:
    """A read acquire orders only after write releases: plain writes under the read side race."""
    assert races(lambda: rw_program(hb.PLAIN_WRITE, False, hb.ATOMIC_RMW))
    assert races(lambda: rw_program(hb.PLAIN_WRITE, True, hb.READ_ONCE)) == []
    assert races(lambda: rw_program(hb.PLAIN_WRITE, True, hb.PLAIN_READ)) == []


# -- silent: accesses ordered by SRCU, a completion, spawn/join, an atomic -----------------------
def srcu_program(sync: bool) -> Program:
    srcu = SRCU("kvm->srcu")
    started = Completion("reader_in")

    async def reader() -> None:
        idx = await srcu.read_lock()
        await started.complete()
        await yield_point()
        hb.access(hb.PLAIN_READ, "memslots")
        await srcu.read_unlock(idx)

    async def updater(sync: bool) -> None:
        await started.wait_shared()
        if sync:
            await srcu.synchronize()
        hb.access(hb.PLAIN_WRITE, "memslots")

    return two(reader, lambda: updater(sync))


def test_srcu_grace_period_orders_readers_before_the_updater() -> None:
    # The completion orders the reader's start before the updater, not its read: only the grace period does.
    assert races(lambda: srcu_program(True)) == []
    assert races(lambda: srcu_program(False))


def completion_program(use: bool) -> Program:
    done = Completion("done")

    async def producer(complete: bool) -> None:
        hb.access(hb.PLAIN_WRITE, "payload")
        if complete:
            await done.complete()

    async def consumer(wait: bool) -> None:
        if wait:
            await done.wait()
        await yield_point()
        hb.access(hb.PLAIN_READ, "payload")

    return two(lambda: producer(use), lambda: consumer(use))


def test_completion_orders_the_completer_before_the_waiter() -> None:
    assert races(lambda: completion_program(True)) == []
    assert races(lambda: completion_program(False))


def test_spawn_and_join_order_parent_and_children() -> None:
    async def child() -> None:
        hb.access(hb.PLAIN_WRITE, "x")

    async def main() -> None:
        hb.access(hb.PLAIN_WRITE, "x")
        async with TaskGroup() as tg:
            tg.spawn(child, name="child")
        hb.access(hb.PLAIN_READ, "x")

    assert races(lambda: main) == []


def flag_program(publish: int, subscribe: int, via_atomic: bool) -> Program:
    """Publish `data`, then a flag: through an atomic cell, or a word accessed with the given kinds."""
    flag: Atomic[int] = Atomic(0, "flag")
    state = {"ready": False}

    async def publisher() -> None:
        hb.access(hb.PLAIN_WRITE, "data")
        if via_atomic:
            await flag.store(1)
        else:
            await yield_point()
            hb.access(publish, "ready")
            state["ready"] = True

    async def subscriber() -> None:
        while True:
            await yield_point()
            if via_atomic:
                if await flag.load():
                    break
            else:
                hb.access(subscribe, "ready")
                if state["ready"]:
                    break
        hb.access(hb.PLAIN_READ, "data")

    return two(publisher, subscriber)


def test_release_acquire_on_a_word_and_atomic_cells_order() -> None:
    # smp_store_release / smp_load_acquire: ordered; WRITE_ONCE / READ_ONCE order nothing.
    assert races(lambda: flag_program(hb.STORE_RELEASE, hb.LOAD_ACQUIRE, False)) == []
    found = races(lambda: flag_program(hb.WRITE_ONCE, hb.READ_ONCE, False))
    assert set(found) == {"data_race:data:test_races.py:publisher|test_races.py:subscriber"}
    # An atomic cell's store and load order like a release and an acquire.
    assert races(lambda: flag_program(0, 0, True)) == []


def test_without_a_detector_accesses_cost_nothing_and_report_nothing() -> None:
    result = run(store_vs_cmpxchg(hb.PLAIN_WRITE), detector=False)
    assert result.failure is None


@pytest.mark.parametrize("seed", range(3))
def test_the_report_names_both_accesses(seed: int) -> None:
    failure = run(store_vs_cmpxchg(hb.PLAIN_WRITE), seed).failure
    assert failure is not None
    assert "data race on spte(0x1, 0x10)" in failure.message
    kinds = sorted(a["kind"] for a in failure.evidence["accesses"])
    assert kinds == ["atomic read-modify-write", "plain write"]


# -- on the model ----------------------------------------------------------------------------------
def _words_seen(scenario: str, seed: int = 0) -> tuple[RaceDetector, ExecutionResult]:
    from asyncvm.explore.engine import Program
    from asyncvm.explore.scenarios import REGISTRY, load_bundled

    load_bundled()
    detector = RaceDetector()
    program = Program(REGISTRY[scenario].fn)
    result = Executor(RandomStrategy(seed), hb=detector).run(program.main())
    return detector, result


def test_the_model_announces_its_shared_words() -> None:
    detector, result = _words_seen("prefault_vs_punch_hole")
    assert result.failure is None
    classes = {word[0] for word in detector.words if isinstance(word, tuple)}
    assert {"spte", "mmu_invalidate_seq", "mmu_invalidate_in_progress", "mmu_invalidate_range"} <= classes
    assert {"mem_attr_array", "memslots", "pre_fault_allowed"} <= classes
    detector, result = _words_seen("tdx_init_mem_region_parallel")
    assert result.failure is None
    assert {"nr_premapped", "folio_uptodate"} <= {word[0] for word in detector.words if isinstance(word, tuple)}


def test_injected_plain_spte_store_is_reported_in_the_first_runs() -> None:
    """The plain store breaks no invariant the other oracles check in this scenario; the detector
    sees it on the first schedule where two vCPUs touch one SPTE, whatever their order."""
    import asyncvm

    report = asyncvm.explore("prefault_vs_punch_hole", bugs=["plain_spte_store"], runs=5, seed=0)
    assert report.failures
    assert {f.signature.split(":")[1] for f in report.failures} == {"spte"}
    assert all(f.schedule.detect_races for f in report.failures)
    assert min(f.first_run for f in report.failures) == 0
    again = asyncvm.replay(report.failures[0].schedule, "prefault_vs_punch_hole")
    assert again.failure is not None and again.failure.signature == report.failures[0].signature


@pytest.mark.parametrize(
    "scenario",
    ["prefault_vs_punch_hole", "prefault_vs_memslot_delete", "tdx_init_mem_region_parallel", "snp_post_launch_faults"],
)
def test_the_correct_model_has_no_data_race(scenario: str) -> None:
    import asyncvm

    report = asyncvm.explore(scenario, runs=60, seed=0, detect_races=True)
    assert not [f for f in report.failures if f.signature.startswith("data_race")], report.summary()
