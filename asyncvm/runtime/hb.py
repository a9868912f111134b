"""Happens-before hooks: where the runtime tells an observer (a data-race detector) about every
synchronization, and where the model announces its accesses to shared words.

The runtime knows nothing of what a word is: the model names it (a hashable key whose first
element is the word's class, e.g. ``("spte", root, level, gfn)``) and says how it touches it.
The synchronization side is generic too: locks, SRCU, completions, wait queues, atomics, spawn
and join call the observer the executor was given, and nothing when it has none (one attribute
test on paths that already test whether events are recorded).

Access kinds follow the kernel's memory model (tools/memory-model, KCSAN):

* ``PLAIN_READ`` / ``PLAIN_WRITE``: a C access with no marking; KCSAN reports it when it races.
* ``READ_ONCE`` / ``WRITE_ONCE``: marked, no ordering.
* ``LOAD_ACQUIRE`` / ``STORE_RELEASE``: marked; an acquire that reads a release orders them.
* ``ATOMIC_RMW``: a value-returning atomic (cmpxchg, xchg, atomic_inc_return): marked, fully ordered.
* ``PLAIN_RMW``: ``x++`` and friends, a plain read and a plain write.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from . import traps
from .sites import caller_site

#: SRCU's two sides, as the observer sees them: a read section ends (release) and a grace period
#: waits for it (acquire); a grace period ends (release) and a later read section starts (acquire)
SRCU_READ = "srcu_read"
SRCU_SYNC = "srcu_sync"

PLAIN_READ = 0
PLAIN_WRITE = 1
PLAIN_RMW = 2
READ_ONCE = 3
WRITE_ONCE = 4
LOAD_ACQUIRE = 5
STORE_RELEASE = 6
ATOMIC_RMW = 7

KIND_NAMES = (
    "plain read",
    "plain write",
    "plain read-modify-write",
    "READ_ONCE",
    "WRITE_ONCE",
    "load-acquire",
    "store-release",
    "atomic read-modify-write",
)
#: kinds that write the word
WRITES = frozenset((PLAIN_WRITE, PLAIN_RMW, WRITE_ONCE, STORE_RELEASE, ATOMIC_RMW))
#: kinds KCSAN calls plain (unmarked)
PLAIN = frozenset((PLAIN_READ, PLAIN_WRITE, PLAIN_RMW))


class Observer(Protocol):
    """What the runtime calls; ``check.races.RaceDetector`` implements it."""

    def acquire(self, task: Any, obj: object, mode: Any) -> None:
        """`task` took `obj` (a lock in `mode`, a completion, an SRCU grace period...)."""

    def release(self, task: Any, obj: object, mode: Any) -> None:
        """`task` released `obj`: what it did so far happens before the next acquire of it."""

    def spawn(self, parent: Any, child: Any) -> None: ...

    def join(self, task: Any, children: list[Any]) -> None: ...

    def access(self, task: Any, word: Hashable, kind: int, site: Any) -> None: ...


#: executions with an observer running in this process (Executor.run counts them). Model code
#: tests it before announcing an access, ``if hb.ACTIVE: hb.access(...)``, so an announcement
#: costs one module attribute test when no detector runs anywhere.
ACTIVE = 0


def access(kind: int, *word: Hashable) -> None:
    """The running task touches `word` (a key whose first element names the word's class) as
    `kind` says; a no-op unless the execution has an observer."""
    if not ACTIVE:
        return
    exe = traps.active()
    if exe is not None:
        observer = exe.hb
        if observer is not None:
            observer.access(exe.current, word, kind, caller_site())


def enabled() -> bool:
    """Whether an observer listens: guards announcements that loop over a range."""
    if not ACTIVE:
        return False
    exe = traps.active()
    return exe is not None and exe.hb is not None


def acquire(obj: object, mode: Any = None) -> None:
    """The running task synchronizes with the releases of `obj` (SRCU, completions, atomics...)."""
    if not ACTIVE:
        return
    exe = traps.active()
    if exe is not None and exe.hb is not None:
        exe.hb.acquire(exe.current, obj, mode)


def release(obj: object, mode: Any = None) -> None:
    """What the running task did so far happens before the next acquire of `obj`."""
    if not ACTIVE:
        return
    exe = traps.active()
    if exe is not None and exe.hb is not None:
        exe.hb.release(exe.current, obj, mode)
