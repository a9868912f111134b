"""Shared set-up for the bundled scenarios: VMs with guest_memfd slots, and ABI-tolerant loops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.explore.params import Param
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime.failures import Violation
from asyncvm.uapi import PAGE_SIZE, KvmError

#: the most guest pages a bundled scenario takes (4 GiB of guest memory: far past any useful race)
MAX_PAGES = 1 << 20


def pages_param(default: int, low: int = 1) -> Param:
    """A scenario's `pages` parameter: how many 4 KiB guest pages it sets up."""
    return Param(default, ge=low, le=MAX_PAGES, help="guest pages")


def vcpus_param(default: int) -> Param:
    """A scenario's `vcpus` parameter: up to the kernel's KVM_MAX_VCPUS."""
    return Param(default, ge=1, le=uapi.KVM_MAX_VCPUS, help="vCPUs, at most KVM_MAX_VCPUS")


async def private_vm(
    kvm: Any, vm_type: int, pages: int, *, private: bool = True, slot: int = 0
) -> tuple[Any, Any, int]:
    """A VM with one guest_memfd-backed memslot at gpa 0 (PRIVATE if `private`)."""
    vm = await kvm.create_vm(vm_type)
    if vm_type == uapi.KVM_X86_TDX_VM:
        await vm.tdx_init_vm()
    gmem = await vm.create_guest_memfd(size=pages * PAGE_SIZE)
    hva = await kvm.mm.mmap(pages * PAGE_SIZE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(slot, uapi.KVM_MEM_GUEST_MEMFD, 0, pages * PAGE_SIZE, hva, 0, gmem)
    )
    if private:
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, pages * PAGE_SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return vm, gmem, hva


async def shared_vm(kvm: Any, pages: int, *, page_size: int = PAGE_SIZE) -> tuple[Any, int]:
    """A default VM with one anonymous memslot at gpa 0."""
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    hva = await kvm.mm.mmap(pages * PAGE_SIZE, page_size=page_size)
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, pages * PAGE_SIZE, hva))
    return vm, hva


def pre_fault(vcpu: Any, gpa: int, size: int, tolerate: tuple[int, ...] = ()) -> Coroutine[Any, Any, int]:
    """KVM_PRE_FAULT_MEMORY the way the selftest drives it: re-issue after progress or EINTR.

    Returns 0 when the whole range was processed, or the errno that stopped it (if tolerated).
    A plain function handing back until_done()'s coroutine: every scheduling step resumes the
    whole await chain, so a wrapper level would be paid on each one.
    """
    r = uapi.PreFaultMemory(gpa, size)
    return until_done(lambda: vcpu.pre_fault_memory(r), lambda: r.size > 0, tolerate)


async def until_done(
    call: Callable[[], Awaitable[None]], remaining: Callable[[], bool], tolerate: tuple[int, ...] = ()
) -> int:
    """Re-issue an ioctl whose struct records its progress until `remaining()` is false, after
    progress or EINTR alike, as the selftests do. Returns 0, or a tolerated errno that stopped it."""
    while remaining():
        try:
            await call()
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            if e.errno in tolerate:
                return e.errno
            raise
    return 0


async def expect_prefault_refused(vcpu: Any, size: int, before: str) -> None:
    """KVM_PRE_FAULT_MEMORY of [0, size) before the launch is finished must be -EOPNOTSUPP
    (mmu.c: kvm_arch_vcpu_pre_fault_memory(): !pre_fault_allowed); `before` names that step."""
    got = await pre_fault(vcpu, 0, size, tolerate=(uapi.EOPNOTSUPP,))
    if got != uapi.EOPNOTSUPP:
        raise Violation(
            "errno",
            f"KVM_PRE_FAULT_MEMORY succeeded {before}; the kernel returns EOPNOTSUPP",
            signature="errno:KVM_PRE_FAULT_MEMORY:success",
        )


async def run_guest(
    vcpu: Any, program: list[Any], *, convert: Any = None, fault_errnos: tuple[int, ...] = (uapi.EFAULT,)
) -> list[bytes]:
    """KVM_RUN until the program ends; memory-fault exits go to `convert` (the VMM's handler).

    A KVM_EXIT_MEMORY_FAULT accompanies EFAULT (or, for a guest_memfd error, that errno); any
    other errno with it is checked against `fault_errnos` by the errno oracle.
    """
    vcpu.load_program(program)
    reads: list[bytes] = []
    while True:
        try:
            reads += await vcpu.run()
            return reads
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            if convert is None or vcpu.kvm_run.exit_reason != uapi.KVM_EXIT_MEMORY_FAULT:
                raise
            expect_errno(e, fault_errnos, "KVM_RUN with a memory fault exit")
            await convert(vcpu.kvm_run.memory_fault)


def convert_on_fault(vm: Any) -> Any:
    """The VMM's answer to KVM_EXIT_MEMORY_FAULT: make the page what the guest accessed it as
    (private_mem_conversions_test's handler); nothing to do if it already is."""

    async def convert(fault: Any) -> None:
        private = bool(fault.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
        if vm.mem_is_private(fault.gpa // PAGE_SIZE) == private:
            return
        attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        await vm.set_memory_attributes(uapi.MemoryAttributes(fault.gpa, PAGE_SIZE, attrs))

    return convert


async def guest_reads_during_conversion(
    vm: Any, vcpu: Any, pages: int, *, rounds: int = 1, fault_errnos: tuple[int, ...] = (uapi.EFAULT,)
) -> None:
    """The guest reads every page (as the attributes say) while userspace makes the first half
    shared; memory-fault exits are answered by converting the page back."""
    program = [GuestAccess.read(i * PAGE_SIZE) for i in range(pages)] * rounds

    async def guest() -> None:
        await run_guest(vcpu, program, convert=convert_on_fault(vm), fault_errnos=fault_errnos)

    async def flip() -> None:
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, pages // 2 * PAGE_SIZE, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(guest, name="vcpu0")
        tg.spawn(flip, name="attr_flip")


def spawn_vcpus(tg: asyncvm.TaskGroup, fn: Any, vcpus: list[Any], *args: Any) -> None:
    for v in vcpus:
        tg.spawn(fn, v, *args, name=f"vcpu{v.vcpu_id}")
