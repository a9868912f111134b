"""Known kernel behaviours: failures a scenario is known to show under a kernel profile.

A bundled scenario hunts races that some older kernels really have. Running it under such a
profile finds them again, and that is not a new finding: the scenario declares the behaviour
(``known={"6.10": Known(...)}``), with the kernel reference that explains it and the fix, and a
campaign reports a failure of that kind as known, not as a new finding (``asyncvm stress`` exits 0
when every failure it found is known).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..runtime.failures import Failure


@dataclass(frozen=True)
class Known:
    """The failure kinds a profile's kernel is known to produce here, why, and where it is fixed."""

    kinds: tuple[str, ...]
    why: str
    kernel: str

    def matches(self, failure: Failure) -> bool:
        return failure.kind in self.kinds

    def __str__(self) -> str:
        return f"{self.why} ({self.kernel})"


def known_behaviour(scenario: Any, profile: str, failure: Failure) -> str | None:
    """The known-behaviour line for `failure` of `scenario` under `profile`, or None if it is new."""
    known = (getattr(scenario, "scenario_known", None) or {}).get(profile)
    if known is None:
        return None
    for k in known if isinstance(known, (tuple, list)) else (known,):
        if k.matches(failure):
            return f"known {profile} kernel behaviour: {k}"
    return None
