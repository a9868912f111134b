"""Live mode: the same primitives on anyio, so model code runs inside an asyncio or trio program.

No strategy decides anything here. A scheduling point is an anyio checkpoint, a blocked task
waits on an ``anyio.Event`` that the primitive sets when its state changes, and nondeterministic
draws take their "nothing unusual" value. The interleavings are whatever the event loop does.
"""

from __future__ import annotations

import contextvars
from typing import Any

import anyio
import anyio.lowlevel


class LiveTask:
    """What the primitives need to know about an anyio task: its name and what it holds."""

    __slots__ = ("held", "name", "srcu_reads", "tid")

    def __init__(self, tid: int, name: str) -> None:
        self.tid = tid
        self.name = name
        self.held: list[tuple[Any, Any, Any]] = []
        self.srcu_reads: list[tuple[Any, int, Any]] = []

    def __repr__(self) -> str:
        return f"<LiveTask {self.name}>"


# Child tasks inherit a copy of the parent's context, so the stored task id tells whether the
# LiveTask found there really belongs to the running task.
_task: contextvars.ContextVar[tuple[int, LiveTask]] = contextvars.ContextVar("asyncvm_live_task")


def current() -> LiveTask:
    info = anyio.get_current_task()
    found = _task.get(None)
    if found is not None and found[0] == info.id:
        return found[1]
    lt = LiveTask(info.id, info.name or f"task{info.id}")
    _task.set((info.id, lt))
    return lt


async def checkpoint() -> None:
    await anyio.lowlevel.checkpoint()


async def wait(obj: Any, arg: Any) -> None:
    await anyio.lowlevel.checkpoint()
    t = current()
    while not obj._ready(t, arg):
        event = obj._live_event
        if event is None:
            event = obj._live_event = anyio.Event()
        await event.wait()


def notify(obj: Any) -> None:
    event = obj._live_event
    if event is not None:
        obj._live_event = None
        event.set()
