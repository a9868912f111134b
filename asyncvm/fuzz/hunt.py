"""Does `asyncvm fuzz` find each named bug without its scenario, and how soon?

For each bug, one fuzz campaign with the bug injected, on the VM type the bug's own scenario uses
(the one thing a user hunting it would know), until the bug's first failure or the end of a time
budget. A failure counts for the bug only if its schedule does not fail the same way without the
bug: fuzz programs can also reach failures the correct model has (see the clean-model runs), and
those prove nothing about the bug.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..bugs import BUGS
from ..explore.campaign import FoundFailure, Report
from ..explore.driver import Campaign
from ..explore.engine import Program
from ..explore.schedule import Schedule
from ..runtime.failures import ToolError
from .run import fuzz_spec
from .scenario import fuzz

#: bug -> the VM type its scenario builds (by the scenario's name; the rest use SW-protected)
VM_TYPE_PREFIXES = (
    ("tdx", "tdx"),
    ("snp", "snp"),
    ("prefault_vs_munmap", "default"),
    ("fault_vs_zap_all", "default"),
    ("gmem_mmap_coco", "tdx"),
    ("gmem_", "gmem"),
)


def vm_type_for(bug: str) -> str:
    scenario = BUGS[bug].scenario
    for prefix, vm_type in VM_TYPE_PREFIXES:
        if scenario.startswith(prefix):
            return vm_type
    return "sw"


def fails_without_bug(found: FoundFailure, profile: str) -> bool:
    """Whether the failing schedule fails the same way on the correct model (replayed leniently:
    without the bug the stream may fit differently)."""
    program = Program(fuzz, dict(found.schedule.params), profile, ())
    try:
        result = program.rerun(found.schedule.choices, strict=False)
    except ToolError:
        return False
    return result.failure is not None and result.failure.signature == found.signature


class _Found(Exception):
    """Raised from the campaign's progress hook once the bug's own failure is in: it stops the hunt."""


def hunt_bug(bug: str, *, budget: float, seed: int = 0, profile: str = "6.18", jobs: int = 1) -> dict[str, Any]:
    """One bug: found or not, the runs and seconds to the first failure it causes.

    The campaign stops as soon as the merge finds a failure that is the bug's own (one whose schedule
    does not fail that way without the bug), at the end of the chunk holding it; `budget` bounds a
    hunt that finds nothing. `seconds_to_first` is measured: the time from the start (the chunk
    sizing's calibration included) to the merge of that chunk, so it overstates by at most the rest
    of that chunk. `runs` counts every execution merged (the whole chunk), `seconds` the whole hunt.
    """
    vm_type = vm_type_for(bug)
    spec = fuzz_spec(vm_type=vm_type, profile=profile, bugs=[bug], seed=seed, timed=True)
    own: dict[str, float] = {}  # the bug's own signatures -> seconds from t0 to their discovery
    judged: dict[str, Schedule] = {}  # each signature's witness, as judged at discovery

    def on_failure(found: FoundFailure) -> None:
        judged[found.signature] = found.schedule
        if not fails_without_bug(found, profile):
            own[found.signature] = time.perf_counter() - t0

    def progress(_report: Report, _runs: int) -> None:
        if own:
            raise _Found

    t0 = time.perf_counter()
    with Campaign(spec, jobs=jobs, time_budget=budget) as campaign:
        try:
            report = campaign.run(on_failure=on_failure, progress=progress)
        except _Found:
            assert campaign.report is not None  # run() sets it before the first chunk
            report = campaign.report  # every chunk merged so far, runs counted in full
    elapsed = time.perf_counter() - t0
    # A signature whose representative became a smaller witness later is judged again on it.
    for f in report.failures:
        if f.signature not in own and f.schedule is not judged.get(f.signature) and not fails_without_bug(f, profile):
            own[f.signature] = elapsed
    mine = sorted((f for f in report.failures if f.signature in own), key=lambda f: f.first_run)
    out: dict[str, Any] = {"vm_type": vm_type, "runs": report.runs, "seconds": round(elapsed, 1)}
    if mine:
        first = mine[0]
        out.update(
            found=True,
            signature=first.signature,
            runs_to_first=first.first_run - spec.first_run + 1,
            seconds_to_first=round(own[first.signature], 2),
        )
    else:
        out["found"] = False
    out["not_the_bug"] = sorted({f.signature for f in report.failures} - own.keys())
    return out


def hunt_bugs(
    budget: float,
    *,
    bugs: list[str] | None = None,
    seed: int = 0,
    profile: str | None = None,
    jobs: int = 1,
    tick: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Hunt each named bug with fuzz alone; `profile` None: the profile each bug is a mistake against."""
    names = bugs or list(BUGS)
    results: dict[str, Any] = {}
    for i, name in enumerate(names):
        if tick is not None:
            tick(i, len(names), name)
        results[name] = hunt_bug(name, budget=budget, seed=seed, profile=profile or BUGS[name].profile, jobs=jobs)
    if tick is not None:
        tick(len(names), len(names), "")
    return {
        "budget_seconds_per_bug": budget,
        "found": sum(1 for r in results.values() if r["found"]),
        "bugs": len(names),
        "per_bug": results,
    }
