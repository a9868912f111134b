"""Lockdep: the lock-class dependency graph, kept across every execution of a campaign.

Like the kernel's lockdep, it does not wait for a deadlock to happen. Each time a task acquires
lock class B while holding class A it records the edge A -> B with both acquisition sites; an
edge that closes a cycle is a possible circular locking dependency, reported with the sites of
every edge in the cycle, even if no execution has deadlocked yet and even if the edges came from
different executions.

SRCU follows the kernel's model of it: a read section adds edges from the SRCU to the locks taken
inside it (readers never block, so nothing points into a read section), and ``synchronize_srcu``
counts as acquiring the SRCU class, so "hold L, synchronize" plus "read section, take L" closes a
cycle.
"""

from __future__ import annotations

import sys
from collections import deque
from itertools import pairwise
from typing import Any, NamedTuple

from .failures import Violation
from .sites import fmt_site
from .sync import READ, WRITE


class Edge(NamedTuple):
    """Class `after` was acquired at `after_site` while `before` (taken at `before_site`) was held.

    A named tuple, not a frozen dataclass: every execution's graph is built afresh, and a tuple is
    made in one C call where a frozen dataclass pays an ``object.__setattr__`` per field."""

    before: str
    after: str
    before_site: str
    after_site: str
    task: str
    execution: int

    def __str__(self) -> str:
        return (
            f"{self.before} (taken at {self.before_site}) -> {self.after} (taken at {self.after_site}) "
            f"in task {self.task}, execution {self.execution}"
        )


class Lockdep:
    """The dependency graph; one per campaign.

    Each execution checks its own acquisitions against a graph of its own, so whether it fails
    depends on it alone; a campaign merges every execution's new edges into one graph, in
    execution order, to find the inversions whose halves lie in different executions.
    """

    def __init__(self) -> None:
        self.edges: dict[tuple[str, str], Edge] = {}
        self._succ: dict[str, list[str]] = {}
        #: index of the execution now running; set by the campaign so edges say where they came from.
        self.execution = 0
        self.new_edges: list[Edge] = []

    def declare(self, before: str, after: str, source: str) -> None:
        """Seed the graph with a documented order, so the first reverse acquisition is reported."""
        if (before, after) not in self.edges and self._path(after, before) is None:
            edge = Edge(before, after, source, source, "(declared)", self.execution)
            self.edges[(before, after)] = edge
            self._succ.setdefault(before, []).append(after)
            self.new_edges.append(edge)

    def merge(self, edge: Edge) -> None:
        """Add an edge another execution recorded (a campaign merging executions in index order);
        raises the Violation if it closes a cycle with edges from other executions."""
        if (edge.before, edge.after) in self.edges or edge.before == edge.after:
            return
        path = self._path(edge.after, edge.before)
        self.edges[(edge.before, edge.after)] = edge
        self._succ.setdefault(edge.before, []).append(edge.after)
        if path is not None:
            self._report(edge, path)

    def check_acquire(self, task: Any, lock: Any, site: Any) -> None:
        """Record the edges from everything `task` holds to `lock`; raise on a closed cycle."""
        # Almost every acquisition repeats an edge the graph already has: for those this is one
        # dict probe per held lock, and only a new edge pays for _add (sites, cycle search).
        after = lock.lock_class
        edges = self.edges
        for held, _mode, held_site in task.held:
            before = held.lock_class
            if before != after and held.lockdep_tracked and (before, after) not in edges:
                self._add(before, after, held_site, site, task.name)
        for srcu, _idx, read_site in task.srcu_reads:
            before = srcu.lock_class
            if before != after and srcu is not lock and (before, after) not in edges:
                self._add(before, after, read_site, site, task.name)

    def _add(self, before: str, after: str, before_site: Any, after_site: Any, task: str) -> None:
        # Same-class nesting (all vcpu->mutex instances) needs the kernel's subclass annotations,
        # which the model does not carry; it is not an ordering question between two classes.
        if before == after or (before, after) in self.edges:
            return
        edge = Edge(before, after, fmt_site(before_site), fmt_site(after_site), task, self.execution)
        path = self._path(after, before)
        self.edges[(before, after)] = edge
        self._succ.setdefault(before, []).append(after)
        self.new_edges.append(edge)
        if path is not None:
            self._report(edge, path)

    def _report(self, edge: Edge, path: list[str]) -> None:
        chain = [self.edges[pair] for pair in pairwise(path)]
        cycle = sorted({edge.before, edge.after, *path})
        lines = [f"new dependency: {edge}", "existing chain:"] + [f"  {e}" for e in chain]
        raise Violation(
            "lockdep",
            "possible circular locking dependency: " + "; ".join(lines),
            signature="lockdep:" + ",".join(cycle),
            edge=str(edge),
            chain=[str(e) for e in chain],
            executions=sorted({edge.execution, *(e.execution for e in chain)}),
        )

    def _path(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst in the graph, if any (breadth-first: the shortest)."""
        if src == dst:
            return [src]
        if src not in self._succ:
            return None  # nothing is ordered after src (the usual case for a new edge's target)
        parent: dict[str, str] = {src: src}
        queue = deque([src])
        while queue:
            node = queue.popleft()
            for nxt in self._succ.get(node, ()):
                if nxt in parent:
                    continue
                parent[nxt] = node
                if nxt == dst:
                    out = [dst]
                    while out[-1] != src:
                        out.append(parent[out[-1]])
                    return out[::-1]
                queue.append(nxt)
        return None


# -- lockdep_assert_held(): a function's locking rule, checked at its top -------------------------
def _assert_held(lock: Any, mode: str | None, what: str) -> None:
    held = lock.held_by_current() if mode is None else lock.held_by_current(mode)
    if not held:
        # The function that asserted, as the kernel's WARN names it.
        func = sys._getframe(2).f_code.co_name
        raise Violation(
            "lock_assert",
            f"{func}() requires {lock.name} held{what}",
            signature=f"lock_assert:{func}:{lock.lock_class}",
            lock=lock.name,
            function=func,
        )


def lockdep_assert_held(lock: Any) -> None:
    """include/linux/lockdep.h: lockdep_assert_held(): the running task holds `lock` (any mode)."""
    _assert_held(lock, None, "")


def lockdep_assert_held_read(lock: Any) -> None:
    """include/linux/lockdep.h: lockdep_assert_held_read(): held for read (shared)."""
    _assert_held(lock, READ, " for read")


def lockdep_assert_held_write(lock: Any) -> None:
    """include/linux/lockdep.h: lockdep_assert_held_write(): held for write (exclusive)."""
    _assert_held(lock, WRITE, " for write")
