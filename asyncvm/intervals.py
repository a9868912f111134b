"""IntervalMap: a sorted map from half-open integer ranges [start, end) to values."""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Self, TypeVar

from sortedcontainers import SortedDict

__all__ = ["IntervalMap"]

V = TypeVar("V")
T = TypeVar("T")


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

    __slots__ = ("_fast", "_keys", "_map")

    def __init__(self) -> None:
        self._map = SortedDict()
        # Live view; indexing it is O(log n), unlike list(self._map).
        self._keys = self._map.keys()
        # A plain sorted list of the starts, rebuilt on the first lookup after a change: point
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

    def _entry(self, key: int) -> tuple[int, V]:
        entry: tuple[int, V] = self._map[key]
        return entry

    def _at(self, idx: int) -> tuple[int, int, V]:
        start: int = self._keys[idx]
        end, value = self._entry(start)
        return start, end, value

    def _containing_index(self, point: int) -> int:
        """Index of the stored range containing ``point``, or -1."""
        idx: int = self._map.bisect_right(point) - 1
        if idx >= 0 and self._at(idx)[1] > point:
            return idx
        return -1

    def _first_index_ending_after(self, point: int) -> int:
        """Index of the first stored range with end > ``point`` (may be len)."""
        idx: int = self._map.bisect_right(point) - 1
        if idx >= 0 and self._at(idx)[1] > point:
            return idx
        return idx + 1

    def _split(self, point: int) -> None:
        idx = self._containing_index(point)
        if idx < 0:
            return
        start, end, value = self._at(idx)
        if start == point:
            return  # already a boundary
        self._map[start] = (point, value)
        self._map[point] = (end, value)

    def _coalesce_at(self, point: int) -> None:
        """Merge the range ending at ``point`` with the one starting there if equal."""
        if point not in self._map:
            return
        idx: int = self._map.index(point)
        if idx == 0:
            return
        left_start, left_end, left_value = self._at(idx - 1)
        if left_end != point:
            return
        right_end, right_value = self._entry(point)
        if left_value == right_value:
            del self._map[point]
            self._map[left_start] = (right_end, left_value)

    def _delete_keys_in(self, start: int, end: int) -> None:
        # Materialise first: deleting while iterating irange is unsafe.
        for key in list(self._map.irange(start, end, inclusive=(True, False))):
            del self._map[key]

    # ------------------------------------------------------------------
    # mutators

    def assign(self, start: int, end: int, value: V) -> None:
        """Set [start, end) to ``value``, splitting and coalescing as needed."""
        self._fast = None
        start, end = _check_range(start, end)
        if start == end:
            return
        self._split(start)
        self._split(end)
        self._delete_keys_in(start, end)
        self._map[start] = (end, value)
        self._coalesce_at(end)
        self._coalesce_at(start)

    def clear(self, start: int, end: int) -> None:
        """Remove any values from [start, end), splitting ranges at the boundaries."""
        self._fast = None
        start, end = _check_range(start, end)
        if start == end:
            return
        self._split(start)
        self._split(end)
        # Removing can only create gaps, never new equal touching neighbours,
        # and the split pieces inside [start, end) are deleted, so no coalescing.
        self._delete_keys_in(start, end)

    def clear_all(self) -> None:
        """Remove every range."""
        self._fast = None
        self._map.clear()

    def update(self, start: int, end: int, fn: Callable[[V], V]) -> None:
        self._fast = None
        """Replace each covered value ``v`` in [start, end) by ``fn(v)``.

        ``fn`` is called once per stored piece (clipped to [start, end)).
        Uncovered parts stay uncovered.
        """
        start, end = _check_range(start, end)
        if start == end:
            return
        self._split(start)
        self._split(end)
        boundaries: list[int] = []
        for key in list(self._map.irange(start, end, inclusive=(True, False))):
            piece_end, value = self._entry(key)
            self._map[key] = (piece_end, fn(value))
            boundaries.append(key)
            boundaries.append(piece_end)
        # Each merge only removes the boundary it is called on, so checking
        # every boundary once (left to right) yields the canonical form.
        for point in boundaries:
            self._coalesce_at(point)

    def split_at(self, point: int) -> None:
        self._fast = None
        """Force a range boundary at ``point``.

        The only mutator that may leave the map non-canonical; normally not
        needed because assign/clear/update split themselves.
        """
        self._split(operator.index(point))

    def normalize(self) -> None:
        """Coalesce all equal touching neighbours (undo :meth:`split_at`); O(n)."""
        self._fast = None
        canonical = list(self._canonical_items())
        if len(canonical) != len(self._map):
            self._map.clear()
            self._map.update((s, (e, v)) for s, e, v in canonical)

    # ------------------------------------------------------------------
    # point queries

    def get(self, point: int, default: T | None = None) -> V | T | None:
        """Value at ``point`` or ``default``; O(log n)."""
        starts = self._fast
        if starts is None:
            starts = self._fast = list(self._map)
        i = bisect_right(starts, point) - 1
        if i >= 0:
            end, value = dict.__getitem__(self._map, starts[i])
            if point < end:
                return value
        return default

    def __contains__(self, point: object) -> bool:
        if not isinstance(point, int):
            return False
        return self._containing_index(point) >= 0

    # ------------------------------------------------------------------
    # range queries

    def overlaps_unclipped(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Stored ranges intersecting [start, end), as stored, ascending."""
        start, end = _check_range(start, end)
        out: list[tuple[int, int, V]] = []
        if start == end:
            return out
        idx = self._first_index_ending_after(start)
        if idx >= len(self._map):
            return out
        lo: int = self._keys[idx]
        # Keys in [lo, end) are exactly the intersecting ranges: idx is the
        # first range ending after start and ranges are sorted/disjoint.
        for key in self._map.irange(lo, end, inclusive=(True, False)):
            range_end, value = self._entry(key)
            out.append((key, range_end, value))
        return out

    def overlaps(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """Stored ranges intersecting [start, end), clipped to it, ascending."""
        return [(max(s, start), min(e, end), v) for s, e, v in self.overlaps_unclipped(start, end)]

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
        s, e, v = self._at(idx)
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
        return self._at(0)[0], self._at(-1)[1]

    # ------------------------------------------------------------------
    # whole-map operations

    def items(self) -> list[tuple[int, int, V]]:
        """All stored ranges as ``(start, end, value)``, ascending."""
        return [(s, e, v) for s, (e, v) in self._map.items()]

    def _canonical_items(self) -> Iterator[tuple[int, int, V]]:
        # Coalesce on the fly so equality ignores split_at boundaries.
        pending: tuple[int, int, V] | None = None
        for s, (e, v) in self._map.items():
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
        new._map.update(self._map)
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
