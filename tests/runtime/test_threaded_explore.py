"""Controlled executions in worker threads beside live model code: the two worlds never meet.

The executor in charge is context-local, so ``anyio.to_thread.run_sync(lambda: asyncvm.explore(...))``
next to a live pre-fault loop in the event loop's thread leaves both intact (issue 17), and two
threads can run executions side by side with the results each would get alone.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.check import check_quiescent
from asyncvm.runtime import traps

PAGE = uapi.PAGE_SIZE
PAGES = 16
BACKENDS = ["asyncio", "trio"]


def _signatures(report: asyncvm.Report) -> list[tuple[str, int, int]]:
    return sorted((f.signature, f.first_run, f.count) for f in report.failures)


def _explore(seed: int) -> asyncvm.Report:
    # A buggy model, so each run has failures to compare: the same seed must find the same ones.
    return asyncvm.explore(
        "prefault_vs_punch_hole", strategy="random", runs=40, seed=seed, bugs=["drop_invalidate_retry"]
    )


async def _live_vm() -> tuple[Any, Any, list[Any]]:
    kvm = asyncvm.Kvm()
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem = await vm.create_guest_memfd(size=PAGES * PAGE)
    hva = kvm.mm.mmap(PAGES * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGES * PAGE, hva, 0, gmem)
    )
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGES * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return vm, gmem, [await vm.create_vcpu(i) for i in range(2)]


async def _prefault(vcpu: Any) -> None:
    r = uapi.PreFaultMemory(0, PAGES * PAGE)
    while r.size:
        await vcpu.pre_fault_memory(r)


async def _live_loop_beside(work: Any) -> tuple[Any, int]:
    """Pre-fault and punch holes live until `work` (run in a worker thread) returns."""
    vm, gmem, cpus = await _live_vm()
    done = anyio.Event()
    result: list[Any] = []
    rounds = 0

    async def worker() -> None:
        result.append(await anyio.to_thread.run_sync(work))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        while not done.is_set() or rounds < 3:
            assert traps.active() is None  # the worker's executor is invisible here
            async with anyio.create_task_group() as race:
                for v in cpus:
                    race.start_soon(_prefault, v)
                race.start_soon(gmem.fallocate, uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, 4 * PAGE)
            rounds += 1
    check_quiescent(vm)
    for v in cpus:
        assert not v.mutex.is_locked()
    return result[0], rounds


@pytest.mark.parametrize("backend", BACKENDS)
def test_explore_in_a_worker_thread_beside_a_live_prefault_loop(backend: str) -> None:
    alone = _signatures(_explore(7))
    assert alone, "the injected bug must give the comparison something to compare"
    report, rounds = anyio.run(_live_loop_beside, lambda: _explore(7), backend=backend)
    assert rounds >= 3
    assert _signatures(report) == alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_and_shrink_in_a_worker_thread_beside_live_code(backend: str) -> None:
    found = _explore(7).failures[0]
    expected = asyncvm.replay(found.schedule, "prefault_vs_punch_hole").failure
    assert expected is not None

    def replay() -> Any:
        return [asyncvm.replay(found.schedule, "prefault_vs_punch_hole").failure for _ in range(10)]

    failures, _rounds = anyio.run(_live_loop_beside, replay, backend=backend)
    for failure in failures:
        assert failure is not None and failure.signature == expected.signature and failure.step == expected.step


def test_two_threads_explore_side_by_side_with_the_results_of_each_alone() -> None:
    seeds = [3, 11]
    alone = {s: _signatures(_explore(s)) for s in seeds}
    got: dict[int, list[tuple[str, int, int]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(seeds))

    def run(seed: int) -> None:
        try:
            start.wait()
            got[seed] = _signatures(_explore(seed))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == alone


def test_an_execution_is_invisible_to_other_threads_while_it_runs() -> None:
    seen: list[object] = []
    inside = threading.Event()
    leave = threading.Event()

    async def scenario(kvm: asyncvm.Kvm) -> None:
        inside.set()
        # Block this thread's execution (not the model) until the other thread has looked.
        leave.wait()
        seen.append(traps.active())

    t = threading.Thread(target=asyncvm.explore, args=(scenario,), kwargs={"runs": 1, "strategy": "random"})
    t.start()
    inside.wait()
    seen.append(traps.active())
    leave.set()
    t.join()
    assert seen[0] is None and seen[1] is not None


# -- the awaitable forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_aexplore_finds_what_explore_finds_while_the_loop_keeps_serving(backend: str) -> None:
    alone = _signatures(_explore(7))

    async def main() -> tuple[asyncvm.Report, int]:
        ticks = 0
        running = True

        async def ticker() -> None:
            nonlocal ticks
            while running:
                ticks += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            report = await asyncvm.aexplore(
                "prefault_vs_punch_hole", strategy="random", runs=40, seed=7, bugs=["drop_invalidate_retry"]
            )
            running = False
        return report, ticks

    report, ticks = anyio.run(main, backend=backend)
    assert _signatures(report) == alone
    assert ticks > 1  # the event loop ran other tasks while the campaign ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_aexplore_stops_at_the_next_chunk(backend: str) -> None:
    chunks: list[int] = []

    async def main() -> bool:
        with anyio.CancelScope() as scope:

            def progress(report: asyncvm.Report) -> None:
                chunks.append(report.runs)
                if len(chunks) == 1:
                    anyio.from_thread.run_sync(scope.cancel)

            await asyncvm.aexplore("prefault_vs_punch_hole", strategy="random", runs=100_000, progress=progress)
        return scope.cancelled_caught

    assert anyio.run(main, backend=backend)
    assert len(chunks) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_areplay_and_ashrink_await_what_replay_and_shrink_return(backend: str) -> None:
    found = _explore(7).failures[0]
    expected = asyncvm.replay(found.schedule, "prefault_vs_punch_hole").failure
    assert expected is not None

    async def main() -> tuple[Any, Any]:
        result = await asyncvm.areplay(found.schedule, "prefault_vs_punch_hole")
        shrunk = await asyncvm.ashrink(found.schedule, "prefault_vs_punch_hole", max_attempts=50)  # type: ignore[arg-type]
        return result.failure, shrunk

    failure, shrunk = anyio.run(main, backend=backend)
    assert failure is not None and failure.signature == expected.signature and failure.step == expected.step
    assert shrunk.failure is not None and shrunk.failure.signature == expected.signature
    assert len(shrunk.choices) <= len(found.schedule.choices)
