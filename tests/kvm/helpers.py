"""Shared setup for the generic-KVM tests: one controlled execution, a private-memory VM, and the
retry loops a VMM wraps around ioctls that the ABI lets fail with EINTR/EAGAIN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.guest_memfd import GuestMemfd, kvm_gmem_populate
from asyncvm.kvm.vcpu import Vcpu
from asyncvm.kvm.vm import Vm
from tests.support import QUIET, run_failing, run_guest, run_once  # noqa: F401

PAGE = uapi.PAGE_SIZE
#: a recognisable page of populate source data
SOURCE = bytes(range(256)) * 16

#: data draws switched off for conformance tests: no signal ever arrives, so every errno is the
#: one the input deserves (the race tests keep the default probabilities).


@dataclass
class PrivateVm:
    """A SW-protected VM with one guest_memfd memslot at gpa 0, PRIVATE over `npages` pages."""

    kvm: asyncvm.Kvm
    vm: Vm
    gmem: GuestMemfd
    npages: int
    hva: int


async def private_vm(
    kvm: asyncvm.Kvm,
    npages: int = 4,
    *,
    vm_type: int = uapi.KVM_X86_SW_PROTECTED_VM,
    private: bool = True,
    slot: int = 0,
) -> PrivateVm:
    """KVM_CREATE_VM + KVM_CREATE_GUEST_MEMFD + KVM_SET_USER_MEMORY_REGION2 (+ attributes)."""
    vm = await kvm.create_vm(vm_type)
    gmem = await vm.create_guest_memfd(size=npages * PAGE)
    hva = kvm.mm.mmap(npages * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(
            slot=slot,
            flags=uapi.KVM_MEM_GUEST_MEMFD,
            guest_phys_addr=0,
            memory_size=npages * PAGE,
            userspace_addr=hva,
            guest_memfd_offset=0,
            guest_memfd=gmem,
        )
    )
    if private:
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, npages * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return PrivateVm(kvm, vm, gmem, npages, hva)


async def shared_vm(kvm: asyncvm.Kvm, npages: int = 4, *, slot: int = 0) -> tuple[Vm, int]:
    """A default VM with one anonymous-memory memslot at gpa 0; returns (vm, hva)."""
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    hva = kvm.mm.mmap(npages * PAGE)
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(slot, 0, 0, npages * PAGE, hva))
    return vm, hva


async def pre_fault(vcpu: Vcpu, gpa: int, size: int, *, tolerate: tuple[int, ...] = ()) -> int | None:
    """KVM_PRE_FAULT_MEMORY until the range is done, as a VMM loops on it.

    EINTR (a signal, no progress) is retried; any errno in `tolerate` ends the loop and is
    returned; anything else propagates. Returns None when the whole range was mapped.
    """
    r = uapi.PreFaultMemory(gpa, size)
    while r.size:
        before = r.size
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            assert r.size == before, "an error return must mean no progress"
            if e.errno == uapi.EINTR:
                continue
            if e.errno in tolerate:
                return e.errno
            raise
        assert r.size < before, "a success return must mean progress"
    return None


async def fill_source(kvm: asyncvm.Kvm, data: bytes) -> int:
    """A page-aligned buffer in the VMM's address space holding `data` (the populate source)."""
    addr = kvm.mm.mmap(max(len(data), PAGE))
    await kvm.mm.write(addr, data)
    return addr


async def copy_from_source(vm: Vm, gfn: int, pfn: int, src: int | None, order: int, opaque: Any) -> int:
    """A post_populate callback: copy the source page (or zeros) into the guest_memfd page; a source
    that cannot be read is -EFAULT, as copy_from_user() failing in the vendor callbacks."""
    try:
        data = await vm.kvm.mm.read(src, PAGE) if src is not None else bytes(PAGE)
    except KvmError as e:
        return -(e.errno or uapi.EFAULT)
    folio = vm.kvm.allocator.folio_at(pfn)
    assert folio is not None and not folio.freed
    folio.fill_page(pfn - folio.pfn, data)
    return 0


async def populate(vm: Vm, gfn: int, src: int | None, npages: int, callback: Any = copy_from_source) -> int:
    """What KVM_TDX_INIT_MEM_REGION / KVM_SEV_SNP_LAUNCH_UPDATE do around kvm_gmem_populate():
    take slots_lock, populate, drop it; returns kvm_gmem_populate()'s pages-or-errno."""
    await vm.slots_lock.lock()
    try:
        return await kvm_gmem_populate(vm, gfn, src, npages, callback, None)
    finally:
        await vm.slots_lock.unlock()
