"""Modeled primitives: lock semantics, SRCU grace periods, and the runtime's built-in oracles."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import asyncvm
from asyncvm import TaskGroup
from asyncvm.runtime import (
    SRCU,
    Atomic,
    Completion,
    Mutex,
    RWLock,
    RWSem,
    SpinLock,
    TryLock,
    WaitQueue,
    cond_resched,
    sleep,
    yield_point,
)
from asyncvm.runtime import now as vnow

Scenario = Callable[[Any], Coroutine[Any, Any, None]]


def explore_all(scenario: Scenario, runs: int = 300, **kw: Any) -> asyncvm.Report:
    """Random and DFS together: enough to see every interleaving of these tiny programs."""
    r = asyncvm.explore(scenario, strategy="random", runs=runs, seed=1, **kw)
    if r.failures:
        return r
    return asyncvm.explore(scenario, strategy="dfs", runs=20_000, preemptions=3, **kw)


def test_rwlock_writer_excludes_readers_and_writers() -> None:
    async def scenario(kvm: Any) -> None:
        lock = RWLock("mmu_lock")
        inside = {"r": 0, "w": 0}

        async def reader() -> None:
            async with lock.read():
                inside["r"] += 1
                assert inside["w"] == 0, "reader inside with a writer"
                await yield_point()
                inside["r"] -= 1

        async def writer() -> None:
            async with lock.write():
                inside["w"] += 1
                assert inside["w"] == 1 and inside["r"] == 0, "writer not alone"
                await yield_point()
                inside["w"] -= 1

        async with TaskGroup() as tg:
            tg.spawn(reader)
            tg.spawn(writer)
            tg.spawn(writer)
            tg.spawn(reader)

    assert explore_all(scenario).ok


def test_rwlock_readers_share() -> None:
    async def scenario(kvm: Any) -> None:
        lock = RWLock("mmu_lock")
        count = {"n": 0}

        async def reader() -> None:
            async with lock.read():
                count["n"] += 1
                while count["n"] < 2:  # spins (a read lock is a spinning lock) until both are in
                    await yield_point()

        async with TaskGroup() as tg:
            tg.spawn(reader)
            tg.spawn(reader)

    # Both readers must be inside together, or the first would spin forever (a livelock). Random
    # walks only: a DFS's non-preemptive default would let the spinner starve the other reader.
    report = asyncvm.explore(scenario, strategy="random", runs=300, seed=1, max_steps=500)
    assert report.ok, report.summary()


def test_rwlock_waiting_writer_blocks_new_readers() -> None:
    order: list[str] = []

    async def scenario(kvm: Any) -> None:
        lock = RWLock("mmu_lock")
        order.clear()

        async def first_reader() -> None:
            await lock.read_lock()
            await yield_point()
            await yield_point()
            await lock.read_unlock()

        async def writer() -> None:
            await lock.write_lock()
            order.append("writer")
            await lock.write_unlock()

        async def late_reader() -> None:
            await lock.read_lock()
            order.append("late_reader")
            await lock.read_unlock()

        await lock.read_lock()  # main holds it for read while the writer queues up
        async with TaskGroup() as tg:
            tg.spawn(writer)
            await yield_point()
            await yield_point()
            # The writer has had the chance to start waiting; now a new reader arrives.
            if lock._slow_writers:
                tg.spawn(late_reader)
            await lock.read_unlock()
        if "late_reader" in order:
            assert order == ["writer", "late_reader"], order

    report = asyncvm.explore(scenario, strategy="dfs", runs=10_000, preemptions=4)
    assert report.ok, report.summary()


def test_rwsem_is_a_sleeping_lock_and_rwlock_is_not() -> None:
    assert RWSem.sleeping and Mutex.sleeping and SRCU.sleeping
    assert not RWLock.sleeping and not SpinLock.sleeping and not TryLock.sleeping


def test_srcu_synchronize_waits_for_readers_that_started_before_it_only() -> None:
    seen: set[bool] = set()

    async def scenario(kvm: Any) -> None:
        srcu = SRCU("kvm->srcu")
        log: list[str] = []
        old_inside = Completion("old_inside")
        sync_started = Completion("sync_started")

        async def old_reader() -> None:
            idx = await srcu.read_lock()
            await old_inside.complete()
            await sync_started.wait_shared()
            await yield_point()
            log.append("old_reader_done")
            await srcu.read_unlock(idx)

        async def syncer() -> None:
            await old_inside.wait()
            await sync_started.complete_all()
            await srcu.synchronize()
            log.append("synchronized")

        async def new_reader() -> None:
            await sync_started.wait_shared()
            while not srcu._waiters and "synchronized" not in log:  # syncer inside synchronize()
                await yield_point()
            idx = await srcu.read_lock()
            log.append("new_reader_in")
            # A reader that began after synchronize() must not delay it: spin until it returns.
            while "synchronized" not in log:
                await yield_point()
            await srcu.read_unlock(idx)

        async with TaskGroup() as tg:
            tg.spawn(old_reader)
            tg.spawn(syncer)
            tg.spawn(new_reader)
        assert log.index("old_reader_done") < log.index("synchronized")
        seen.add(log.index("new_reader_in") < log.index("synchronized"))

    report = asyncvm.explore(scenario, strategy="random", runs=500, seed=3, max_steps=2000)
    assert report.ok, report.summary()
    assert seen == {True, False}, "some runs must have a reader enter during synchronize()"


def test_atomic_cmpxchg_lets_exactly_one_of_two_win() -> None:
    async def scenario(kvm: Any) -> None:
        cell = Atomic(0, "spte")
        wins: list[str] = []

        async def racer(name: str) -> None:
            if await cell.cmpxchg(0, name) == 0:
                wins.append(name)

        async with TaskGroup() as tg:
            tg.spawn(racer, "a")
            tg.spawn(racer, "b")
        assert len(wins) == 1 and cell.value == wins[0]

    assert explore_all(scenario).ok


def test_trylock_reports_busy_instead_of_blocking() -> None:
    async def scenario(kvm: Any) -> None:
        lock = TryLock("tdr")
        got: list[bool] = []

        async def worker() -> None:
            ok = await lock.try_lock()
            got.append(ok)
            if ok:
                await yield_point()
                await lock.unlock()

        async with TaskGroup() as tg:
            tg.spawn(worker)
            tg.spawn(worker)
        assert True in got

    r = asyncvm.explore(scenario, strategy="dfs", runs=1000)
    assert r.ok and r.exhausted


def test_trylock_shared_holders_coexist_and_exclude_exclusive() -> None:
    async def scenario(kvm: Any) -> None:
        lock = TryLock("sept_tree")
        assert await lock.try_lock("read")
        assert await lock.try_lock("read")
        assert not await lock.try_lock("write")
        await lock.unlock()
        await lock.unlock()
        assert await lock.try_lock("write")
        await lock.unlock()

    assert asyncvm.explore(scenario, strategy="random", runs=5).ok


def test_waitqueue_wakes_when_condition_holds() -> None:
    async def scenario(kvm: Any) -> None:
        wq = WaitQueue("wq")
        state = {"ready": False}

        async def waiter() -> None:
            await wq.wait_event(lambda: state["ready"])

        async def waker() -> None:
            state["ready"] = True
            await wq.wake_up()

        async with TaskGroup() as tg:
            tg.spawn(waiter)
            tg.spawn(waker)

    assert explore_all(scenario).ok


def test_virtual_sleep_advances_virtual_time_only() -> None:
    async def scenario(kvm: Any) -> None:
        stamps: list[tuple[str, float]] = []

        async def sleeper(name: str, t: float) -> None:
            await sleep(t)
            stamps.append((name, vnow()))

        async with TaskGroup() as tg:
            tg.spawn(sleeper, "long", 3600.0)
            tg.spawn(sleeper, "short", 0.5)
        assert stamps == [("short", 0.5), ("long", 3600.0)]

    assert explore_all(scenario).ok


def test_sleep_ties_are_a_recorded_choice() -> None:
    orders = set()

    async def scenario(kvm: Any) -> None:
        out: list[str] = []

        async def sleeper(name: str) -> None:
            await sleep(1.0)
            out.append(name)

        async with TaskGroup() as tg:
            tg.spawn(sleeper, "a")
            tg.spawn(sleeper, "b")
        orders.add(tuple(out))

    report = asyncvm.explore(scenario, strategy="dfs", runs=1000)
    assert report.exhausted and report.ok
    assert orders == {("a", "b"), ("b", "a")}


# -- the built-in oracles: each one fires on its bug ------------------------------------------------


def _only_failure(scenario: Scenario, **kw: Any) -> asyncvm.FoundFailure:
    report = asyncvm.explore(scenario, strategy="random", runs=20, seed=0, **kw)
    assert len(report.failures) == 1, report.summary()
    return report.failures[0]


def test_sleeping_while_holding_a_spinlock_is_reported() -> None:
    async def scenario(kvm: Any) -> None:
        spin, mutex = SpinLock("tdp_mmu_pages_lock"), Mutex("slots_lock")
        async with spin:
            async with mutex:
                pass

    found = _only_failure(scenario)
    assert found.kind == "atomic_sleep"
    assert "sleeping function called from invalid context" in found.message
    assert "tdp_mmu_pages_lock" in found.message


def test_cond_resched_under_rwlock_is_reported() -> None:
    async def scenario(kvm: Any) -> None:
        lock = RWLock("mmu_lock")
        async with lock.write():
            await cond_resched()

    assert _only_failure(scenario).signature == "atomic_sleep:mmu_lock"


def test_sleeping_under_a_mutex_is_fine() -> None:
    async def scenario(kvm: Any) -> None:
        async with Mutex("slots_lock"):
            await cond_resched()
            await sleep(1)

    assert asyncvm.explore(scenario, strategy="random", runs=5).ok


def test_synchronize_srcu_inside_its_own_read_section_is_reported() -> None:
    async def scenario(kvm: Any) -> None:
        srcu = SRCU("kvm->srcu")
        idx = await srcu.read_lock()
        await srcu.synchronize()
        await srcu.read_unlock(idx)

    found = _only_failure(scenario)
    assert found.kind == "srcu_deadlock"


def test_lockdep_sees_slots_lock_inside_srcu_against_synchronize_under_slots_lock() -> None:
    async def scenario(kvm: Any) -> None:
        srcu, slots_lock = SRCU("kvm->srcu"), Mutex("slots_lock")

        async def vcpu() -> None:
            idx = await srcu.read_lock()
            async with slots_lock:  # the rule kvm-core.md §6 forbids
                pass
            await srcu.read_unlock(idx)

        async def memslot_update() -> None:
            async with slots_lock:
                await srcu.synchronize()

        async with TaskGroup() as tg:
            tg.spawn(vcpu)
            tg.spawn(memslot_update)

    report = asyncvm.explore(scenario, strategy="random", runs=50, seed=0)
    assert report.first("lockdep") is not None, report.summary()
    assert report.first("lockdep").signature == "lockdep:kvm->srcu,slots_lock"  # type: ignore[union-attr]


def test_lock_held_when_task_ends_is_reported() -> None:
    async def scenario(kvm: Any) -> None:
        async def leaker() -> None:
            await Mutex("kvm->lock").lock()

        async with TaskGroup() as tg:
            tg.spawn(leaker)

    found = _only_failure(scenario)
    assert found.kind == "lock_leak"
    assert found.task == "leaker"
    assert "kvm->lock" in found.message


def test_unlock_by_non_owner_is_reported() -> None:
    async def scenario(kvm: Any) -> None:
        lock = Mutex("slots_lock")
        await lock.lock()

        async def thief() -> None:
            await lock.unlock()

        async with TaskGroup() as tg:
            tg.spawn(thief)
        await lock.unlock()

    found = _only_failure(scenario)
    assert found.kind == "bad_unlock"
    assert found.task == "thief"


def test_livelock_names_the_spinning_task() -> None:
    async def scenario(kvm: Any) -> None:
        flag = {"set": False}

        async def spinner() -> None:
            while not flag["set"]:
                await yield_point()

        async def blocked() -> None:
            await Completion("never").wait()
            flag["set"] = True

        async with TaskGroup() as tg:
            tg.spawn(spinner)
            tg.spawn(blocked)

    found = _only_failure(scenario, max_steps=500)
    assert found.kind == "livelock"
    assert found.signature == "livelock:spinner"
    assert "500 steps" in found.message


def test_exception_names_task_and_step() -> None:
    async def scenario(kvm: Any) -> None:
        async def boom() -> None:
            await yield_point()
            raise KeyError("gfn 0x10")

        async with TaskGroup() as tg:
            tg.spawn(boom, name="vcpu0")

    found = _only_failure(scenario)
    assert found.kind == "exception"
    assert found.task == "vcpu0"
    assert found.failure.step > 0
    assert str(found.failure).startswith("exception in task vcpu0 at step")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_live_mode_runs_the_same_model_under_anyio(backend: str) -> None:
    import anyio

    async def model() -> int:
        lock, rw, srcu = Mutex("m"), RWLock("mmu_lock"), SRCU("srcu")
        total = {"x": 0}
        done = Completion("done")

        async def worker() -> None:
            idx = await srcu.read_lock()
            for _ in range(50):
                async with lock:
                    v = total["x"]
                    await yield_point()
                    total["x"] = v + 1
                async with rw.read():
                    await cond_resched() if False else yield_point()
            await srcu.read_unlock(idx)

        async with TaskGroup() as tg:
            for i in range(4):
                tg.spawn(worker, name=f"w{i}")
        async with rw.write():
            pass
        await srcu.synchronize()
        await done.complete()
        await done.wait()
        await sleep(0.001)
        return total["x"]

    assert anyio.run(model, backend=backend) == 200


def test_live_mode_reports_model_bugs_as_exceptions() -> None:
    import anyio

    async def model() -> None:
        async with SpinLock("spin"):
            await cond_resched()

    with pytest.raises(asyncvm.Violation, match="sleeping function"):
        anyio.run(model)
