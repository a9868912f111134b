"""Tracepoints: the places where the model announces what happened, for whoever listens.

As in the kernel (include/linux/tracepoint.h), a tracepoint is declared once beside the code it
instruments, fired with that code's own objects, and costs one test when nobody listens. The
layers above (the oracles in ``check``) attach probes; the model never knows who listens, so a
kernel-shaped function keeps the kernel's parameters and carries no oracle state.

A probe may raise ``Violation``: it then fails the execution at the very step that fired the
tracepoint, which is where a reader looks for the faulty action.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Probe = Callable[..., None]


class Tracepoint:
    """``DEFINE_TRACE(name)``: call it like a function; every registered probe sees the arguments."""

    __slots__ = ("name", "probes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.probes: tuple[Probe, ...] = ()

    def __repr__(self) -> str:
        return f"<Tracepoint {self.name} ({len(self.probes)} probes)>"

    def register(self, probe: Probe) -> None:
        """``register_trace_<name>()``; registering the same probe twice is a no-op."""
        if probe not in self.probes:
            self.probes = (*self.probes, probe)

    def unregister(self, probe: Probe) -> None:
        """``unregister_trace_<name>()``"""
        self.probes = tuple(p for p in self.probes if p != probe)

    def __call__(self, *args: Any) -> None:
        for probe in self.probes:
            probe(*args)
