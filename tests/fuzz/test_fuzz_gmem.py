"""`asyncvm fuzz --vm-type gmem`: a default VM on an MMAP|INIT_SHARED guest_memfd the VMM maps,
with the VMM's loads and stores through that mapping among the calls (issue 18)."""

from __future__ import annotations

import itertools
import random

import asyncvm
from asyncvm.fuzz.generate import generate
from asyncvm.fuzz.scenario import fuzz


def test_gmem_programs_map_the_guest_memfd_and_touch_it() -> None:
    seen: set[str] = set()
    for seed in range(40):
        counter = itertools.count(seed)

        def draw(kind: str, n: int, p: float, counter: itertools.count[int] = counter) -> int:
            return next(counter) % n

        program = generate(draw, vm_type="gmem")
        text = program.source()
        assert "flags=MMAP_SHARED" in text and "fd=g0, shared=True" in text
        seen |= {c.split("(")[0] for actor in program.actors for c in actor}
    assert {"host_write", "host_read", "punch_hole"} <= seen


def test_the_correct_model_is_clean_under_gmem_fuzz() -> None:
    report = asyncvm.explore(fuzz, params={"vm_type": "gmem"}, runs=400, seed=3, strategy="pct")
    assert report.ok, report.summary()


def _called(convertible: bool) -> set[str]:
    seen: set[str] = set()
    for seed in range(60):
        rng = random.Random(seed)

        def draw(kind: str, n: int, p: float, rng: random.Random = rng) -> int:
            return rng.randrange(n)

        program = generate(draw, vm_type="gmem", convertible=convertible)
        seen |= {c.split("(")[0] for actor in program.actors for c in actor}
    return seen


def test_in_place_conversions_are_drawn_only_under_the_design_that_has_them() -> None:
    assert "convert" in _called(convertible=True)
    assert "convert" not in _called(convertible=False)


def test_the_in_place_conversion_design_is_clean_under_gmem_fuzz() -> None:
    report = asyncvm.explore(
        fuzz, params={"vm_type": "gmem"}, runs=300, seed=5, strategy="pct", profile="gmem-inplace-conversion"
    )
    assert report.ok, report.summary()
