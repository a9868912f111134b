"""IntervalMap: a sorted map from half-open integer ranges [start, end) to values."""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Self, TypeVar

from sortedcontainers import SortedList

__all__ = ["IntervalMap"]

V = TypeVar("V")
T = TypeVar("T")

_MISSING = object()


def _check_range(start: int, end: int) -> tuple[int, int]:
    # operator.index rejects floats early: a gfn computed with "/" instead of
    # "//" would otherwise silently produce non-integer boundaries.
    start = operator.index(start)
    end = operator.index(end)
    if start > end:
        raise ValueError(f"invalid range [{start:#x}, {end:#x}): start > end")
    return start, end


class IntervalMap(Generic[V]):
    """Map half-open integer ranges [start, end) to values.

    Stored as a SortedDict ``start -> (end, value)`` of non-empty,
    non-overlapping ranges, so memory and time scale with the number of
    distinct ranges, never with their length.  Values are compared with
    ``==`` and must be treated as immutable.

    Canonical form: touching neighbours with equal values are coalesced.
    Every public mutator keeps the map canonical except :meth:`split_at`,
    which deliberately introduces a boundary; such a boundary disappears
    once a mutator covering it runs, or on :meth:`normalize`.

    Range queries return lists (snapshots), so callers may mutate the map
    while iterating the result.  ``start > end`` raises ``ValueError``
    everywhere; ``start == end`` is an empty range (no-op / no results).
    """

    __slots__ = ("_fast", "_map", "_starts")

    def __init__(self) -> None:
        # start -> (end, value): a plain dict, so reading a range is one C-level probe.
        self._map: dict[int, tuple[int, V]] = {}
        # The starts in order. Every operation costs O(log n) bisections on it plus a few dict
        # probes: the maps the model keeps are small (a handful of ranges) and touched on every
        # fault, so the work per call is kept to a constant number of calls into it.
        self._starts: SortedList = SortedList()
        # A plain list copy of the starts, rebuilt on the first lookup after a change: point
        # lookups (the fault path's hot operation) then cost one C bisect and one dict probe.
        self._fast: list[int] | None = None

    @classmethod
    def from_items(cls, items: Iterable[tuple[int, int, V]]) -> Self:
        """Build a map by assigning ``(start, end, value)`` items in order (later wins)."""
        m = cls()
        for start, end, value in items:
            m.assign(start, end, value)
        return m

    # ------------------------------------------------------------------
    # internal helpers

    def _first_index_ending_after(self, point: int) -> int:
        """Index of the first stored range with end > ``point`` (may be len)."""
        starts = self._starts
        idx: int = starts.bisect_right(point) - 1
        if idx >= 0 and self._map[starts[idx]][0] > point:
            return idx
        return idx + 1

    def _split(self, point: int) -> None:
        """Make ``point`` a range boundary if a stored range strictly contains it."""
        starts = self._starts
        idx: int = starts.bisect_right(point) - 1
        if idx < 0:
            return
        start = starts[idx]
        if start == point:
            return  # already a boundary
        end, value = self._map[start]
        if end > point:
            self._map[start] = (point, value)
            self._map[point] = (end, value)
            starts.add(point)

    def _coalesce_at(self, point: int) -> None:
        """Merge the range ending at ``point`` with the one starting there if equal."""
        m = self._map
        right = m.get(point)
        if right is None:
            return
        starts = self._starts
        idx: int = starts.bisect_left(point)
        if idx == 0:
            return
        left_start = starts[idx - 1]
        left_end, left_value = m[left_start]
        if left_end != point:
            return
        right_end, right_value = right
        if left_value == right_value:
            del m[point]
            starts.remove(point)
            m[left_start] = (right_end, left_value)

    def _delete_keys(self, keys: list[int]) -> None:
        m = self._map
        remove = self._starts.remove
        for key in keys:
            del m[key]
            remove(key)

    def _keys_in(self, start: int, end: int) -> list[int]:
        """Stored starts in [start, end), ascending (a snapshot)."""
        starts = self._starts
        return starts[starts.bisect_left(start) : starts.bisect_left(end)]

    # ------------------------------------------------------------------
    # mutators

    def assign(self, start: int, end: int, value: V) -> None:
        """Set [start, end) to ``value``, splitting and coalescing as needed.

        One pass over the ranges touching [start, end]: the left neighbour is merged (equal
        value) or cut at ``start``, everything starting inside is removed, and the last of those
        (or the range starting at ``end``) is merged or cut at ``end``. The result is what
        "split at both ends, replace, coalesce at ``end`` then at ``start``" gives, the merged
        range keeping the value object of its leftmost piece.
        """
        if type(start) is not int or type(end) is not int or start > end:
            start, end = _check_range(start, end)
        if start == end:
            return
        m = self._map
        starts = self._starts
        # Reads go to the plain-list copy of the starts (C bisect and indexing); the SortedList
        # and that copy then get the same few changes, so the copy stays valid for the lookups
        # that follow.
        fast = self._fast
        if fast is None:
            fast = self._fast = list(starts)
        lo = bisect_left(fast, start)
        hi = bisect_right(fast, end, lo)
        new_start, new_end, new_value = start, end, value
        tail: tuple[int, V] | None = None  # a remainder [end, e) of a range cut at `end`
        if lo:
            s = fast[lo - 1]
            e, v = m[s]
            if e >= start:
                if v == value:
                    new_start, new_value = s, v
                    lo -= 1
                    if e > end:
                        new_end = e
                elif e > start:
                    m[s] = (start, v)
                    if e > end:
                        # It covered [start, end) whole: nothing else starts inside.
                        m[start] = (end, value)
                        m[end] = (e, v)
                        starts.add(start)
                        starts.add(end)
                        fast[lo:lo] = (start, end)
                        return
        if hi > lo:
            s = fast[hi - 1]
            if s >= start:
                e, v = m[s]
                if s == end:
                    if value == v:
                        new_end = e
                    else:
                        hi -= 1  # touching, different: stays
                elif e > end:
                    if value == v:
                        new_end = e
                    else:
                        tail = (e, v)
        if hi - lo == 1 and fast[lo] == new_start:
            pass  # the one range replaced starts where the new one does
        else:
            remove = starts.remove
            for key in fast[lo:hi]:
                del m[key]
                remove(key)
            starts.add(new_start)
            fast[lo:hi] = (new_start,)
        m[new_start] = (new_end, new_value)
        if tail is not None:
            m[end] = tail
            starts.add(end)
            fast.insert(lo + 1, end)

    def clear(self, start: int, end: int) -> None:
        """Remove any values from [start, end), splitting ranges at the boundaries."""
        start, end = _check_range(start, end)
        if start == end:
            return
        self._fast = None
        self._split(start)
        self._split(end)
        # Removing can only create gaps, never new equal touching neighbours,
        # and the split pieces inside [start, end) are deleted, so no coalescing.
        self._delete_keys(self._keys_in(start, end))

    def clear_all(self) -> None:
        """Remove every range."""
        self._fast = None
        self._map.clear()
        self._starts.clear()

    def update(self, start: int, end: int, fn: Callable[[V], V]) -> None:
        """Replace each covered value ``v`` in [start, end) by ``fn(v)``.

        ``fn`` is called once per stored piece (clipped to [start, end)).
        Uncovered parts stay uncovered.
        """
        start, end = _check_range(start, end)
        if start == end:
            return
        self._fast = None
        self._split(start)
        self._split(end)
        m = self._map
        boundaries: list[int] = []
        for key in self._keys_in(start, end):
            piece_end, value = m[key]
            m[key] = (piece_end, fn(value))
            boundaries.append(key)
            boundaries.append(piece_end)
        # Each merge only removes the boundary it is called on, so checking
        # every boundary once (left to right) yields the canonical form.
        for point in boundaries:
            self._coalesce_at(point)

    def split_at(self, point: int) -> None:
        """Force a range boundary at ``point``.

        The only mutator that may leave the map non-canonical; normally not
        needed because assign/clear/update split themselves.
        """
        self._fast = None
        self._split(operator.index(point))

    def normalize(self) -> None:
        """Coalesce all equal touching neighbours (undo :meth:`split_at`); O(n)."""
        canonical = list(self._canonical_items())
        if len(canonical) != len(self._map):
            self._fast = None
            self._map = {s: (e, v) for s, e, v in canonical}
            self._starts = SortedList(self._map)

    # ------------------------------------------------------------------
    # point queries

    def get(self, point: int, default: T | None = None) -> V | T | None:
        """Value at ``point`` or ``default``; O(log n)."""
        starts = self._fast
        if starts is None:
            starts = self._fast = list(self._starts)
        i = bisect_right(starts, point) - 1
        if i >= 0:
            end, value = self._map[starts[i]]
            if point < end:
                return value
        return default

    def __contains__(self, point: object) -> bool:
        if not isinstance(point, int):
            return False
        return self.get(point, _MISSING) is not _MISSING

    # ------------------------------------------------------------------
    # range queries

    def overlaps_unclipped(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Stored ranges intersecting [start, end), as stored, ascending."""
        if type(start) is not int or type(end) is not int or start > end:
            start, end = _check_range(start, end)
        if start == end:
            return []
        starts = self._fast
        if starts is None:
            starts = self._fast = list(self._starts)
        m = self._map
        # The first range that can intersect starts at or before `start`; every later one that
        # starts before `end` intersects (ranges are sorted and disjoint).
        lo = bisect_right(starts, start) - 1
        if lo < 0 or m[starts[lo]][0] <= start:
            lo += 1
        hi = bisect_left(starts, end, lo)
        # A loop, not a comprehension: most queries find one or two ranges, and a comprehension
        # costs a function call of its own.
        out: list[tuple[int, int, V]] = []
        for s in starts[lo:hi]:
            e, v = m[s]
            out.append((s, e, v))
        return out

    def overlaps(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Stored ranges intersecting [start, end), clipped to it, ascending."""
        out = self.overlaps_unclipped(start, end)
        # Only the first range can start before `start`, and only the last end after `end`.
        if out:
            s, e, v = out[0]
            if s < start or e > end:
                out[0] = (max(s, start), min(e, end), v)
            if len(out) > 1:
                s, e, v = out[-1]
                if e > end:
                    out[-1] = (s, end, v)
        return out

    def any_overlap(self, start: int, end: int) -> bool:
        """Whether any stored range intersects [start, end); O(log n)."""
        return self.first_overlap(start, end) is not None

    def first_overlap(self, start: int, end: int) -> tuple[int, int, V] | None:
        """Lowest stored range intersecting [start, end), clipped; O(log n)."""
        start, end = _check_range(start, end)
        if start == end:
            return None
        idx = self._first_index_ending_after(start)
        if idx >= len(self._map):
            return None
        s = self._starts[idx]
        e, v = self._map[s]
        if s >= end:
            return None
        return max(s, start), min(e, end), v

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Uncovered [s, e) sub-ranges of [start, end), ascending."""
        out: list[tuple[int, int]] = []
        cursor = start
        for s, e, _ in self.overlaps(start, end):
            if s > cursor:
                out.append((cursor, s))
            cursor = e
        if cursor < end:
            out.append((cursor, end))
        return out

    def covered(self, start: int, end: int) -> int:
        """Total covered length within [start, end)."""
        return sum(e - s for s, e, _ in self.overlaps(start, end))

    def span(self) -> tuple[int, int] | None:
        """(lowest start, highest end) over all ranges, or None if empty."""
        if not self._map:
            return None
        return self._starts[0], self._map[self._starts[-1]][0]

    # ------------------------------------------------------------------
    # whole-map operations

    def items(self) -> list[tuple[int, int, V]]:
        """All stored ranges as ``(start, end, value)``, ascending."""
        m = self._map
        return [(s, *m[s]) for s in self._starts]

    def _canonical_items(self) -> Iterator[tuple[int, int, V]]:
        # Coalesce on the fly so equality ignores split_at boundaries.
        pending: tuple[int, int, V] | None = None
        m = self._map
        for s in self._starts:
            e, v = m[s]
            if pending is not None and pending[1] == s and pending[2] == v:
                pending = (pending[0], e, v)
                continue
            if pending is not None:
                yield pending
            pending = (s, e, v)
        if pending is not None:
            yield pending

    def copy(self) -> Self:
        """Shallow copy (values are shared; they are treated as immutable)."""
        new = type(self)()
        new._map = dict(self._map)
        new._starts = self._starts.copy()
        return new

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        return iter(self.items())

    def __len__(self) -> int:
        """Number of stored ranges (not covered length)."""
        return len(self._map)

    def __bool__(self) -> bool:
        return bool(self._map)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IntervalMap):
            return NotImplemented
        return list(self._canonical_items()) == list(other._canonical_items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items()!r})"
