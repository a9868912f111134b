"""Benchmark: the cost of one controlled scheduling decision against the alternatives."""

from __future__ import annotations

import gc
import time
import types
from collections.abc import Callable, Generator
from typing import Any

from ..runtime import RandomStrategy, TaskGroup, yield_point
from ..runtime.executor import Executor


@types.coroutine
def _bare_yield() -> Generator[None, None, None]:
    yield


def _best_of(repeats: int, fn: Callable[[], float]) -> float:
    # The collector is paused so that neither side pays for the other's garbage.
    gc.collect()
    gc.disable()
    try:
        return min(fn() for _ in range(repeats))
    finally:
        gc.enable()


def bare_send(switches: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per switch when a loop alternates coro.send() between two coroutines."""

    async def body() -> None:
        while True:
            await _bare_yield()

    a, b = body(), body()
    a.send(None)
    b.send(None)
    sa, sb = a.send, b.send
    t0 = clock()
    for _ in range(switches // 2):
        sa(None)
        sb(None)
    dt = clock() - t0
    a.close()
    b.close()
    return dt / switches


def executor_decision(decisions: int, tasks: int = 2, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per decision of the controlled executor: seeded random pick, recorded choice."""
    per_task = decisions // tasks

    async def body() -> None:
        for _ in range(per_task):
            await yield_point()

    async def main() -> None:
        async with TaskGroup() as tg:
            for i in range(tasks):
                tg.spawn(body, name=f"t{i}")

    strategy = RandomStrategy(seed=1)
    strategy.new_execution(0)
    exe = Executor(strategy, max_steps=decisions * 2)
    t0 = clock()
    result = exe.run(main)
    dt = clock() - t0
    return dt / result.steps


def trio_handoff(switches: int) -> float:
    """Seconds per switch of a two-task baton passed with trio.lowlevel reschedule/wait."""
    import trio
    import trio.lowlevel as ll

    out: list[float] = []

    async def main() -> None:
        tasks: list[Any] = [None, None]
        done = trio.Event()
        n = switches // 2

        async def player(i: int) -> None:
            tasks[i] = ll.current_task()
            await ll.wait_task_rescheduled(lambda _: ll.Abort.SUCCEEDED)
            for _ in range(n):
                ll.reschedule(tasks[1 - i])
                await ll.wait_task_rescheduled(lambda _: ll.Abort.SUCCEEDED)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(player, 0)
            nursery.start_soon(player, 1)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            ll.reschedule(tasks[0])
            await done.wait()
            out.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()

    import trio.testing

    trio.run(main)
    return out[0] / switches


def anyio_event_handoff(switches: int, backend: str = "asyncio") -> float:
    """Seconds per switch of a baton passed between two tasks through fresh anyio.Events."""
    import anyio

    out: list[float] = []

    async def main() -> None:
        events = [anyio.Event(), anyio.Event()]
        n = switches // 2

        async def player(i: int) -> None:
            for _ in range(n):
                await events[i].wait()
                events[i] = anyio.Event()
                events[1 - i].set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(player, 0)
            tg.start_soon(player, 1)
            await anyio.sleep(0)
            t0 = time.perf_counter()
            events[0].set()
        out.append(time.perf_counter() - t0)

    anyio.run(main, backend=backend)
    return out[0] / switches


def best_bare_send(switches: int = 200_000, repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per bare coro.send() switch, best of `repeats`, the collector paused."""
    return _best_of(repeats, lambda: bare_send(switches, clock))


def scheduling_decision(quick: bool, tick: Callable[[int, int, str], None]) -> dict[str, Any]:
    """The benchmark: a quick run is a smoke test, not a measurement."""
    return run(decisions=50_000 if quick else 200_000, repeats=3 if quick else 7, tick=tick)


def run(
    decisions: int = 200_000, repeats: int = 7, tick: Callable[[int, int, str], None] | None = None
) -> dict[str, Any]:
    """Everything measured in this one process, best of `repeats`, with the ratios.

    The bare send and the executor are measured alternately, in CPU seconds of this process, so
    neither a change in machine speed nor other load during the run moves the ratio much. The
    trio and anyio handoffs (event loops with their own clocks) are timed in wall seconds.
    """
    total = repeats + 2
    bares, exes = [], []
    for i in range(repeats):
        if tick is not None:
            tick(i, total, "bare send vs executor")
        bares.append(_best_of(1, lambda: bare_send(decisions, time.process_time)))
        exes.append(_best_of(1, lambda: executor_decision(decisions, clock=time.process_time)))
    bare, exe = min(bares), min(exes)
    if tick is not None:
        tick(repeats, total, "trio handoff")
    handoff = _best_of(max(1, repeats // 2), lambda: trio_handoff(decisions // 4))
    if tick is not None:
        tick(repeats + 1, total, "anyio handoff")
    event = _best_of(max(1, repeats // 2), lambda: anyio_event_handoff(decisions // 4))
    if tick is not None:
        tick(total, total, "")
    return {
        "decisions": decisions,
        "clock": "CPU seconds of this process (bare send, executor); wall seconds (trio, anyio)",
        "bare_send_us": round(bare * 1e6, 4),
        "executor_decision_us": round(exe * 1e6, 4),
        "ratio_executor_vs_bare_send": round(exe / bare, 2),
        "target_ratio": 3.0,
        "decisions_per_second": round(1 / exe),
        "trio_lowlevel_handoff_us": round(handoff * 1e6, 4),
        "ratio_trio_lowlevel_vs_bare_send": round(handoff / bare, 2),
        "anyio_event_handoff_us": round(event * 1e6, 4),
        "ratio_anyio_event_vs_bare_send": round(event / bare, 2),
    }
