"""The locking rules stated as ``lockdep_assert_held*()`` at the top of the model functions whose
kernel counterparts assert them (the invalidate protocol, the TDP MMU set and zap paths, populate,
S-EPT removal): each fires when a caller skips the lock, and stays quiet when the lock is held."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import asyncvm
from asyncvm.kvm.guest_memfd import kvm_gmem_populate
from asyncvm.kvm.invalidate import (
    GfnRange,
    kvm_mmu_invalidate_begin,
    kvm_mmu_invalidate_end,
    kvm_mmu_invalidate_range_add,
    mmu_invalidate_retry_gfn,
)
from asyncvm.kvm.vm import Vm
from asyncvm.runtime.failures import Violation
from asyncvm.x86.mmu.mmu import kvm_arch_post_set_memory_attributes
from asyncvm.x86.mmu.tdp_mmu import MMIO
from asyncvm.x86.tdx.tdx import tdx_sept_remove_private_spte

from ..coco.helpers import build_td
from .helpers import private_vm, run_once

Call = Callable[[Vm], Awaitable[Any]]


async def _sync(fn: Callable[[], Any]) -> Any:
    return fn()


async def _no_post_populate(*args: Any) -> int:
    return 0


#: (kernel function, the lock and mode it asserts, a call that skips the lock)
CASES: list[tuple[str, str, str, Call]] = [
    ("kvm_mmu_invalidate_begin", "kvm->mmu_lock", "write", lambda vm: _sync(lambda: kvm_mmu_invalidate_begin(vm))),
    (
        "kvm_mmu_invalidate_range_add",
        "kvm->mmu_lock",
        "write",
        lambda vm: _sync(lambda: kvm_mmu_invalidate_range_add(vm, 0, 1)),
    ),
    ("kvm_mmu_invalidate_end", "kvm->mmu_lock", "write", lambda vm: _sync(lambda: kvm_mmu_invalidate_end(vm))),
    ("mmu_invalidate_retry_gfn", "kvm->mmu_lock", "", lambda vm: _sync(lambda: mmu_invalidate_retry_gfn(vm, 0, 0))),
    (
        "kvm_gmem_populate",
        "kvm->slots_lock",
        "",
        lambda vm: kvm_gmem_populate(vm, 0, None, 1, _no_post_populate, None),
    ),
    (
        "set_spte_atomic",
        "kvm->mmu_lock",
        "read",
        lambda vm: vm.arch.mmu.set_spte_atomic(vm.arch.mmu.alloc_root(0, False), 1, 0, None, MMIO),
    ),
    ("unmap_gfn_range", "kvm->mmu_lock", "write", lambda vm: vm.arch.mmu.unmap_gfn_range(0, 4, 3, True)),
    ("invalidate_roots", "kvm->mmu_lock", "write", lambda vm: _sync(lambda: vm.arch.mmu.invalidate_roots())),
    ("zap_invalidated_roots", "kvm->mmu_lock", "read", lambda vm: vm.arch.mmu.zap_invalidated_roots()),
    (
        "kvm_arch_post_set_memory_attributes",
        "kvm->mmu_lock",
        "write",
        lambda vm: kvm_arch_post_set_memory_attributes(vm, GfnRange(0, 4, None)),
    ),
]


@pytest.mark.parametrize(("function", "lock", "mode", "call"), CASES, ids=[c[0] for c in CASES])
def test_the_assert_fires_when_the_caller_skips_the_lock(function: str, lock: str, mode: str, call: Call) -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        with pytest.raises(Violation) as v:
            await call(p.vm)
        assert v.value.kind == "lock_assert"
        assert v.value.signature == f"lock_assert:{function}:{lock}", v.value
        assert f"{function}() requires {lock} held" + (f" for {mode}" if mode else "") in v.value.message

    run_once(body)


@pytest.mark.parametrize(("function", "lock", "mode", "call"), CASES, ids=[c[0] for c in CASES])
def test_the_assert_is_quiet_when_the_lock_is_held(function: str, lock: str, mode: str, call: Call) -> None:
    """The clean twin: the same call with the lock held in the asserted mode."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        vm = p.vm
        if lock == "kvm->slots_lock":
            async with vm.slots_lock:
                await call(vm)
            return
        if function == "kvm_mmu_invalidate_range_add" or function == "kvm_mmu_invalidate_end":
            async with vm.mmu_lock.write():
                kvm_mmu_invalidate_begin(vm)  # a balanced window around the asserted call
                await call(vm)
                if function == "kvm_mmu_invalidate_range_add":
                    kvm_mmu_invalidate_end(vm)
            return
        guard = vm.mmu_lock.read() if mode == "read" else vm.mmu_lock.write()
        async with guard:
            await call(vm)
        if function == "kvm_mmu_invalidate_begin":
            async with vm.mmu_lock.write():
                kvm_mmu_invalidate_end(vm)

    run_once(body)


def test_sept_removal_asserts_mmu_lock_held_for_write() -> None:
    """tdx.c: tdx_sept_remove_private_spte(): lockdep_assert_held_write(&kvm->mmu_lock); a read hold
    is not enough (removal must not race with the atomic installs that run under read)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=1)
        async with td.vm.mmu_lock.read():
            with pytest.raises(Violation) as v:
                await tdx_sept_remove_private_spte(td.vm, 0, 1)
        assert v.value.signature == "lock_assert:tdx_sept_remove_private_spte:kvm->mmu_lock", v.value

    run_once(body)


def test_a_read_hold_does_not_meet_a_write_assert() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        async with p.vm.mmu_lock.read():
            with pytest.raises(Violation):
                kvm_mmu_invalidate_begin(p.vm)

    run_once(body)
