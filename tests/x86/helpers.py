"""Shared pieces of the x86 tests: running a scenario once under the controlled runtime, the
pre-fault retry loop the kernel selftest uses, and small VM/memslot builders."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from asyncvm import KvmError, uapi
from asyncvm.kvm.guest_memfd import GuestMemfd
from asyncvm.kvm.kvm import Kvm
from asyncvm.kvm.vcpu import Vcpu
from asyncvm.kvm.vm import Vm
from asyncvm.runtime.executor import ExecutionResult
from tests.support import run_execution, run_guest  # noqa: F401

PAGE = uapi.PAGE_SIZE
SZ_2M = 2 << 20
SZ_1G = 1 << 30

#: no signals, no forced rescheduling surprises: for tests that check one exact outcome
QUIET = {"signal": 0.0}


def run_once(
    scenario: Callable[..., Coroutine[Any, Any, Any]],
    *,
    seed: int = 1,
    profile: str = "6.18",
    bugs: tuple[str, ...] = (),
    data_probs: dict[str, float] | None = None,
    max_steps: int = 200_000,
    **params: Any,
) -> ExecutionResult:
    """One controlled execution (oracles attached, quiescence checks run) with a random schedule."""
    return run_execution(
        scenario,
        seed=seed,
        profile=profile,
        bugs=bugs,
        data_probs=QUIET if data_probs is None else data_probs,
        max_steps=max_steps,
        params=params,
    )


def assert_clean(result: ExecutionResult) -> None:
    assert result.failure is None, str(result.failure)


async def pre_fault(vcpu: Vcpu, r: uapi.PreFaultMemory) -> int:
    """One KVM_PRE_FAULT_MEMORY ioctl: 0 or the errno it failed with (r is updated in place)."""
    try:
        await vcpu.pre_fault_memory(r)
    except KvmError as e:
        assert e.errno is not None
        return e.errno
    return 0


async def pre_fault_retrying(vcpu: Vcpu, gpa: int, size: int) -> tuple[uapi.PreFaultMemory, int]:
    """The selftest's loop: progress XOR error on every call, retry at once on EINTR, stop when
    nothing is left or on any other error. Returns the range and the last errno (0: success)."""
    r = uapi.PreFaultMemory(gpa, size)
    while True:
        prev = r.size
        err = await pre_fault(vcpu, r)
        assert (r.size < prev) ^ (err != 0), f"progress {prev - r.size} bytes with errno {err}"
        if err == uapi.EINTR:
            continue
        if err or not r.size:
            return r, err


async def add_slot(
    vm: Vm,
    slot: int,
    gpa: int,
    size: int,
    *,
    private: bool = False,
    hva: int | None = None,
    page_size: int = PAGE,
) -> tuple[int, GuestMemfd | None]:
    """KVM_SET_USER_MEMORY_REGION2 with anonymous memory (and a fresh guest_memfd if private)."""
    kvm: Kvm = vm.kvm
    if hva is None:
        hva = kvm.mm.mmap(size, page_size=page_size)
    gmem = None
    flags = 0
    if private:
        gmem = await vm.create_guest_memfd(size=size)
        flags = uapi.KVM_MEM_GUEST_MEMFD
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(slot, flags, gpa, size, hva, 0, gmem))
    return hva, gmem


async def delete_slot(vm: Vm, slot: int) -> None:
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(slot, 0, 0, 0, 0))


async def set_private(vm: Vm, gpa: int, size: int, private: bool = True) -> None:
    attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
    await vm.set_memory_attributes(uapi.MemoryAttributes(gpa, size, attrs))


def mapped_gfns(vcpu: Vcpu, start: int, end: int, private: bool = False) -> set[int]:
    """The gfns in [start, end) with a present leaf in the root the vCPU uses for that kind."""
    root = vcpu.arch.mmu.root_for(private)
    if root is None:
        return set()
    return {gfn for gfn in range(start, end) if root.leaf_at(gfn) is not None}
