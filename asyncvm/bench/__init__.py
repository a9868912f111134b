"""Benchmarks behind ``asyncvm bench``: every target is a ratio measured within one run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import scheduler


def _scheduling_decision(quick: bool) -> dict[str, Any]:
    return scheduler.run(decisions=50_000 if quick else 200_000, repeats=3 if quick else 7)


BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "scheduling_decision": _scheduling_decision,
}
