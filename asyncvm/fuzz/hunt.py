"""Does `asyncvm fuzz` find each named bug without its scenario, and how soon?

For each bug, one fuzz campaign with the bug injected, under a time budget, on the VM type the
bug's own scenario uses (the one thing a user hunting it would know). A failure counts for the bug
only if its schedule does not fail the same way without the bug: fuzz programs can also reach
failures the correct model has (see the clean-model runs), and those prove nothing about the bug.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..bugs import BUGS
from ..explore.campaign import FoundFailure
from ..explore.driver import Campaign
from ..explore.engine import Program
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


def hunt_bug(bug: str, *, budget: float, seed: int = 0, profile: str = "6.18", jobs: int = 1) -> dict[str, Any]:
    """One bug: found or not, the runs and (estimated) seconds to the first failure it causes."""
    vm_type = vm_type_for(bug)
    spec = fuzz_spec(vm_type=vm_type, profile=profile, bugs=[bug], seed=seed, timed=True)
    t0 = time.perf_counter()
    with Campaign(spec, jobs=jobs, time_budget=budget) as campaign:
        report = campaign.run()
    elapsed = time.perf_counter() - t0
    own = sorted(
        (f for f in report.failures if not fails_without_bug(f, profile)),
        key=lambda f: f.first_run,
    )
    out: dict[str, Any] = {"vm_type": vm_type, "runs": report.runs, "seconds": round(elapsed, 1)}
    if own:
        first = own[0]
        runs_to = first.first_run - spec.first_run + 1
        out.update(
            found=True,
            signature=first.signature,
            runs_to_first=runs_to,
            # the campaign's own rate: executions are independent, so this is where it was reached
            seconds_to_first=round(elapsed * runs_to / max(1, report.runs), 2),
        )
    else:
        out["found"] = False
    out["not_the_bug"] = sorted({f.signature for f in report.failures} - {f.signature for f in own})
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
