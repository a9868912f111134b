"""The scheduling points: the only functions that ever yield back to the executor.

Model code never yields by itself. It awaits a primitive, and every primitive ends in one of the
two traps below:

* ``point(obj)``: a scheduling point. The task stays enabled; the strategy may run other tasks
  before it continues. `obj` names what the task is about to touch (a lock being released, an
  atomic cell) so that strategies such as POS can tell which pending operations conflict; pass
  ``None`` when the point touches nothing in particular.
* ``wait(obj, arg)``: block until ``obj._ready(task, arg)`` is true. The executor keeps the
  enabled set exact: the task is enabled exactly while the predicate holds, it is re-evaluated
  whenever the primitive calls ``notify(obj)``, and when the task resumes the predicate is
  still true, so the primitive can take the lock (or consume the event) without re-checking.
  A blocked task that the strategy never picks is simply not enabled; "nothing enabled, some task
  unfinished" is a deadlock.

Both traps are also the places where live mode (anyio, for embedding) takes over: when no
controlled execution is active they turn into an anyio checkpoint and an anyio wait loop, so the
same model code runs under asyncio or trio.

Waitable objects implement ``_ready(task, arg) -> bool``, keep a ``_waiters`` list the executor
owns, and describe themselves for deadlock reports with ``_holders()`` and ``describe(arg)``.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

if TYPE_CHECKING:
    from .executor import Executor, Task


class Waitable(Protocol):
    """Anything a task can block on."""

    name: str
    _waiters: list[Task]

    def _ready(self, task: Any, arg: Any) -> bool: ...
    def _holders(self) -> list[Any]: ...
    def describe(self, arg: Any) -> str: ...


#: The controlled execution running in this context, or None (live mode). Set only by Executor.run.
#: Context-local, not process-global: an execution in a worker thread (``anyio.to_thread``, Dask's
#: threaded workers) and live model code in the event loop's thread never see each other, and two
#: threads can run executions side by side. Each thread starts with its own empty context.
_current_exe: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("asyncvm_executor", default=None)

#: The one lookup every trap makes: the bound ``get`` is a single C call (about 8 ns more than the
#: module global it replaced), and the executor's own loop never calls it.
_get_exe = _current_exe.get


def __getattr__(name: str) -> Executor | None:
    # `traps._exe` was a module global; code that still reads it gets this context's executor.
    if name == "_exe":
        return _get_exe()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Yielding:
    """The request of a task that yields voluntarily (cond_resched() in a retry loop)."""

    name = "cond_resched"

    def __repr__(self) -> str:
        return "YIELDING"


#: Strategies treat a yielding task fairly: on real hardware the task it waits for runs on
#: another CPU meanwhile, so a spin-retry loop must not starve it under a priority scheduler.
YIELDING = _Yielding()


@types.coroutine
def _yield(request: Any) -> Generator[Any, None, None]:
    yield request


class _Passed:
    """The awaitable of a scheduling point passed without yielding (Executor.alone())."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


_PASSED = _Passed()


def point(obj: object | None = None) -> Awaitable[None]:
    """A scheduling point before touching `obj`; other tasks may run first."""
    exe = _get_exe()
    if exe is not None:
        return _PASSED if len(exe.enabled) == 1 and exe.alone() else _yield(obj)
    from . import live

    return live.checkpoint()


@types.coroutine
def wait(obj: Waitable, arg: Any = None) -> Generator[Any, None, None]:
    """Block until ``obj._ready(task, arg)``; on return it holds and nothing else has run since."""
    exe = _get_exe()
    if exe is not None:
        if len(exe.enabled) == 1 and obj._ready(exe.current, arg) and exe.alone():
            return
        yield (obj, arg)
        # Resumed: the task stops waiting before anything else can re-evaluate it.
        obj._waiters.remove(exe.current)  # type: ignore[arg-type]
    else:
        from . import live

        yield from live.wait(obj, arg).__await__()


@types.coroutine
def yield_point() -> Generator[Any, None, None]:
    """An explicit scheduling point with no object attached (the cheapest trap)."""
    exe = _get_exe()
    if exe is not None:
        if len(exe.enabled) != 1 or not exe.alone():
            yield None
    else:
        from . import live

        yield from live.checkpoint().__await__()


def yield_now() -> Awaitable[None]:
    """A voluntary yield: the strategy should let the other tasks run first."""
    exe = _get_exe()
    if exe is not None:
        return _PASSED if len(exe.enabled) == 1 and exe.alone() else _yield(YIELDING)
    from . import live

    return live.checkpoint()


def notify(obj: Waitable) -> None:
    """`obj` changed state: re-evaluate every task waiting on it."""
    exe = _get_exe()
    if exe is not None:
        exe.recheck(obj)
    else:
        from . import live

        live.notify(obj)


def current() -> Any:
    """The running task (a controlled Task, or the live-mode stand-in for the anyio task)."""
    exe = _get_exe()
    if exe is not None:
        return exe.current
    from . import live

    return live.current()


def draw(kind: str, p: float = 0.5, n: int = 2) -> int:
    """Draw nondeterministic data (0..n-1) through the strategy; recorded like a task choice.

    For a yes/no draw (n == 2), `p` is the probability of 1 under randomized strategies; bounded
    DFS explores both values. Live mode always draws 0: nothing unusual happens.
    """
    exe = _get_exe()
    if exe is not None:
        return exe.draw(kind, n, p)
    return 0


def emit(kind: str, obj: object | None = None, **fields: Any) -> None:
    """Record a model event (SPTE change, folio state, oracle verdict) in the execution trace."""
    exe = _get_exe()
    if exe is not None and exe.trace is not None:
        exe.emit(kind, obj, fields)


def tracing() -> bool:
    """Whether events are being recorded: guard event arguments that cost something to build."""
    exe = _get_exe()
    return exe is not None and exe.trace is not None


def active() -> Executor | None:
    """The controlled execution running now in this context (thread), if any."""
    return _get_exe()


P = ParamSpec("P")
R = TypeVar("R")


def syscall(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Mark a system call's entry point (an ioctl, fallocate, munmap): where live mode delivers
    a cancellation of the caller, as a signal is handled on the way back to user mode.

    The caller then sees the cancellation, not the -EINTR the call returned for it, and whatever
    the call recorded (partial progress in its struct) stays; see ``live``. Under a controlled
    execution the call is the bare coroutine: no frame is added to the await chain that every
    scheduling step resumes.
    """

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        coro = fn(*args, **kwargs)
        if _get_exe() is not None:
            return coro
        from . import live

        return live.syscall(coro)

    return call
