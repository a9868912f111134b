"""Benchmarks behind ``asyncvm bench``: every target is a ratio or count measured within one run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import race, scheduler


def _scheduling_decision(quick: bool) -> dict[str, Any]:
    return scheduler.run(decisions=50_000 if quick else 200_000, repeats=3 if quick else 7)


BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "scheduling_decision": _scheduling_decision,
    "executions_per_second": race.executions_per_second,
    "runs_to_first_failure": race.runs_to_first_failure,
    "scale": race.scale,
    "false_positives": race.false_positives,
}
