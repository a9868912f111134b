"""Small concurrent programs with known bugs (and their fixed twins) used by the runtime tests."""

from __future__ import annotations

from typing import Any

from asyncvm import TaskGroup
from asyncvm.runtime import Mutex, draw, yield_point


async def lost_update(kvm: Any) -> None:
    """Two tasks read-modify-write a counter around a scheduling point: one update can be lost."""
    state = {"x": 0}

    async def inc() -> None:
        v = state["x"]
        await yield_point()
        state["x"] = v + 1

    async with TaskGroup() as tg:
        tg.spawn(inc, name="a")
        tg.spawn(inc, name="b")
    assert state["x"] == 2, f"lost update: x={state['x']}"


async def locked_update(kvm: Any) -> None:
    """The fix: the read-modify-write happens under a mutex."""
    state = {"x": 0}
    lock = Mutex("counter_lock")

    async def inc() -> None:
        async with lock:
            v = state["x"]
            await yield_point()
            state["x"] = v + 1

    async with TaskGroup() as tg:
        tg.spawn(inc, name="a")
        tg.spawn(inc, name="b")
    assert state["x"] == 2, f"lost update: x={state['x']}"


async def abba(kvm: Any) -> None:
    """Two tasks take two mutexes in opposite orders: an AB/BA deadlock."""
    a, b = Mutex("A"), Mutex("B")

    async def ab() -> None:
        async with a:
            async with b:
                await yield_point()

    async def ba() -> None:
        async with b:
            async with a:
                await yield_point()

    async with TaskGroup() as tg:
        tg.spawn(ab, name="ab")
        tg.spawn(ba, name="ba")


async def ordered(kvm: Any) -> None:
    """The fix: both tasks take A before B."""
    a, b = Mutex("A"), Mutex("B")

    async def ab() -> None:
        async with a:
            async with b:
                await yield_point()

    async with TaskGroup() as tg:
        tg.spawn(ab, name="t1")
        tg.spawn(ab, name="t2")


async def one_order_per_execution(kvm: Any) -> None:
    """A single task takes A then B, or B then A, as a draw decides: it can never deadlock."""
    a, b = Mutex("A"), Mutex("B")
    first, second = (a, b) if draw("order", 0.5) == 0 else (b, a)
    async with first:
        async with second:
            await yield_point()


async def three_counters(kvm: Any) -> None:
    """Three tasks, some locking, a draw: enough variety for replay tests (fails now and then)."""
    state = {"x": 0}
    lock = Mutex("m")

    async def worker(locked: bool) -> None:
        for _ in range(2):
            if locked:
                async with lock:
                    state["x"] += 1
                    await yield_point()
            else:
                v = state["x"]
                await yield_point()
                state["x"] = v + 1
            if draw("extra", 0.3):
                await yield_point()

    async with TaskGroup() as tg:
        tg.spawn(worker, True, name="w0")
        tg.spawn(worker, True, name="w1")
        tg.spawn(worker, False, name="w2")
    assert state["x"] == 6, f"lost update: x={state['x']}"
