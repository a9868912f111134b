"""Shared set-up for the bundled scenarios: VMs with guest_memfd slots, and ABI-tolerant loops."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.uapi import PAGE_SIZE, KvmError


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


async def pre_fault(vcpu: Any, gpa: int, size: int, tolerate: tuple[int, ...] = ()) -> int:
    """KVM_PRE_FAULT_MEMORY the way the selftest drives it: re-issue after progress or EINTR.

    Returns 0 when the whole range was processed, or the errno that stopped it (if tolerated).
    """
    r = uapi.PreFaultMemory(gpa, size)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            if e.errno in tolerate:
                return e.errno
            raise
    return 0


async def run_guest(vcpu: Any, program: list[Any], *, convert: Any = None) -> list[bytes]:
    """KVM_RUN until the program ends; memory-fault exits go to `convert` (the VMM's handler)."""
    vcpu.load_program(program)
    reads: list[bytes] = []
    while True:
        try:
            reads += await vcpu.run()
            return reads
        except KvmError as e:
            if e.errno == uapi.EINTR:
                continue
            if e.errno == uapi.EFAULT and vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT and convert:
                await convert(vcpu.kvm_run.memory_fault)
                continue
            raise


def spawn_vcpus(tg: asyncvm.TaskGroup, fn: Any, vcpus: list[Any], *args: Any) -> None:
    for v in vcpus:
        tg.spawn(fn, v, *args, name=f"vcpu{v.vcpu_id}")
