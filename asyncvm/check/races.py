"""A happens-before data-race detector (KCSAN's rule, vector clocks as ThreadSanitizer keeps them).

The runtime tells it every synchronization (``runtime/hb.py``): lock acquire and release (a read
acquire of an rwlock or rwsem orders only after write releases, so two readers stay unordered),
SRCU read sections against grace periods, completions, wait queues, try-locks, atomic cells, and
task spawn and join. The model announces its accesses to the words the kernel shares locklessly
or under different locks, each with its kind (plain, READ_ONCE/WRITE_ONCE, acquire/release,
atomic). Two accesses to one word by different tasks conflict when at least one writes; a
conflict that happens-before does not order is a data race when at least one side is plain,
which is what KCSAN reports. Marked accesses never race with each other (the kernel marks the
accesses it means to race), so a correct model is silent and one executed schedule shows a race
that would need a specific interleaving to break an invariant.

A ``Word`` and ``spin_wait`` are deliberately not synchronization here: a Word's version counts
writes of many unrelated fields so that a spinner knows when to re-check, and ordering a spinner
after every such write would invent orderings the kernel does not have (and hide races).

Vector clocks are lists indexed by task id; a task's own entry advances at every release, so an
access is identified by (task, epoch) and is ordered before another task's access exactly when
that task's clock has reached the epoch (FastTrack's test). Each word keeps, per task and per
(write, plain) class, that task's latest access, which is enough for the rule above.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ..runtime import hb
from ..runtime.failures import Violation
from ..runtime.sites import Site, fmt_site
from ..runtime.sync import READ, WRITE

_WRITES = hb.WRITES
_PLAIN = hb.PLAIN
#: the release slots an acquire in each mode joins (any other mode joins every slot of the object)
_JOINS: dict[Any, tuple[Any, ...]] = {
    READ: (WRITE, None),
    hb.SRCU_READ: (hb.SRCU_SYNC,),
    hb.SRCU_SYNC: (hb.SRCU_READ,),
}
_ACQUIRES = frozenset((hb.LOAD_ACQUIRE, hb.ATOMIC_RMW))
_RELEASES = frozenset((hb.STORE_RELEASE, hb.ATOMIC_RMW))


def _join(into: list[int], other: list[int]) -> None:
    if len(into) < len(other):
        into.extend([0] * (len(other) - len(into)))
    for i, v in enumerate(other):
        if v > into[i]:
            into[i] = v


def _where(site: Site) -> str:
    """file:function of a site: stable across schedules and edits of unrelated lines."""
    if site is None:
        return "?"
    code = site[0]
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"


def describe_word(word: tuple[Hashable, ...]) -> str:
    """``spte(root1, 1, 0x10)``: the word's class and its key, readable."""
    parts = []
    for x in word[1:]:
        name = getattr(x, "name", None)
        parts.append(str(name) if name is not None else hex(x) if isinstance(x, int) else str(x))
    return f"{word[0]}({', '.join(parts)})" if parts else str(word[0])


class RaceDetector:
    """The happens-before observer of one execution (``runtime.hb.Observer``)."""

    def __init__(self) -> None:
        #: task id -> its vector clock
        self.clocks: dict[int, list[int]] = {}
        self.names: dict[int, str] = {}
        #: synchronization object -> release slot (mode) -> the join of the clocks released there
        self.released: dict[Any, dict[Any, list[int]]] = {}
        #: word -> (task id, writes, plain) -> (epoch, kind, site) of that task's latest such access
        self.words: dict[Hashable, dict[tuple[int, bool, bool], tuple[int, int, Site]]] = {}
        #: word -> the join of the clocks released into it by store-release and atomic RMW
        self.word_released: dict[Hashable, list[int]] = {}
        self.accesses = 0

    def _clock(self, task: Any) -> list[int]:
        vc = self.clocks.get(task.tid)
        if vc is None:
            vc = self.clocks[task.tid] = [0] * task.tid + [1]
            self.names[task.tid] = task.name
        return vc

    # -- synchronization --------------------------------------------------------------------
    def spawn(self, parent: Any, child: Any) -> None:
        vc = [0] * child.tid + [1]
        if parent is not None:
            pvc = self._clock(parent)
            _join(vc, pvc)
            vc[child.tid] = 1
            pvc[parent.tid] += 1
        self.clocks[child.tid] = vc
        self.names[child.tid] = child.name

    def join(self, task: Any, children: list[Any]) -> None:
        vc = self._clock(task)
        for child in children:
            _join(vc, self._clock(child))

    def acquire(self, task: Any, obj: object, mode: Any) -> None:
        slots = self.released.get(obj)
        if not slots:
            return
        vc = self._clock(task)
        wanted = _JOINS.get(mode)
        for slot, released in slots.items():
            if wanted is None or slot in wanted:
                _join(vc, released)

    def release(self, task: Any, obj: object, mode: Any) -> None:
        vc = self._clock(task)
        slots = self.released.setdefault(obj, {})
        into = slots.get(mode)
        if into is None:
            slots[mode] = list(vc)
        else:
            _join(into, vc)
        vc[task.tid] += 1

    # -- accesses ---------------------------------------------------------------------------
    def access(self, task: Any, word: Hashable, kind: int, site: Site) -> None:
        if task is None:
            return
        self.accesses += 1
        vc = self._clock(task)
        if kind in _ACQUIRES:
            released = self.word_released.get(word)
            if released is not None:
                _join(vc, released)
        seen = self.words.get(word)
        if seen is None:
            seen = self.words[word] = {}
        if kind == hb.PLAIN_RMW:
            # ``x++``: a plain load, then an aligned word store that KCSAN's default
            # (CONFIG_KCSAN_ASSUME_PLAIN_WRITES_ATOMIC) does not count as plain. So a lockless
            # READ_ONCE() of a counter its writers update under a lock is no race, but two
            # updates that nothing orders are (the load of one against the store of the other).
            self._check(seen, word, task.tid, vc, False, True, kind, site)
            self._check(seen, word, task.tid, vc, True, False, kind, site)
        else:
            self._check(seen, word, task.tid, vc, kind in _WRITES, kind in _PLAIN, kind, site)
        if kind in _RELEASES:
            into = self.word_released.get(word)
            if into is None:
                self.word_released[word] = list(vc)
            else:
                _join(into, vc)
            vc[task.tid] += 1

    def _check(
        self,
        seen: dict[tuple[int, bool, bool], tuple[int, int, Site]],
        word: Hashable,
        tid: int,
        vc: list[int],
        writes: bool,
        plain: bool,
        kind: int,
        site: Site,
    ) -> None:
        """Report the first earlier access of another task this one races with, then record it."""
        n = len(vc)
        for (u, u_writes, u_plain), (epoch, u_kind, u_site) in seen.items():
            if u == tid or not (writes or u_writes) or not (plain or u_plain):
                continue
            if u < n and epoch <= vc[u]:
                continue  # that access happens before this one
            self._report(word, (u, u_kind, u_site), (tid, kind, site))
        seen[(tid, writes, plain)] = (vc[tid], kind, site)

    def _report(self, word: Hashable, first: tuple[int, int, Site], second: tuple[int, int, Site]) -> None:
        key = word if isinstance(word, tuple) else (word,)
        what = describe_word(key)
        (u, u_kind, u_site), (t, kind, site) = first, second
        sites = sorted((_where(u_site), _where(site)))
        raise Violation(
            "data_race",
            f"data race on {what}: {self.names.get(t, t)} {hb.KIND_NAMES[kind]} at {fmt_site(site)} and "
            f"{self.names.get(u, u)} {hb.KIND_NAMES[u_kind]} at {fmt_site(u_site)}, not ordered by "
            f"happens-before (at least one of them plain)",
            signature=f"data_race:{key[0]}:{sites[0]}|{sites[1]}",
            word=what,
            accesses=[
                {"task": self.names.get(u, u), "kind": hb.KIND_NAMES[u_kind], "site": fmt_site(u_site)},
                {"task": self.names.get(t, t), "kind": hb.KIND_NAMES[kind], "site": fmt_site(site)},
            ],
        )
