"""The `fuzz` benchmark: which named bugs `asyncvm fuzz` finds without their scenario, and how soon.

Each bug gets one fuzz campaign with the bug injected (asyncvm/fuzz/hunt.py) under a small time
budget: DEFAULT_BUDGET seconds (QUICK_BUDGET with --quick), or ``asyncvm bench --fuzz-budget S``
(the ASYNCVM_FUZZ_BUDGET environment variable) for a real measurement.
"""

from __future__ import annotations

import os
from typing import Any

from . import Tick

DEFAULT_BUDGET = 10.0
QUICK_BUDGET = 2.0
BUDGET_VARIABLE = "ASYNCVM_FUZZ_BUDGET"


def budget(quick: bool) -> float:
    given = os.environ.get(BUDGET_VARIABLE)
    if given:
        return float(given)
    return QUICK_BUDGET if quick else DEFAULT_BUDGET


def fuzz(quick: bool, tick: Tick) -> dict[str, Any]:
    """Per named bug: found by fuzz or not, runs and seconds to its first failure."""
    from ..fuzz.hunt import hunt_bugs

    return hunt_bugs(budget(quick), tick=tick)
