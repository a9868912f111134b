"""Tracepoints: probes see what the model announces, and a probe's Violation fails the execution
at the step that fired the tracepoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asyncvm.runtime import traps
from asyncvm.runtime.executor import Executor
from asyncvm.runtime.failures import Violation
from asyncvm.runtime.tracepoint import Tracepoint


def test_probes_see_every_firing_in_registration_order() -> None:
    tp = Tracepoint("demo")
    seen: list[tuple[str, Any]] = []

    def first(x: Any) -> None:
        seen.append(("first", x))

    def second(x: Any) -> None:
        seen.append(("second", x))

    tp(0)  # nobody listens: nothing happens
    tp.register(first)
    tp.register(second)
    tp.register(first)  # registering twice is a no-op
    tp(1)
    tp.unregister(first)
    tp(2)
    assert seen == [("first", 1), ("second", 1), ("second", 2)]


class _FirstEnabled:
    """Always runs the lowest task id that can run: main first, the bystander never before it."""

    def new_execution(self, index: int) -> None:
        pass

    def next_task(self, enabled: list[Any], current: Any, yielding: bool) -> Any:
        return enabled[0]

    def next_value(self, kind: str, n: int, p: float) -> int:
        return 0


def _with_bystander(body: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """`body` as task 0 beside an enabled task, so its scheduling points are decisions (a task
    that runs alone passes them without yielding)."""

    async def bystander() -> None:
        for _ in range(100):
            await traps.point(None)

    async def main() -> None:
        exe = traps.active()
        assert exe is not None
        exe.spawn(bystander(), "bystander")
        await body()

    return main


def test_a_probe_violation_fails_the_execution_at_the_firing_step() -> None:
    tp = Tracepoint("install")

    def oracle(value: int) -> None:
        if value == 3:
            raise Violation("demo", f"value {value} installed", signature="demo")

    tp.register(oracle)

    async def main() -> None:
        for value in range(5):
            await traps.point(None)
            tp(value)

    result = Executor(_FirstEnabled()).run(_with_bystander(main))  # type: ignore[arg-type]
    assert result.failure is not None and result.failure.signature == "demo"
    # Step 1 runs main up to its first point; value v is fired in step v + 2.
    assert result.failure.step == 5


def test_a_violation_is_reported_at_the_step_that_raised_it() -> None:
    """On its way out a Violation passes ``finally:`` blocks that release locks, and each release
    is a scheduling point; the failure still names the step where the oracle fired."""
    from asyncvm.runtime.sync import Mutex

    lock = Mutex("demo_lock")

    async def main() -> None:
        await lock.lock()
        try:
            await traps.point(None)
            raise Violation("demo", "found while holding the lock", signature="demo")
        finally:
            await lock.unlock()
            await traps.point(None)

    result = Executor(_FirstEnabled()).run(_with_bystander(main))  # type: ignore[arg-type]
    assert result.failure is not None and result.failure.signature == "demo"
    # Step 1 ends at the lock (a wait), step 2 at the point, step 3 raises; two more steps unwind.
    assert (result.failure.step, result.steps) == (3, 5)
