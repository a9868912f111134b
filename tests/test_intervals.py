"""Tests for asyncvm.intervals.IntervalMap: unit behaviours plus a model-based property test."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from asyncvm.intervals import IntervalMap


def im(*items: tuple[int, int, str]) -> IntervalMap[str]:
    return IntervalMap.from_items(items)


# ----------------------------------------------------------------------
# unit tests


def test_empty_map() -> None:
    m: IntervalMap[str] = IntervalMap()
    assert len(m) == 0
    assert not m
    assert m.items() == []
    assert m.span() is None
    assert m.get(0) is None
    assert 0 not in m


def test_assign_single_range() -> None:
    m = im((2, 5, "a"))
    assert m.items() == [(2, 5, "a")]
    assert len(m) == 1
    assert m


def test_split_on_assign_inside_range() -> None:
    m = im((0, 10, "a"))
    m.assign(3, 6, "b")
    assert m.items() == [(0, 3, "a"), (3, 6, "b"), (6, 10, "a")]


def test_split_on_assign_straddling_ranges() -> None:
    m = im((0, 4, "a"), (4, 8, "b"), (8, 12, "c"))
    m.assign(2, 10, "x")
    assert m.items() == [(0, 2, "a"), (2, 10, "x"), (10, 12, "c")]


def test_assign_overwrites_exactly() -> None:
    m = im((0, 4, "a"))
    m.assign(0, 4, "b")
    assert m.items() == [(0, 4, "b")]


def test_coalescing_neighbours() -> None:
    m = im((0, 4, "a"), (8, 12, "a"))
    m.assign(4, 8, "a")
    assert m.items() == [(0, 12, "a")]


def test_coalescing_left_only() -> None:
    m = im((0, 4, "a"), (8, 12, "b"))
    m.assign(4, 8, "a")
    assert m.items() == [(0, 8, "a"), (8, 12, "b")]


def test_no_coalescing_across_gap() -> None:
    m = im((0, 4, "a"), (5, 8, "a"))
    assert m.items() == [(0, 4, "a"), (5, 8, "a")]


def test_coalescing_uses_equality() -> None:
    m: IntervalMap[tuple[int, int]] = IntervalMap()
    m.assign(0, 4, (1, 2))
    m.assign(4, 8, (1, 2))
    assert m.items() == [(0, 8, (1, 2))]


def test_assign_same_value_inside_is_noop() -> None:
    m = im((0, 10, "a"))
    m.assign(3, 6, "a")
    assert m.items() == [(0, 10, "a")]


def test_clear_in_the_middle_splits() -> None:
    m = im((0, 10, "a"))
    m.clear(3, 6)
    assert m.items() == [(0, 3, "a"), (6, 10, "a")]


def test_clear_across_ranges() -> None:
    m = im((0, 4, "a"), (4, 8, "b"), (10, 12, "c"))
    m.clear(2, 11)
    assert m.items() == [(0, 2, "a"), (11, 12, "c")]


def test_clear_gap_is_noop() -> None:
    m = im((0, 4, "a"), (8, 12, "b"))
    m.clear(4, 8)
    assert m.items() == [(0, 4, "a"), (8, 12, "b")]


def test_clear_all() -> None:
    m = im((0, 4, "a"), (8, 12, "b"))
    m.clear_all()
    assert m.items() == []


def test_point_lookup_at_boundaries() -> None:
    m = im((2, 5, "a"), (5, 7, "b"))
    assert m.get(1) is None
    assert m.get(2) == "a"
    assert m.get(4) == "a"
    assert m.get(5) == "b"
    assert m.get(6) == "b"
    assert m.get(7) is None
    assert m.get(7, "dflt") == "dflt"


def test_contains() -> None:
    m = im((2, 5, "a"))
    assert 2 in m
    assert 4 in m
    assert 5 not in m
    assert 1 not in m
    assert "x" not in m


def test_contains_with_none_value() -> None:
    m: IntervalMap[None] = IntervalMap()
    m.assign(0, 1, None)
    assert 0 in m
    assert m.get(0, 42) is None


def test_negative_coordinates() -> None:
    m = im((-10, -2, "a"))
    m.assign(-5, 3, "b")
    assert m.items() == [(-10, -5, "a"), (-5, 3, "b")]
    assert m.get(-6) == "a"


def test_overlaps_clipping() -> None:
    m = im((0, 4, "a"), (6, 10, "b"), (12, 20, "c"))
    assert m.overlaps(2, 14) == [(2, 4, "a"), (6, 10, "b"), (12, 14, "c")]


def test_overlaps_unclipped() -> None:
    m = im((0, 4, "a"), (6, 10, "b"), (12, 20, "c"))
    assert m.overlaps_unclipped(2, 14) == [(0, 4, "a"), (6, 10, "b"), (12, 20, "c")]


def test_overlaps_excludes_touching_ranges() -> None:
    m = im((0, 4, "a"), (4, 8, "b"), (8, 12, "c"))
    assert m.overlaps(4, 8) == [(4, 8, "b")]


def test_overlaps_result_is_a_snapshot() -> None:
    m = im((0, 4, "a"), (6, 10, "b"))
    for s, e, _ in m.overlaps(0, 10):
        m.clear(s, e)
    assert m.items() == []


def test_any_overlap_and_first_overlap() -> None:
    m = im((4, 8, "a"), (10, 12, "b"))
    assert not m.any_overlap(0, 4)
    assert m.any_overlap(0, 5)
    assert m.any_overlap(7, 9)
    assert not m.any_overlap(8, 10)
    assert m.first_overlap(8, 10) is None
    assert m.first_overlap(6, 11) == (6, 8, "a")
    assert m.first_overlap(9, 20) == (10, 12, "b")


def test_gaps() -> None:
    m = im((2, 4, "a"), (6, 8, "b"), (8, 9, "c"))
    assert m.gaps(0, 12) == [(0, 2), (4, 6), (9, 12)]
    assert m.gaps(2, 4) == []
    assert m.gaps(3, 7) == [(4, 6)]


def test_gaps_of_empty_map() -> None:
    m: IntervalMap[str] = IntervalMap()
    assert m.gaps(-3, 5) == [(-3, 5)]


def test_covered() -> None:
    m = im((2, 4, "a"), (6, 8, "b"))
    assert m.covered(0, 12) == 4
    assert m.covered(3, 7) == 2
    assert m.covered(4, 6) == 0


def test_update_applies_to_covered_pieces_only() -> None:
    m: IntervalMap[int] = IntervalMap.from_items([(0, 4, 1), (6, 10, 2)])
    m.update(2, 8, lambda v: v | 8)
    assert m.items() == [(0, 2, 1), (2, 4, 9), (6, 8, 10), (8, 10, 2)]


def test_update_coalesces() -> None:
    m: IntervalMap[int] = IntervalMap.from_items([(0, 4, 1), (4, 8, 2), (8, 12, 3)])
    m.update(0, 12, lambda v: 0)
    assert m.items() == [(0, 12, 0)]


def test_update_identity_keeps_canonical() -> None:
    m: IntervalMap[int] = IntervalMap.from_items([(0, 10, 1)])
    m.update(3, 6, lambda v: v)
    assert m.items() == [(0, 10, 1)]


def test_split_at_forces_boundary() -> None:
    m = im((0, 10, "a"))
    m.split_at(4)
    assert m.items() == [(0, 4, "a"), (4, 10, "a")]
    m.split_at(4)
    m.split_at(20)
    assert len(m) == 2


def test_split_at_does_not_affect_equality_and_normalize_undoes_it() -> None:
    m = im((0, 10, "a"))
    m.split_at(4)
    assert m == im((0, 10, "a"))
    m.normalize()
    assert m.items() == [(0, 10, "a")]


def test_mutator_covering_split_boundary_recoalesces() -> None:
    m = im((0, 10, "a"))
    m.split_at(4)
    m.assign(2, 6, "a")
    assert m.items() == [(0, 10, "a")]


@pytest.mark.parametrize("method", ["assign", "clear", "update"])
def test_empty_ranges_noop(method: str) -> None:
    m = im((0, 10, "a"))
    if method == "assign":
        m.assign(5, 5, "b")
    elif method == "clear":
        m.clear(5, 5)
    else:
        m.update(5, 5, lambda v: "b")
    assert m.items() == [(0, 10, "a")]


def test_empty_range_queries() -> None:
    m = im((0, 10, "a"))
    assert m.overlaps(5, 5) == []
    assert m.overlaps_unclipped(5, 5) == []
    assert m.gaps(5, 5) == []
    assert m.covered(5, 5) == 0
    assert not m.any_overlap(5, 5)
    assert m.first_overlap(5, 5) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.assign(5, 4, "b"),
        lambda m: m.clear(5, 4),
        lambda m: m.update(5, 4, lambda v: v),
        lambda m: m.overlaps(5, 4),
        lambda m: m.gaps(5, 4),
        lambda m: m.any_overlap(5, 4),
    ],
    ids=["assign", "clear", "update", "overlaps", "gaps", "any_overlap"],
)
def test_start_greater_than_end_raises_value_error(
    call: Callable[[IntervalMap[str]], Any],
) -> None:
    m = im((0, 10, "a"))
    with pytest.raises(ValueError, match="start > end"):
        call(m)
    assert m.items() == [(0, 10, "a")]


def test_non_integer_bounds_rejected() -> None:
    m: IntervalMap[str] = IntervalMap()
    with pytest.raises(TypeError):
        m.assign(0, 2.5, "a")  # type: ignore[arg-type]


def test_huge_ranges_cost_nothing() -> None:
    # Memory/time must scale with ranges, not with their length.
    m: IntervalMap[str] = IntervalMap()
    m.assign(0, 1 << 60, "a")
    m.assign(1 << 40, 1 << 50, "b")
    m.clear(1 << 45, 1 << 46)
    assert len(m) == 4
    assert m.covered(0, 1 << 60) == (1 << 60) - (1 << 45)


def test_span() -> None:
    m = im((3, 5, "a"), (9, 12, "b"))
    assert m.span() == (3, 12)


def test_iter_len_bool_repr() -> None:
    m = im((0, 2, "a"), (4, 6, "b"))
    assert list(m) == [(0, 2, "a"), (4, 6, "b")]
    assert len(m) == 2
    assert bool(m)
    assert repr(m) == "IntervalMap([(0, 2, 'a'), (4, 6, 'b')])"


def test_eq() -> None:
    assert im((0, 4, "a")) == im((0, 2, "a"), (2, 4, "a"))
    assert im((0, 4, "a")) != im((0, 4, "b"))
    assert im((0, 4, "a")) != im((0, 5, "a"))
    assert im((0, 4, "a")) != [(0, 4, "a")]


def test_copy_is_independent() -> None:
    m = im((0, 4, "a"))
    c = m.copy()
    c.assign(2, 6, "b")
    assert m.items() == [(0, 4, "a")]
    assert c.items() == [(0, 2, "a"), (2, 6, "b")]


def test_from_items_later_wins() -> None:
    m = im((0, 10, "a"), (5, 15, "b"))
    assert m.items() == [(0, 5, "a"), (5, 15, "b")]


# ----------------------------------------------------------------------
# model-based property test against a dict-per-unit reference

LO, HI = -4, 68  # op bounds; queries look slightly beyond them
UNIVERSE = range(LO - 2, HI + 2)
FIXED_QUERIES = [(LO - 2, HI + 2), (10, 20), (31, 33), (7, 7)]

points = st.integers(LO, HI)
values = st.integers(0, 2)  # few values so coalescing happens often


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    a, b = draw(points), draw(points)
    return (a, b) if a <= b else (b, a)


def ref_runs(ref: dict[int, int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values in the reference: the canonical form."""
    runs: list[tuple[int, int, int]] = []
    for p in sorted(ref):
        v = ref[p]
        if runs and runs[-1][1] == p and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], p + 1, v)
        else:
            runs.append((p, p + 1, v))
    return runs


def clip_runs(runs: list[tuple[int, int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    return [(max(s, start), min(e, end), v) for s, e, v in runs if max(s, start) < min(e, end)]


class IntervalMapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m: IntervalMap[int] = IntervalMap()
        self.ref: dict[int, int] = {}
        # split_at may leave stray boundaries until normalize().
        self.dirty = False

    @initialize(items=st.lists(st.tuples(ranges(), values), max_size=5))
    def init(self, items: list[tuple[tuple[int, int], int]]) -> None:
        self.m = IntervalMap.from_items((s, e, v) for (s, e), v in items)
        for (s, e), v in items:
            for p in range(s, e):
                self.ref[p] = v

    @rule(r=ranges(), v=values)
    def assign(self, r: tuple[int, int], v: int) -> None:
        self.m.assign(*r, v)
        for p in range(*r):
            self.ref[p] = v

    @rule(r=ranges())
    def clear(self, r: tuple[int, int]) -> None:
        self.m.clear(*r)
        for p in range(*r):
            self.ref.pop(p, None)

    @rule(r=ranges(), k=st.integers(0, 2))
    def update(self, r: tuple[int, int], k: int) -> None:
        def fn(v: int) -> int:
            return (v + k) % 3

        self.m.update(*r, fn)
        for p in range(*r):
            if p in self.ref:
                self.ref[p] = fn(self.ref[p])

    @rule()
    def clear_all(self) -> None:
        self.m.clear_all()
        self.ref.clear()

    @rule(p=points)
    def split_at(self, p: int) -> None:
        self.m.split_at(p)
        self.dirty = True

    @precondition(lambda self: self.dirty)
    @rule()
    def normalize(self) -> None:
        self.m.normalize()
        self.dirty = False

    @rule()
    def copy(self) -> None:
        c = self.m.copy()
        assert c == self.m
        assert c.items() == self.m.items()
        self.m = c

    @rule(r=st.tuples(st.integers(LO - 2, HI + 2), st.integers(LO - 2, HI + 2)))
    def query(self, r: tuple[int, int]) -> None:
        self.check_query(min(r), max(r))

    def check_query(self, start: int, end: int) -> None:
        runs = ref_runs(self.ref)
        self.check_query_with(runs, start, end)

    def check_query_with(self, runs: list[tuple[int, int, int]], start: int, end: int) -> None:
        covered_pts = [p for p in range(start, end) if p in self.ref]
        gap_pts = [p for p in range(start, end) if p not in self.ref]
        # Compare overlaps on a canonical basis: stray split_at boundaries
        # legitimately split pieces while the map is dirty.
        got = IntervalMap.from_items(self.m.overlaps(start, end))
        assert got.items() == clip_runs(runs, start, end)
        for s, e, _ in self.m.overlaps(start, end):
            assert start <= s < e <= end
        unclipped = self.m.overlaps_unclipped(start, end)
        assert all(s < end and e > start for s, e, _ in unclipped)
        assert sum(min(e, end) - max(s, start) for s, e, _ in unclipped) == len(covered_pts)
        gaps = self.m.gaps(start, end)
        assert [p for s, e in gaps for p in range(s, e)] == gap_pts
        assert all(gaps[i][1] < gaps[i + 1][0] for i in range(len(gaps) - 1))
        assert self.m.covered(start, end) == len(covered_pts)
        assert self.m.any_overlap(start, end) == bool(covered_pts)
        first = self.m.first_overlap(start, end)
        if covered_pts:
            assert first is not None
            assert first[0] == covered_pts[0]
            assert first[2] == self.ref[covered_pts[0]]
            assert all(self.ref.get(p) == first[2] for p in range(first[0], first[1]))
        else:
            assert first is None

    @invariant()
    def points_agree(self) -> None:
        for p in UNIVERSE:
            assert self.m.get(p, -1) == self.ref.get(p, -1)
            assert (p in self.m) == (p in self.ref)

    @invariant()
    def well_formed(self) -> None:
        items = self.m.items()
        assert len(self.m) == len(items)
        assert bool(self.m) == bool(self.ref)
        for s, e, _ in items:
            assert s < e
        for (_, e1, _), (s2, _, _) in itertools.pairwise(items):
            assert e1 <= s2
        if not self.dirty:
            # Canonical: exactly the reference's maximal runs.
            assert items == ref_runs(self.ref)
            for (_, e1, v1), (s2, _, v2) in itertools.pairwise(items):
                assert e1 < s2 or v1 != v2
        assert self.m == IntervalMap.from_items(ref_runs(self.ref))
        expected_span = (min(self.ref), max(self.ref) + 1) if self.ref else None
        assert self.m.span() == expected_span

    @invariant()
    def fixed_queries_agree(self) -> None:
        runs = ref_runs(self.ref)
        for start, end in FIXED_QUERIES:
            self.check_query_with(runs, start, end)


IntervalMapMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None)
TestIntervalMapMachine = IntervalMapMachine.TestCase
