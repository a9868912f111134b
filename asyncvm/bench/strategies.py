"""The strategy comparison: runs to each named bug's first failure under random, PCT, POS and the
feedback-directed strategy, median over seeds (issue 14).

Every (bug, strategy, seed) is one campaign of the bug's scenario with the bug injected (its
profile, the race detector when the bug needs it), run in order from execution 0 in this process
until the first failing execution; its index + 1 is the runs to first failure. A try that finds
nothing within `max_runs` runs counts as infinitely many. Caps keep the bench short: `max_runs`
runs per try, and each (bug, strategy) stops trying once it spent `seconds` (the tries made are
reported). ``asyncvm bench --only strategy_comparison --strategy-runs N`` asks for a bigger budget.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from ..bugs import BUGS
from ..explore.campaign import CampaignSpec
from ..explore.engine import build_strategy
from ..explore.scenarios import load_bundled
from . import Tick

#: the strategies compared, in table order
COMPARED = ("random", "pct", "pos", "feedback")

#: runs per try and seconds per (bug, strategy) of a default bench; --strategy-runs raises the runs
#: (and the seconds in proportion)
MAX_RUNS = 100
SECONDS = 1.5
#: the environment variable `asyncvm bench --strategy-runs N` sets (bench functions take no options)
RUNS_VARIABLE = "ASYNCVM_BENCH_STRATEGY_RUNS"


def runs_to_first_failure(bug: str, strategy: str, seed: int, max_runs: int, deadline: float) -> int | None:
    """Executions until the first failing one (1-based), or None if `max_runs` (or the deadline)
    came first."""
    b = BUGS[bug]
    spec = CampaignSpec(scenario=b.scenario, profile=b.profile, bugs=[bug], strategy=strategy, seed=seed)
    program = spec.program()
    strat = build_strategy(program, strategy, seed)
    for i in range(max_runs):
        if time.perf_counter() > deadline:
            return None
        strat.new_execution(i)
        if program.run(strat).failure is not None:
            return i + 1
    return None


def _median(found: list[int], tries: int) -> float | None:
    """Median runs over `tries`, the tries that found nothing counting as infinite; None when they
    are half or more."""
    if len(found) * 2 <= tries:
        return None
    return float(statistics.median(sorted(found) + [float("inf")] * (tries - len(found))))


def strategy_comparison(quick: bool, tick: Tick, *, max_runs: int | None = None) -> dict[str, Any]:
    """Per named bug and strategy: median runs to first failure over up to 20 seeds."""
    load_bundled()
    seeds = 5 if quick else 20
    asked = os.environ.get(RUNS_VARIABLE)
    runs = max_runs or (int(asked) if asked else 30 if quick else MAX_RUNS)
    seconds = (0.3 if quick else SECONDS) * runs / (30 if quick else MAX_RUNS)
    table: dict[str, Any] = {}
    wins: dict[str, int] = dict.fromkeys(COMPARED, 0)
    total = len(BUGS) * len(COMPARED)
    for b, name in enumerate(BUGS):
        row: dict[str, Any] = {"scenario": BUGS[name].scenario}
        medians: dict[str, float] = {}
        for s, strategy in enumerate(COMPARED):
            tick(b * len(COMPARED) + s, total, f"{name} {strategy}")
            deadline = time.perf_counter() + seconds
            found: list[int] = []
            tries = 0
            for seed in range(seeds):
                if time.perf_counter() > deadline:
                    break
                n = runs_to_first_failure(name, strategy, seed, runs, deadline)
                if n is None and time.perf_counter() > deadline:
                    break  # cut short by the time cap: not a try of its own
                tries += 1
                if n is not None:
                    found.append(n)
            med = _median(found, tries)
            row[strategy] = {
                "median_runs_to_first_failure": med if med is not None else f"not found in {runs} runs",
                "found": f"{len(found)}/{tries}",
            }
            if med is not None:
                medians[strategy] = med
        if medians:
            best = min(medians.values())
            for strategy, med in medians.items():
                if med == best:
                    wins[strategy] += 1
        table[name] = row
    tick(total, total, "")
    return {
        "strategies": list(COMPARED),
        "seeds": seeds,
        "max_runs": runs,
        "max_seconds_per_bug_and_strategy": round(seconds, 2),
        "best_median_count": wins,
        "bugs": table,
    }
