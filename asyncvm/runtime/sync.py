"""Modeled kernel synchronization: locks, SRCU, completions, wait queues, try-locks and atomics.

Every operation here is a scheduling point, and every lock knows whether it is a sleeping lock
(may be held across a sleep: Mutex, RWSem, SRCU read side) or a spinning one (SpinLock, RWLock,
TryLock). The runtime's own oracles live at these call sites: lockdep sees every acquisition,
``might_sleep`` sees every operation that can sleep, and releases check their owner.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

from . import hb, traps
from .failures import Violation
from .sites import caller_site, fmt_site
from .traps import _get_exe

T = TypeVar("T")

READ = "read"
WRITE = "write"


def _lockdep() -> Any:
    exe = _get_exe()
    return exe.lockdep if exe is not None else None


def might_sleep(what: str = "might_sleep()") -> None:
    """Complain like CONFIG_DEBUG_ATOMIC_SLEEP if the running task holds a spinning lock."""
    t = traps.current()
    if t is None:
        return
    for lock, _mode, site in t.held:
        if not lock.sleeping:
            raise Violation(
                "atomic_sleep",
                f"BUG: sleeping function called from invalid context: {what} while holding "
                f"{lock.name} (taken at {fmt_site(site)})",
                signature=f"atomic_sleep:{lock.lock_class}",
                lock=lock.name,
                site=fmt_site(site),
            )


class _Waitable:
    """Shared plumbing for anything a task can block on (see ``traps.wait``)."""

    __slots__ = ("_live_event", "_waiters", "name")
    sleeping = True
    #: whether acquisitions enter the lockdep graph (try-locks never wait, so they do not)
    lockdep_tracked = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._waiters: list[Any] = []
        self._live_event: Any = None

    def _ready(self, task: Any, arg: Any) -> bool:
        raise NotImplementedError

    def _holders(self) -> list[Any]:
        return []

    def describe(self, arg: Any) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class _Lock(_Waitable):
    """A lock lockdep knows about: `lock_class` groups instances as the kernel's lock classes do."""

    __slots__ = ("lock_class",)

    def __init__(self, name: str, lock_class: str | None = None) -> None:
        super().__init__(name)
        self.lock_class = lock_class or name

    @types.coroutine
    def _acquire(self, mode: Any, op: str) -> Generator[Any, None, None]:
        # Every lock operation of the model passes here: the checks that cost something run
        # only when they can matter (something is held, someone waits, events are recorded).
        # A generator-based coroutine that yields the wait request itself, and the public
        # methods return it without a frame of their own: each scheduling step resumes the
        # whole await chain of the task, so every level less is paid on every step.
        exe = _get_exe()
        t: Any = exe.current if exe is not None else traps.current()
        if mode is WRITE and not self._ready(t, WRITE):
            # A writer that has to wait takes the slow path: it blocks new readers (_RW only).
            self._slow_writers.add(t)  # type: ignore[attr-defined]
        if self.sleeping and t.held:
            for held, _mode, _site in t.held:
                if not held.sleeping:
                    might_sleep(f"{op}({self.name})")
        site = caller_site()
        if exe is not None:
            ld = exe.lockdep
            if ld is not None and (t.held or t.srcu_reads):
                ld.check_acquire(t, self, site)
            if not (len(exe.enabled) == 1 and self._ready(t, mode) and exe.alone()):
                yield (self, mode)
                # Resumed: the task stops waiting before anything else can re-evaluate it.
                self._waiters.remove(t)
        else:
            yield from traps.wait(self, mode)
        self._take(t, mode)
        t.held.append((self, mode, site))
        if exe is None or self._waiters:  # live mode keeps no waiter list: always wake
            traps.notify(self)
        if exe is not None and exe.observed:
            exe.sync_event("lock_acquire", self, mode)

    @types.coroutine
    def _release(self, mode: Any) -> Generator[Any, None, None]:
        exe = _get_exe()
        t: Any = exe.current if exe is not None else traps.current()
        held = t.held
        if held and held[-1][0] is self and held[-1][1] == mode:
            del held[-1]  # the common case: released in the order taken
        else:
            self._unhold(t, mode)
        self._drop(t, mode)
        if exe is None or self._waiters:  # live mode keeps no waiter list: always wake
            traps.notify(self)
        if exe is not None:
            if exe.observed:
                exe.sync_event("lock_release", self, mode)
            if len(exe.enabled) != 1 or not exe.alone():
                yield self
        else:
            yield from traps.point(self).__await__()

    def _unhold(self, t: Any, mode: Any) -> None:
        held = t.held
        for i in range(len(held) - 1, -1, -1):
            entry = held[i]
            if entry[0] is self and entry[1] == mode:
                del held[i]
                break
        else:
            raise Violation(
                "bad_unlock",
                f"{t.name} releases {self.name} ({mode}) which it does not hold",
                signature=f"bad_unlock:{self.lock_class}",
                lock=self.name,
            )

    def _take(self, t: Any, mode: Any) -> None:
        raise NotImplementedError

    def _drop(self, t: Any, mode: Any) -> None:
        raise NotImplementedError


class Mutex(_Lock):
    """A sleeping mutex (``struct mutex``): kvm->lock, vcpu->mutex, slots_lock."""

    __slots__ = ("owner",)
    sleeping = True

    def __init__(self, name: str, lock_class: str | None = None) -> None:
        # _Waitable.__init__ and _Lock.__init__ inlined: every folio gets a lock.
        self.name = name
        self._waiters: list[Any] = []
        self._live_event: Any = None
        self.lock_class = lock_class or name
        self.owner: Any = None

    def _ready(self, task: Any, arg: Any) -> bool:
        return self.owner is None

    def _holders(self) -> list[Any]:
        return [self.owner] if self.owner is not None else []

    def describe(self, arg: Any) -> str:
        return f"{type(self).__name__.lower()} {self.name}"

    def _take(self, t: Any, mode: Any) -> None:
        self.owner = t

    def _drop(self, t: Any, mode: Any) -> None:
        self.owner = None

    def is_locked(self) -> bool:
        return self.owner is not None

    def held_by_current(self) -> bool:
        return self.owner is traps.current()

    def lock(self) -> Awaitable[None]:
        """mutex_lock()"""
        return self._acquire(None, "mutex_lock")

    def unlock(self) -> Awaitable[None]:
        """mutex_unlock(); only the owner may unlock."""
        return self._release(None)

    def __aenter__(self) -> Awaitable[None]:
        return self._acquire(None, "lock")

    def __aexit__(self, *exc: object) -> Awaitable[None]:
        return self._release(None)


class SpinLock(Mutex):
    """A spinning lock (``spinlock_t``): nothing may sleep while it is held."""

    __slots__ = ()
    sleeping = False


class _RW(_Lock):
    """Shared readers, one exclusive writer; a writer that had to wait blocks new readers."""

    __slots__ = ("_slow_writers", "readers", "writer")

    def __init__(self, name: str, lock_class: str | None = None) -> None:
        super().__init__(name, lock_class)
        self.writer: Any = None
        self.readers: dict[Any, int] = {}
        self._slow_writers: set[Any] = set()

    def _ready(self, task: Any, mode: Any) -> bool:
        if self.writer is not None:
            return False
        if mode is WRITE:
            return not self.readers
        return not self._slow_writers

    def _holders(self) -> list[Any]:
        return [self.writer] if self.writer is not None else list(self.readers)

    def describe(self, mode: Any) -> str:
        return f"{self.name} ({mode})"

    def _take(self, t: Any, mode: Any) -> None:
        if mode is WRITE:
            self.writer = t
            self._slow_writers.discard(t)
        else:
            self.readers[t] = self.readers.get(t, 0) + 1
        # Writers still pending now have to wait: they take the slow path and block new readers.
        for w in self._waiters:
            if w.pending[1] is WRITE:
                self._slow_writers.add(w)

    def _drop(self, t: Any, mode: Any) -> None:
        if mode is WRITE:
            self.writer = None
        else:
            n = self.readers[t] - 1
            if n:
                self.readers[t] = n
            else:
                del self.readers[t]

    def is_write_locked(self) -> bool:
        return self.writer is not None

    def held_by_current(self, mode: str | None = None) -> bool:
        t = traps.current()
        if mode is WRITE:
            return self.writer is t
        if mode is READ:
            return t in self.readers
        return self.writer is t or t in self.readers


class RWLock(_RW):
    """``rwlock_t`` as x86 ``mmu_lock`` uses it (qrwlock): spinning, a waiting writer blocks new readers."""

    __slots__ = ()
    sleeping = False

    def read_lock(self) -> Awaitable[None]:
        """read_lock()"""
        return self._acquire(READ, "read_lock")

    def read_unlock(self) -> Awaitable[None]:
        """read_unlock()"""
        return self._release(READ)

    def write_lock(self) -> Awaitable[None]:
        """write_lock()"""
        return self._acquire(WRITE, "write_lock")

    def write_unlock(self) -> Awaitable[None]:
        """write_unlock()"""
        return self._release(WRITE)

    def read(self) -> _Guard:
        return _Guard(self.read_lock, self.read_unlock)

    def write(self) -> _Guard:
        return _Guard(self.write_lock, self.write_unlock)


class RWSem(_RW):
    """``struct rw_semaphore`` (filemap invalidate_lock, mmap_lock): sleeping, writer preference."""

    __slots__ = ()
    sleeping = True

    def down_read(self) -> Awaitable[None]:
        """down_read()"""
        return self._acquire(READ, "down_read")

    def up_read(self) -> Awaitable[None]:
        """up_read()"""
        return self._release(READ)

    def down_write(self) -> Awaitable[None]:
        """down_write()"""
        return self._acquire(WRITE, "down_write")

    def up_write(self) -> Awaitable[None]:
        """up_write()"""
        return self._release(WRITE)

    def read(self) -> _Guard:
        return _Guard(self.down_read, self.up_read)

    def write(self) -> _Guard:
        return _Guard(self.down_write, self.up_write)


class _Guard:
    """``async with lock.read():`` / ``async with lock.write():``"""

    __slots__ = ("_enter", "_exit")

    def __init__(self, enter: Callable[[], Awaitable[None]], exit: Callable[[], Awaitable[None]]) -> None:
        self._enter = enter
        self._exit = exit

    def __aenter__(self) -> Awaitable[None]:
        return self._enter()

    def __aexit__(self, *exc: object) -> Awaitable[None]:
        return self._exit()


class SRCU(_Waitable):
    """Sleepable RCU (``struct srcu_struct``, e.g. kvm->srcu).

    Readers never block. ``synchronize()`` waits only for the read sections that began before it
    was called; sections that begin later do not delay it.
    """

    __slots__ = ("_active", "_next", "lock_class")
    sleeping = True

    def __init__(self, name: str, lock_class: str | None = None) -> None:
        super().__init__(name)
        self.lock_class = lock_class or name
        self._next = 0
        self._active: dict[int, Any] = {}

    def _ready(self, task: Any, target: int) -> bool:
        return not self._active or min(self._active) >= target

    def _holders(self) -> list[Any]:
        return list(self._active.values())

    def describe(self, target: Any) -> str:
        return f"synchronize_srcu({self.name}) for readers before #{target}"

    def readers(self) -> int:
        return len(self._active)

    def read_held_by_current(self) -> bool:
        t = traps.current()
        return any(s is self for s, _i, _site in t.srcu_reads)

    @types.coroutine
    def read_lock(self) -> Generator[Any, None, int]:
        """srcu_read_lock(): returns the index to pass to read_unlock."""
        t = traps.current()
        site = caller_site()
        exe = _get_exe()
        if exe is not None:
            if len(exe.enabled) != 1 or not exe.alone():
                yield self
        else:
            yield from traps.point(self).__await__()
        idx = self._next
        self._next = idx + 1
        self._active[idx] = t
        t.srcu_reads.append((self, idx, site))
        if exe is not None and exe.observed:
            exe.sync_event("lock_acquire", self, hb.SRCU_READ)
        return idx

    @types.coroutine
    def read_unlock(self, idx: int) -> Generator[Any, None, None]:
        """srcu_read_unlock()"""
        t: Any = traps.current()
        reads = t.srcu_reads
        if self._active.get(idx) is not t:
            raise Violation(
                "bad_unlock",
                f"{t.name} ends SRCU read section #{idx} of {self.name} it does not own",
                signature=f"bad_unlock:{self.lock_class}",
                lock=self.name,
            )
        del self._active[idx]
        reads[:] = [e for e in reads if not (e[0] is self and e[1] == idx)]
        traps.notify(self)
        exe = _get_exe()
        if exe is not None:
            if exe.observed:
                exe.sync_event("lock_release", self, hb.SRCU_READ)
            if len(exe.enabled) != 1 or not exe.alone():
                yield self
        else:
            yield from traps.point(self).__await__()

    async def synchronize(self) -> None:
        """synchronize_srcu(): wait for every read section that started before this call."""
        t = traps.current()
        might_sleep(f"synchronize_srcu({self.name})")
        for s, _idx, site in t.srcu_reads:
            if s is self:
                raise Violation(
                    "srcu_deadlock",
                    f"synchronize_srcu({self.name}) inside its own read section (entered at {fmt_site(site)})",
                    signature=f"srcu_deadlock:{self.lock_class}",
                    lock=self.name,
                )
        ld = _lockdep()
        if ld is not None:
            ld.check_acquire(t, self, caller_site())
        await traps.wait(self, self._next)
        # The read sections it waited for happen before it returns; it happens before the
        # read sections that start after it (the grace-period guarantee).
        if hb.ACTIVE:
            hb.acquire(self, hb.SRCU_SYNC)
            hb.release(self, hb.SRCU_SYNC)


class Completion(_Waitable):
    """``struct completion``: wait_for_completion() blocks until complete() or complete_all()."""

    __slots__ = ("done",)
    ALL = 1 << 62

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.done = 0

    def _ready(self, task: Any, arg: Any) -> bool:
        return self.done > 0

    def describe(self, arg: Any) -> str:
        return f"completion {self.name}"

    async def wait(self) -> None:
        """wait_for_completion()"""
        might_sleep(f"wait_for_completion({self.name})")
        await traps.wait(self, None)
        if hb.ACTIVE:
            hb.acquire(self)
        if self.done != self.ALL:
            self.done -= 1
        traps.notify(self)

    async def wait_shared(self) -> None:
        """Wait without consuming: for completions used as "this has happened" flags."""
        might_sleep(f"wait_for_completion({self.name})")
        await traps.wait(self, None)
        if hb.ACTIVE:
            hb.acquire(self)

    async def complete(self) -> None:
        """complete(): wake one waiter (or let the next wait pass)."""
        if hb.ACTIVE:
            hb.release(self)
        if self.done != self.ALL:
            self.done += 1
        traps.notify(self)
        await traps.point(self)

    async def complete_all(self) -> None:
        """complete_all(): every current and future waiter passes."""
        if hb.ACTIVE:
            hb.release(self)
        self.done = self.ALL
        traps.notify(self)
        await traps.point(self)


class WaitQueue(_Waitable):
    """``wait_queue_head_t``: wait_event(wq, cond) sleeps until cond() holds after a wake_up()."""

    __slots__ = ()

    def _ready(self, task: Any, cond: Callable[[], bool]) -> bool:
        return bool(cond())

    def describe(self, arg: Any) -> str:
        return f"wait_event on {self.name}"

    async def wait_event(self, cond: Callable[[], bool]) -> None:
        """wait_event()"""
        might_sleep(f"wait_event({self.name})")
        await traps.wait(self, cond)
        if hb.ACTIVE:
            hb.acquire(self)

    async def wake_up(self) -> None:
        """wake_up(): waiters re-evaluate their conditions."""
        if hb.ACTIVE:
            hb.release(self)
        traps.notify(self)
        await traps.point(self)


class Word(_Waitable):
    """Shared memory a spin-retry loop re-reads: a version that every write of it bumps.

    A task that retries after seeing a transient state (an invalidation in progress, a FROZEN
    SPTE, a BUSY SEAMCALL, a kicked vCPU) would re-check the same state until some other task
    changes it; every re-check in between is a stuttering step that explores nothing. Instead it
    notes ``version`` when it reads and, if the retry is needed, waits in :func:`spin_wait`
    until a write. The enabled set stays exact while another task can still write; once none
    can, the executor lets the spinners re-check on their own (their loop may still end, e.g. on
    a signal), and one that never ends is the livelock the step bound reports.
    """

    __slots__ = ("version",)
    #: tasks blocked on a Word spin: when nothing else can run they re-check (not a deadlock)
    spin = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.version = 0

    def _ready(self, task: Any, seen: int) -> bool:
        return self.version != seen

    def describe(self, seen: Any) -> str:
        return f"a write to {self.name}"

    def write(self) -> None:
        """Something a spinner may be waiting for changed."""
        self.version += 1
        if self._waiters or _get_exe() is None:
            traps.notify(self)


async def spin_wait(word: Word, seen: int) -> None:
    """The retry of a spin loop whose last attempt read `word` at version `seen`: it goes on at
    once if `word` was written since, else waits for the write (on hardware the spinner re-reads
    meanwhile while another CPU makes progress). It may also return unwritten, when no other
    task is left to write: the caller's loop re-checks, as it would spinning."""
    if word.version == seen:
        await traps.wait(word, seen)
        if word.version == seen:
            # Returned unwritten: nobody else could run (Executor._unstick). Note the loop.
            exe = _get_exe()
            if exe is not None and exe.current is not None:
                exe.spin_sites[exe.current] = caller_site()


class TryLock(_Waitable):
    """A lock that never blocks: contention is reported as BUSY (the TDX module's internal locks).

    With ``external=True`` the lock may also be held by an agent the model does not run (a guest
    TDCALL, another logical CPU): each attempt on a free lock draws whether that agent holds it.
    """

    __slots__ = ("count", "external", "lock_class", "mode", "owner")
    sleeping = False
    lockdep_tracked = False

    def __init__(self, name: str, *, external: bool = False, busy_p: float = 0.05) -> None:
        super().__init__(name)
        self.lock_class = name
        self.owner: Any = None
        self.mode: Any = None
        self.count = 0
        self.external = busy_p if external else 0.0

    def _ready(self, task: Any, arg: Any) -> bool:
        return True

    def _holders(self) -> list[Any]:
        return [self.owner] if self.owner is not None else []

    async def try_lock(self, mode: str = WRITE) -> bool:
        """Take the lock (shared or exclusive) or return False at once if it is contended."""
        t = traps.current()
        await traps.point(self)
        if self.count and (mode is WRITE or self.mode is WRITE):
            return False
        if self.external and traps.draw(f"busy:{self.name}", self.external):
            return False
        self.count += 1
        self.mode = mode
        self.owner = t
        t.held.append((self, mode, None))
        if hb.ACTIVE:
            hb.acquire(self, mode)
        return True

    async def unlock(self) -> None:
        t = traps.current()
        for i in range(len(t.held) - 1, -1, -1):
            if t.held[i][0] is self:
                del t.held[i]
                break
        else:
            raise Violation(
                "bad_unlock",
                f"{t.name} releases {self.name} which it does not hold",
                signature=f"bad_unlock:{self.name}",
                lock=self.name,
            )
        if hb.ACTIVE:
            hb.release(self, self.mode)
        self.count -= 1
        if not self.count:
            self.owner = None
            self.mode = None
        await traps.point(self)


class Atomic(_Waitable, Generic[T]):
    """An atomic cell; each operation is one indivisible step after a scheduling point."""

    __slots__ = ("value",)

    def __init__(self, value: T, name: str = "atomic") -> None:
        super().__init__(name)
        self.value = value

    def _ready(self, task: Any, arg: Any) -> bool:
        return True

    async def load(self) -> T:
        await traps.point(self)
        if hb.ACTIVE:
            hb.acquire(self)
        return self.value

    async def store(self, value: T) -> None:
        await traps.point(self)
        if hb.ACTIVE:
            hb.release(self)
        self.value = value

    async def cmpxchg(self, old: T, new: T) -> T:
        """Store `new` if the cell holds `old`; return what it held (success iff that == old)."""
        await traps.point(self)
        if hb.ACTIVE:
            hb.acquire(self)
            hb.release(self)
        cur = self.value
        if cur == old:
            self.value = new
        return cur

    async def xchg(self, new: T) -> T:
        await traps.point(self)
        if hb.ACTIVE:
            hb.acquire(self)
            hb.release(self)
        cur = self.value
        self.value = new
        return cur

    async def fetch_add(self, delta: Any) -> T:
        await traps.point(self)
        if hb.ACTIVE:
            hb.acquire(self)
            hb.release(self)
        cur = self.value
        self.value = cur + delta
        return cur


@types.coroutine
def cond_resched() -> Generator[Any, None, None]:
    """cond_resched() (kernel/sched/core.c: __cond_resched()): reschedule only when need_resched()
    is set, which is a recorded draw; illegal while a spinning lock is held either way."""
    exe = _get_exe()
    if exe is None:
        might_sleep("cond_resched()")
        return  # live mode: need_resched() is never set
    t = exe.current
    if t is not None and t.held:
        might_sleep("cond_resched()")
    # Alone, a reschedule would pick this task again: need_resched() is not even drawn.
    if len(exe.enabled) > 1 and exe.draw("need_resched", 2, 0.25):
        yield traps.YIELDING


async def spin_yield() -> None:
    """Let the others run before a task spins again on something another task must change (an
    invalidation to end, a FROZEN SPTE to settle, a kicked vCPU to leave the guest).

    On hardware the other task runs on another CPU meanwhile; under a controlled scheduler the
    spinner has to yield for it, or a priority-based strategy would starve it forever.
    """
    await traps.yield_now()


# The draws below are traps.draw() inlined: they run on every fault attempt and ioctl, and live
# mode (no executor) always draws 0, "nothing unusual".


def need_resched() -> bool:
    """need_resched(): drawn through the strategy, so a yield-or-not decision replays."""
    exe = _get_exe()
    return exe is not None and exe.draw("need_resched", 2, 0.25) != 0


def signal_pending() -> bool:
    """signal_pending(current): a signal arriving now is a recorded, replayable choice; in live
    mode, a cancellation of the calling task (see ``live``)."""
    exe = _get_exe()
    if exe is None:
        return _live_signal()
    if not exe.draw("signal", 2, 0.02):
        return False
    if exe._stuck_rounds:
        exe.stuck_signal(caller_site())
    return True


def fatal_signal_pending() -> bool:
    """fatal_signal_pending(current): as signal_pending(), for SIGKILL (in live mode, a
    cancellation of the calling task: it unwinds the call as a fatal signal would)."""
    exe = _get_exe()
    if exe is None:
        return _live_signal()
    if not exe.draw("fatal_signal", 2, 0.0):
        return False
    if exe._stuck_rounds:
        exe.stuck_signal(caller_site())
    return True


def _live_signal() -> bool:
    from . import live

    return live.cancel_pending()


def alloc_fails(what: str = "alloc") -> bool:
    """Whether this allocation fails (-ENOMEM); off unless a campaign gives it a probability."""
    exe = _get_exe()
    return exe is not None and exe.draw("alloc_fail", 2, 0.0) != 0
