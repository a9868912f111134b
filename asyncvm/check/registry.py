"""Where the oracles of each VM live: as long as its controlled execution, or (live mode) its VM.

A probe only gets the objects a tracepoint names, so it finds the oracles of a VM here. Under a
controlled execution they belong to that execution and go with it, whatever the scenario kept;
in live mode nothing else holds them, so they follow the VM the embedding program keeps.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from ..runtime import traps

T = TypeVar("T")


class Registry(Generic[T]):
    """VM -> its oracles of one kind."""

    def __init__(self) -> None:
        self._live: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()

    def _table(self, create: bool = False) -> dict[Any, T] | weakref.WeakKeyDictionary[Any, T] | None:
        # Under a controlled execution the table is kept by the executor itself (one dict probe
        # on the fault path), so it goes with the execution.
        exe = traps._exe
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
        exe = traps._exe
        if exe is None:
            return self._live.get(vm)
        table: dict[Any, T] | None = exe.scoped.get(self)
        return None if table is None else table.get(vm)

    def items(self) -> Iterator[tuple[Any, T]]:
        table = self._table()
        return iter(list(table.items())) if table is not None else iter(())


def watched(vm: Any) -> Any:
    """What oracles keep of their VM: the VM itself under a controlled execution (both go with
    it), a weak proxy in live mode (so the oracles never keep a VM the program dropped)."""
    return vm if traps.active() is not None else weakref.proxy(vm)
