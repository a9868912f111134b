"""Where the oracles of each VM live: as long as its controlled execution, or (live mode) its VM.

A probe only gets the objects a tracepoint names, so it finds the oracles of a VM here. Under a
controlled execution they belong to that execution and go with it, whatever the scenario kept;
in live mode nothing else holds them, so they follow the VM the embedding program keeps.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from ..runtime import traps
from ..runtime.tracepoint import Tracepoint

T = TypeVar("T")


class Registry(Generic[T]):
    """VM -> its oracles of one kind."""

    def __init__(self) -> None:
        self._live: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()
        self._attached = False

    def _table(self, create: bool = False) -> dict[Any, T] | weakref.WeakKeyDictionary[Any, T] | None:
        # Under a controlled execution the table is kept by the executor itself (one dict probe
        # on the fault path), so it goes with the execution.
        exe = traps._get_exe()
        if exe is None:
            return self._live
        if create:
            return exe.scoped.setdefault(self, {})
        return exe.scoped.get(self)

    def add(self, vm: Any, oracles: T) -> None:
        table = self._table(create=True)
        assert table is not None
        table[vm] = oracles

    def get(self, vm: Any) -> T | None:
        # Every probe starts here: one call, no helper.
        exe = traps._get_exe()
        if exe is None:
            return self._live.get(vm)
        table: dict[Any, T] | None = exe.scoped.get(self)
        return None if table is None else table.get(vm)

    def items(self) -> Iterator[tuple[Any, T]]:
        table = self._table()
        return iter(list(table.items())) if table is not None else iter(())

    # -- probes -----------------------------------------------------------------------------
    def probe(self, method: Callable[..., None]) -> Callable[..., None]:
        """A probe for a tracepoint whose first argument is the VM: `method` of its oracles
        gets the other arguments."""
        get = self.get

        def probe(vm: Any, *args: Any) -> None:
            oracles = get(vm)
            if oracles is not None:
                method(oracles, *args)

        return probe

    def vcpu_probe(self, method: Callable[..., None]) -> Callable[..., None]:
        """The same for a tracepoint whose first argument is a vCPU (the oracles of its VM)."""
        get = self.get

        def probe(vcpu: Any, *args: Any) -> None:
            oracles = get(vcpu.vm)
            if oracles is not None:
                method(oracles, *args)

        return probe

    def page_free_probe(self, method: Callable[..., None]) -> Callable[..., None]:
        """A probe for ``mm_page_free(allocator, folio)``: the oracles of every VM on that host."""

        def probe(allocator: Any, folio: Any) -> None:
            for vm, oracles in self.items():
                if vm.kvm.allocator is allocator:
                    method(oracles, folio)

        return probe

    def attach(self, probes: Iterable[tuple[Tracepoint, Callable[..., None]]]) -> None:
        """Register these probes, once: every VM created from then on is watched."""
        if self._attached:
            return
        self._attached = True
        for tracepoint, probe in probes:
            tracepoint.register(probe)


def watched(vm: Any) -> Any:
    """What oracles keep of their VM: the VM itself under a controlled execution (both go with
    it), a weak proxy in live mode (so the oracles never keep a VM the program dropped)."""
    return vm if traps.active() is not None else weakref.proxy(vm)
