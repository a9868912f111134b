"""Running one controlled execution from a test: the helpers every test package shares."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.explore.engine import DEFAULT_MAX_STEPS, Program
from asyncvm.kvm.vcpu import GuestAccess, Vcpu
from asyncvm.runtime.executor import ExecutionResult
from asyncvm.runtime.failures import Failure
from asyncvm.runtime.strategies import RandomStrategy

Body = Callable[[asyncvm.Kvm], Coroutine[Any, Any, Any]]

#: no signals, no forced rescheduling surprises: for tests that check one exact outcome
QUIET = {"signal": 0.0, "need_resched": 0.0}


def run_execution(
    scenario: Callable[..., Coroutine[Any, Any, Any]],
    *,
    seed: int = 0,
    profile: str = "6.18",
    bugs: Iterable[str] = (),
    data_probs: Mapping[str, float] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    params: Mapping[str, Any] | None = None,
) -> ExecutionResult:
    """One controlled execution (oracles attached, quiescence checks run) under a random schedule."""
    program = Program(scenario, dict(params or {}), profile, tuple(bugs), max_steps, dict(data_probs or {}))
    strategy = RandomStrategy(seed)
    strategy.new_execution(0)
    return program.run(strategy)


def run_once(
    body: Body,
    *,
    profile: str = "6.18",
    bugs: Iterable[str] = (),
    seed: int = 0,
    data_probs: dict[str, float] | None = None,
    expect: str | None = None,
) -> ExecutionResult:
    """Run `body(kvm)` as one controlled execution and fail the test on any error.

    An exception raised by the body (a failed ``assert`` or ``pytest.raises``) is re-raised here
    with its traceback; anything else the runtime or an oracle reports fails the test with the
    failure's one-line description, unless `expect` names the signature prefix the run must end
    with (a kernel WARN the body provokes on purpose). `data_probs` overrides :data:`QUIET`.
    """
    box: dict[str, BaseException] = {}

    async def scenario(kvm: asyncvm.Kvm) -> None:
        try:
            await body(kvm)
        except BaseException as e:
            box["exc"] = e
            raise

    result = run_execution(scenario, profile=profile, bugs=bugs, seed=seed, data_probs={**QUIET, **(data_probs or {})})
    if "exc" in box and (result.failure is None or result.failure.kind == "exception"):
        raise box["exc"]
    if expect is None:
        assert result.failure is None, str(result.failure)
    else:
        assert result.failure is not None and result.failure.signature.startswith(expect), str(result.failure)
    return result


def run_failing(
    body: Body, *, profile: str = "6.18", bugs: Iterable[str] = (), seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS
) -> Failure:
    """Run `body(kvm)` as one controlled execution that must fail; return the failure it reports."""
    result = run_execution(body, profile=profile, bugs=bugs, seed=seed, data_probs=QUIET, max_steps=max_steps)
    assert result.failure is not None, "the injected bug went unnoticed"
    return result.failure


async def run_guest(vcpu: Vcpu, program: Sequence[GuestAccess]) -> list[bytes]:
    """KVM_RUN the program until the guest halts, re-entering after EINTR exits as the selftests'
    vcpu_run() does; returns what the guest read (across the re-entries)."""
    vcpu.load_program(program)
    first = len(vcpu.guest_reads)
    while True:
        try:
            await vcpu.run()
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            raise
        if vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_HLT:
            return vcpu.guest_reads[first:]
