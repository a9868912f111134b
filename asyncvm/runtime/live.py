"""Live mode: the same primitives on anyio, so model code runs inside an asyncio or trio program.

No strategy decides anything here. A scheduling point is an anyio checkpoint, a blocked task
waits on an ``anyio.Event`` that the primitive sets when its state changes, and nondeterministic
draws take their "nothing unusual" value. The interleavings are whatever the event loop does.

Cancellation is a signal. The kernel never unwinds a system call at an arbitrary instruction: a
task sees a signal only where the code checks ``signal_pending()`` or ``fatal_signal_pending()``,
and the signal is handled on the way back to user mode, after the call has put its result (and
any partial progress) in place. So here every scheduling point and every wait is shielded from
cancellation; ``signal_pending()`` answers "yes" once the caller's cancel scope is cancelled (the
model then returns -EINTR as the kernel does, releasing what it holds on the way out); and the
cancellation itself is delivered when the outermost system call (``traps.syscall``) returns.
The one wait that a cancellation ends early is a spin-retry wait (``spin_wait``): on hardware
the loop re-checks all the time, and its own signal check is what lets it leave.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

R = TypeVar("R")


class LiveTask:
    """What the primitives need to know about an anyio task: its name and what it holds."""

    __slots__ = ("dead", "held", "name", "srcu_reads", "syscalls", "tid")

    def __init__(self, tid: int, name: str) -> None:
        self.tid = tid
        self.name = name
        self.held: list[tuple[Any, Any, Any]] = []
        self.srcu_reads: list[tuple[Any, int, Any]] = []
        #: system calls in progress (nested ones deliver nothing: only the outermost returns to user)
        self.syscalls = 0
        #: it left a system call by an exception with locks held (a model bug or an oracle's
        #: failure): what it holds is never released, so waiting for it need not be shielded
        self.dead = False

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
    # Other tasks may run here, but a cancellation waits for the system call to return.
    await anyio.lowlevel.cancel_shielded_checkpoint()


async def wait(obj: Any, arg: Any) -> None:
    t = current()
    if getattr(obj, "spin", False):
        await _spin(obj, arg, t)
        return
    # Lock and completion waits are uninterruptible (mutex_lock, down_write, wait_for_completion):
    # nothing is held half-way, so nothing can be left half-done.
    await anyio.lowlevel.cancel_shielded_checkpoint()
    if obj._ready(t, arg):
        return
    with anyio.CancelScope(shield=True):
        while not obj._ready(t, arg):
            if _abandoned(obj):
                break
            await _event(obj).wait()
        else:
            return
    # Held by a task that died holding it: a shielded wait would hang the program, so this one
    # waits unshielded and the caller's cancellation (its task group failing) may end it.
    while not obj._ready(t, arg):
        await _event(obj).wait()


def _event(obj: Any) -> anyio.Event:
    """The event the next notify(obj) sets (one per state change, made by the first waiter)."""
    event: anyio.Event | None = obj._live_event
    if event is None:
        event = obj._live_event = anyio.Event()
    return event


def _abandoned(obj: Any) -> bool:
    holders = obj._holders()
    return bool(holders) and all(getattr(h, "dead", False) for h in holders)


async def _spin(obj: Any, arg: Any, t: LiveTask) -> None:
    """A spin-retry loop waiting for a write: a cancellation ends the wait (not the loop), so the
    loop's own signal check sees it; a loop without one re-checks and waits again."""
    await checkpoint()
    if obj._ready(t, arg) or cancel_pending():
        return
    try:
        await _event(obj).wait()
    except anyio.get_cancelled_exc_class():
        # Cancellation is level-triggered on both backends: it is raised again at the first
        # unshielded checkpoint, which is where the system call delivers it.
        return


def notify(obj: Any) -> None:
    event = obj._live_event
    if event is not None:
        obj._live_event = None
        event.set()


def cancel_pending() -> bool:
    """Whether the running task's cancel scopes are cancelled or past their deadline: in live
    mode that is a signal pending for it (``signal_pending()``, ``fatal_signal_pending()``)."""
    try:
        deadline = anyio.current_effective_deadline()
    except RuntimeError:  # not inside an event loop: nothing can cancel it
        return False
    return deadline == -math.inf or (deadline != math.inf and deadline <= anyio.current_time())


async def syscall(coro: Coroutine[Any, Any, R]) -> R:
    """Run a system call's coroutine; on its return to user mode deliver a pending cancellation
    (``traps.syscall`` wraps the entry points with it in live mode)."""
    t = current()
    t.syscalls += 1
    try:
        return await coro
    except BaseException:
        if t.syscalls == 1 and (t.held or t.srcu_reads):
            # The outermost call is over and still holds locks: the model failed half-way (an
            # oracle's Violation, a bug). Wake whoever waits for them (see wait()).
            t.dead = True
            for entry in (*t.held, *t.srcu_reads):
                notify(entry[0])
        raise
    finally:
        t.syscalls -= 1
        if not t.syscalls:
            # The return to user mode: a pending cancellation replaces the call's own outcome.
            if cancel_pending():
                # A deadline that has passed becomes a cancellation only when the event loop
                # runs: a call that met the signal before any scheduling point (KVM_RUN's
                # fatal_signal_pending()) must yield once here, or an EINTR retry loop spins.
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.lowlevel.checkpoint_if_cancelled()
