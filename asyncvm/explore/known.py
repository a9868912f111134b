"""Known kernel behaviours: failures a scenario is known to show under a kernel profile.

A bundled scenario hunts races that some older kernels really have. Running it under such a
profile finds them again, and that is not a new finding: the scenario declares the behaviour
(``known={"6.10": Known(...)}``), with the kernel reference that explains it and the fix, and a
campaign reports a failure of that kind as known, not as a new finding (``asyncvm stress`` exits 0
when every failure it found is known).

A known behaviour names failure kinds (``kvm_bug``, ``errno``...), but by default not a failure
whose signature names one of the `NOT_A_RACE` statuses: those say KVM issued a SEAMCALL sequence
the TDX module refuses (PAGE.REMOVE without TDH.MEM.TRACK after the BLOCK), which a lost
try-lock race does not explain, so such a KVM_BUG_ON is not hidden behind the known BUSY-race
KVM_BUG_ONs of the same scenario. A behaviour that really produces one says so (``unless=()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..runtime.failures import Failure

#: signature fragments (TDX statuses a KVM_BUG_ON message names) a Known does not cover by default
NOT_A_RACE = ("TDX_TLB_TRACKING_NOT_DONE",)


@dataclass(frozen=True)
class Known:
    """The failure kinds a profile's kernel is known to produce here, why, and where it is fixed."""

    kinds: tuple[str, ...]
    why: str
    kernel: str
    #: a failure whose signature contains one of these is not this behaviour, whatever its kind
    unless: tuple[str, ...] = NOT_A_RACE

    def matches(self, failure: Failure) -> bool:
        return failure.kind in self.kinds and not any(s in failure.signature for s in self.unless)

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
