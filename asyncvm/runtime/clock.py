"""Virtual time: sleeping advances a clock the executor owns, never the wall clock."""

from __future__ import annotations

from . import traps
from .sync import might_sleep


async def sleep(seconds: float) -> None:
    """Sleep `seconds` of virtual time; when no task is enabled the clock jumps to the next deadline."""
    if seconds < 0:
        raise ValueError("sleep() needs a non-negative duration")
    exe = traps.active()
    if exe is None:
        import anyio

        # msleep() is uninterruptible: a cancellation waits for the system call to return.
        with anyio.CancelScope(shield=True):
            await anyio.sleep(seconds)
        return
    might_sleep("msleep()")
    clock = exe.clock
    await traps.wait(clock, clock.now + seconds)


def now() -> float:
    """The virtual time of the running execution (live mode: the event loop's clock)."""
    exe = traps.active()
    if exe is None:
        import anyio

        return anyio.current_time()
    return exe.clock.now
