"""Benchmarks behind ``asyncvm bench``: every target is a ratio or count measured within one run.

Each benchmark is a function ``(quick, tick) -> dict``: `quick` asks for a smoke run, `tick(done,
total, what)` reports progress. run_benchmarks() runs the chosen ones in order and hands each
result to `emit` as soon as it is finished, so a killed bench keeps what it measured.
"""

from __future__ import annotations

import difflib
import importlib
import time
from collections.abc import Callable, Iterable
from typing import Any

#: progress inside one benchmark: (done, total, what is being measured now)
Tick = Callable[[int, int, str], None]

#: name -> (module, function, one line on what it measures); modules are imported when run
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "scheduling_decision": ("scheduler", "scheduling_decision", "one controlled decision vs a bare coro.send()"),
    "executions_per_second": ("race", "executions_per_second", "executions/s, steps and sends per execution"),
    "jobs_scaling": ("scaling", "jobs_scaling", "one campaign on --jobs 1, --jobs 2 and a 2-worker Dask cluster"),
    "first_failure": ("race", "first_failure", "seconds and runs to each named bug's first failure, vs trio"),
    "scale": ("race", "scale", "pre-fault of a 1, 16 and 256 GiB guest: time and memory"),
    "false_positives": ("race", "false_positives", "every shipped scenario without bugs: no failure"),
    "strategy_comparison": (
        "strategies",
        "strategy_comparison",
        "runs to each named bug's first failure: random, PCT, POS and feedback, median of 20 seeds",
    ),
    "fuzz": ("fuzz", "fuzz", "named bugs `asyncvm fuzz` finds without their scenario; runs and seconds to each"),
}


class UnknownBenchmark(ValueError):
    """A benchmark name that is not in BENCHMARKS; the message suggests the closest one."""


def check_names(names: Iterable[str]) -> list[str]:
    """The names, in the order given (commas split, duplicates dropped), or UnknownBenchmark."""
    out: list[str] = []
    for item in names:
        for name in (n.strip() for n in item.split(",")):
            if not name or name in out:
                continue
            if name not in BENCHMARKS:
                close = difflib.get_close_matches(name, BENCHMARKS, n=1, cutoff=0.3)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UnknownBenchmark(f"unknown benchmark {name!r}{hint} (known: {', '.join(BENCHMARKS)})")
            out.append(name)
    return out


def run_one(name: str, quick: bool, tick: Tick) -> dict[str, Any]:
    """Run one benchmark; its result starts with its name and whether it was a quick run."""
    module, function, _summary = BENCHMARKS[name]
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    t0 = time.perf_counter()
    result = fn(quick, tick)
    return {"benchmark": name, "quick": quick, **result, "bench_seconds": round(time.perf_counter() - t0, 1)}


class Progress:
    """What run_benchmarks tells its caller (see progress.py for the terminal's versions)."""

    def start(self, index: int, count: int, name: str) -> None:
        pass

    def tick(self, done: int, total: int, what: str) -> None:
        pass

    def finish(self, name: str, seconds: float, where: str) -> None:
        pass


def run_benchmarks(
    names: list[str], quick: bool, emit: Callable[[str, dict[str, Any]], str], progress: Progress
) -> None:
    """Run `names` in order; `emit(name, result)` writes each result and returns where it went."""
    for i, name in enumerate(names):
        progress.start(i, len(names), name)
        result = run_one(name, quick, progress.tick)
        where = emit(name, result)
        progress.finish(name, result["bench_seconds"], where)
