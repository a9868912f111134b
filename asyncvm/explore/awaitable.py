"""Awaitable forms of explore(), replay() and shrink() for async programs (asyncio or trio).

``await asyncvm.aexplore(...)`` runs the same campaign as ``asyncvm.explore(...)`` in a worker
thread, so a VMM test harness keeps serving its event loop meanwhile (the a-prefix is the usual
spelling of an awaitable twin: Django's ``aget``, the builtins ``anext`` and ``aiter``). The
controlled executor is context-local, so live model code in the event loop's thread and the
executions in the worker never see each other. With ``jobs > 1`` the executions run in worker
processes, as they do for explore().

A cancelled caller stops the campaign at its next chunk boundary (or, for ashrink(), at its next
improvement) and gets the cancellation; a replay is a single execution and always finishes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..runtime.executor import ExecutionResult
from .campaign import Report
from .driver import explore
from .engine import replay
from .scenarios import ScenarioFn
from .schedule import Schedule
from .shrink import DEFAULT_ATTEMPTS, shrink

T = TypeVar("T")


async def _in_thread(call: Callable[[], T]) -> T:
    # anyio is imported on first use: `import asyncvm` stays light for campaign workers.
    import anyio.to_thread

    return await anyio.to_thread.run_sync(call)


def _stop_if_cancelled() -> None:
    """In the worker thread: raise the caller's cancellation if its cancel scope was cancelled."""
    import anyio.from_thread

    anyio.from_thread.check_cancelled()


async def aexplore(
    scenario: ScenarioFn | str,
    *,
    strategy: str = "pct",
    runs: int = 1000,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    profile: str = "6.18",
    bugs: Iterable[str] = (),
    progress: Callable[[Report], None] | None = None,
    **options: Any,
) -> Report:
    """``await`` form of :func:`asyncvm.explore`: the same campaign, the same Report, run in a
    worker thread. `progress` is called in that thread after each chunk; any other keyword
    (``depth``, ``max_steps``, ``jobs``, ``time_budget``, ...) is passed on to explore()."""

    def each_chunk(report: Report) -> None:
        _stop_if_cancelled()  # between chunks
        if progress is not None:
            progress(report)

    call = functools.partial(
        explore,
        scenario,
        strategy=strategy,
        runs=runs,
        seed=seed,
        params=params,
        profile=profile,
        bugs=tuple(bugs),
        progress=each_chunk,
        **options,
    )
    return await _in_thread(call)


async def areplay(
    source: str | Path | Schedule, scenario: ScenarioFn | str, *, force: bool = False, record: bool = True
) -> ExecutionResult:
    """``await`` form of :func:`asyncvm.replay`: the schedule re-run exactly, in a worker thread."""
    return await _in_thread(functools.partial(replay, source, scenario, force=force, record=record))


async def ashrink(
    source: str | Path | Schedule,
    scenario: ScenarioFn,
    *,
    force: bool = False,
    max_attempts: int = DEFAULT_ATTEMPTS,
    progress: Callable[[int, tuple[int, int]], None] | None = None,
) -> Schedule:
    """``await`` form of :func:`asyncvm.shrink`: the smallest schedule that still fails the same
    way, searched in a worker thread; `progress(attempts, (preemptions, steps))` is called there
    on each improvement."""

    def improved(attempts: int, size: tuple[int, int]) -> None:
        _stop_if_cancelled()
        if progress is not None:
            progress(attempts, size)

    call = functools.partial(shrink, source, scenario, force=force, max_attempts=max_attempts, progress=improved)
    return await _in_thread(call)
