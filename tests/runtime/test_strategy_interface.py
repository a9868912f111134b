"""A strategy is Shuttle's three-method scheduler: it drives executions and sees nothing else."""

from __future__ import annotations

import gc
import types
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from asyncvm.runtime import ReplayStrategy, Strategy, make_strategy
from asyncvm.runtime.executor import Executor, Task
from asyncvm.runtime.strategies import STRATEGIES, R

from .programs import abba, lost_update, three_counters

Program = Callable[[Any], Coroutine[Any, Any, None]]


class RoundRobin:
    """Written against the three methods alone: the runnable task after the one that ran last."""

    def __init__(self) -> None:
        self.last = -1

    def new_execution(self, index: int) -> bool:
        self.last = -1
        return True

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        t = next((t for t in runnable if t.tid > self.last), runnable[0])
        self.last = t.tid
        return t

    def next_value(self, kind: str, n: int, p: float) -> int:
        return 0


class Spy:
    """Passes everything to `inner` and notes which of the strategy's attributes were asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.asked: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.asked.add(name)
        return getattr(self.inner, name)


def _main(program: Program) -> Callable[[], Coroutine[Any, Any, None]]:
    return lambda: program(None)


def test_the_strategy_interface_is_three_methods() -> None:
    methods = sorted(n for n, v in vars(Strategy).items() if callable(v) and not n.startswith("_"))
    assert methods == ["new_execution", "next_task", "next_value"]


def test_a_round_robin_strategy_of_three_methods_drives_an_execution() -> None:
    rr = RoundRobin()
    assert isinstance(rr, Strategy)
    assert rr.new_execution(0)
    result = Executor(rr).run(_main(lost_update))
    # main spawns a and b and waits; a and b alternate around their scheduling point; main checks.
    assert result.choices == [0, 1, 2, 1, 2, 0]
    assert result.failure is not None and "lost update" in result.failure.message


def test_the_executor_asks_a_strategy_only_for_the_three_methods() -> None:
    spy = Spy(RoundRobin())
    Executor(spy, count_preemptions=True, record=True).run(_main(three_counters))  # type: ignore[arg-type]
    # `uniform` and `coin` are the optional inline fast paths of a uniform random pick and of a
    # yes/no draw; RoundRobin has neither.
    assert spy.asked <= {"next_task", "next_value", "uniform", "coin"}
    assert {"next_task", "next_value"} <= spy.asked


def _reaches_executor(root: object) -> bool:
    """Whether an Executor or a Task (whose group leads to one) is reachable from `root`'s state."""
    skip = (type, types.ModuleType, types.FunctionType, types.CodeType, types.BuiltinFunctionType)
    seen = {id(root)}
    todo = [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, (Executor, Task)):
            return True
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, skip):
                seen.add(id(ref))
                todo.append(ref)
    return False


class Watch:
    """Checks after every decision that the strategy has kept nothing of the execution."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decisions = 0

    def next_task(self, runnable: Sequence[R], current: R | None, is_yielding: bool) -> R:
        t = self.inner.next_task(runnable, current, is_yielding)
        self.decisions += 1
        assert not _reaches_executor(self.inner), f"{self.inner.name} kept a task or the executor"
        return t

    def next_value(self, kind: str, n: int, p: float) -> int:
        value = int(self.inner.next_value(kind, n, p))
        assert not _reaches_executor(self.inner), f"{self.inner.name} kept a task or the executor"
        return value


@pytest.mark.parametrize("program", [three_counters, abba])
@pytest.mark.parametrize("name", [*STRATEGIES, "replay"])
def test_no_strategy_gets_or_keeps_an_executor_reference(name: str, program: Program) -> None:
    if name == "replay":
        source = make_strategy("random", 3)
        source.new_execution(0)
        strategy: Any = ReplayStrategy(Executor(source).run(_main(program)).choices)
    else:
        strategy = make_strategy(name, 3, steps=20)
    for index in range(4):
        if not strategy.new_execution(index):
            break
        watch = Watch(strategy)
        Executor(watch).run(_main(program))  # type: ignore[arg-type]
        assert watch.decisions > 0
        assert not _reaches_executor(strategy)
