"""The emulated /dev/kvm: the system-level handle a VMM opens to create VMs."""

from __future__ import annotations

from collections.abc import Iterable


class Kvm:
    """What ``open("/dev/kvm")`` gives a VMM: create VMs, with one kernel profile and bug set."""

    def __init__(self, profile: str = "6.18", bugs: Iterable[str] = ()) -> None:
        self.profile = profile
        self.bugs = frozenset(bugs)
