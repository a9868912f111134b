"""A vCPU (``struct kvm_vcpu``): vcpu->mutex, requests, KVM_PRE_FAULT_MEMORY and KVM_RUN."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..runtime import traps
from ..runtime.failures import Violation
from ..runtime.sync import Mutex, cond_resched, fatal_signal_pending, signal_pending, spin_yield
from ..uapi import PAGE_SHIFT, PAGE_SIZE, KvmError

if TYPE_CHECKING:
    from .vm import Vm


@dataclass
class GuestAccess:
    """One step of a guest program: read `length` bytes at `gpa`, or write `data` there.

    `private` says how the guest accesses the page: True (encrypted/private), False (shared), or
    None to follow the gfn's current attribute (what a SW-protected VM's faults do).
    """

    op: str
    gpa: int
    length: int = 8
    data: bytes = b""
    private: bool | None = None

    @classmethod
    def read(cls, gpa: int, length: int = 8, private: bool | None = None) -> GuestAccess:
        return cls("read", gpa, length, b"", private)

    @classmethod
    def write(cls, gpa: int, data: bytes, private: bool | None = None) -> GuestAccess:
        return cls("write", gpa, len(data), data, private)


class Vcpu:
    """``struct kvm_vcpu``: created by ``vm.create_vcpu(id)``."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.name = f"vcpu{vcpu_id}"
        self.mutex = Mutex(f"vcpu{vcpu_id}->mutex", lock_class="vcpu->mutex")
        self.kvm_run = uapi.Run()
        self.requests: set[str] = set()
        #: the guest program KVM_RUN executes, and how far it got
        self.program: list[GuestAccess] = []
        self.pc = 0
        self.guest_reads: list[bytes] = []
        self.arch: Any = None
        vm.arch.vcpu_create(self)

    def __repr__(self) -> str:
        return f"<Vcpu {self.vcpu_id} of vm{self.vm.id}>"

    # -- requests -------------------------------------------------------------------------
    def make_request(self, req: str) -> None:
        """kvm_make_request()"""
        self.requests.add(req)

    def check_request(self, req: str) -> bool:
        """kvm_check_request(): test and clear."""
        if req in self.requests:
            self.requests.discard(req)
            return True
        return False

    def has_request(self, req: str) -> bool:
        return req in self.requests

    # -- the generic vCPU ioctl path -------------------------------------------------------
    async def _ioctl_enter(self) -> None:
        """virt/kvm/kvm_main.c: kvm_vcpu_ioctl(): VM dead -> -EIO, then mutex_lock_killable(vcpu->mutex)."""
        self.vm.check_alive()
        if fatal_signal_pending():
            raise KvmError(uapi.EINTR, "killed while waiting for vcpu->mutex")
        await self.mutex.lock()

    async def pre_fault_memory(self, r: uapi.PreFaultMemory) -> None:
        """KVM_PRE_FAULT_MEMORY: updates r.gpa/r.size in place; raises KvmError like the ioctl's -errno."""
        await self._ioctl_enter()
        try:
            ret = await kvm_vcpu_pre_fault_memory(self, r)
        finally:
            await self.mutex.unlock()
        if ret < 0:
            raise KvmError(-ret, "KVM_PRE_FAULT_MEMORY")

    def load_program(self, program: Iterable[GuestAccess]) -> None:
        """Give the guest something to do: the accesses KVM_RUN will execute in order."""
        self.program = list(program)
        self.pc = 0

    async def run(self) -> list[bytes]:
        """KVM_RUN: execute the guest program; returns what the guest read during this call.

        A private/shared mismatch (or a guest_memfd error) exits to userspace: KvmError(EFAULT or
        EHWPOISON) with ``kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT``; calling run() again
        resumes at the access that faulted. A finished program exits with KVM_EXIT_HLT.
        """
        await self._ioctl_enter()
        try:
            return await kvm_arch_vcpu_run(self)
        finally:
            await self.mutex.unlock()

    # -- vendor vCPU sub-commands (KVM_MEMORY_ENCRYPT_OP on the vCPU fd) ---------------------
    async def _vendor_ioctl(self, name: str, *args: Any) -> None:
        """KVM_MEMORY_ENCRYPT_OP on the vCPU fd: x86.c dispatches the sub-commands the vendor
        lists in kvm_arch_vcpu_unlocked_ioctl() before vcpu->mutex is taken, the rest after."""
        handler = getattr(self.vm.arch, name, None)
        if handler is None:
            # An SNP (AMD) host has no vcpu_mem_enc_ioctl: -ENOTTY; on an Intel host
            # vt_vcpu_mem_enc_ioctl() rejects a vCPU that is not a TD's with -EINVAL.
            errno = uapi.ENOTTY if self.vm.type == uapi.KVM_X86_SNP_VM else uapi.EINVAL
            raise KvmError(errno, f"{name} on a {uapi.vm_type_name(self.vm.type)} vCPU")
        if name in self.vm.arch.vcpu_unlocked_ioctls():
            self.vm.check_alive()
            await handler(self, *args)
            return
        await self._ioctl_enter()
        try:
            await handler(self, *args)
        finally:
            await self.mutex.unlock()

    async def tdx_init_vcpu(self, data: int = 0, *, flags: int = 0) -> None:
        """KVM_TDX_INIT_VCPU (`data` is the initial RCX)."""
        await self._vendor_ioctl("tdx_init_vcpu", data, flags)

    async def tdx_init_mem_region(self, region: uapi.TdxInitMemRegion, flags: int = 0) -> None:
        """KVM_TDX_INIT_MEM_REGION: `region` advances past the pages done, even on error."""
        await self._vendor_ioctl("tdx_init_mem_region", region, flags)

    async def tdx_get_cpuid(self, cpuid: uapi.Cpuid2) -> None:
        """KVM_TDX_GET_CPUID"""
        await self._vendor_ioctl("tdx_get_cpuid", cpuid)


async def kvm_vcpu_pre_fault_memory(vcpu: Vcpu, r: uapi.PreFaultMemory) -> int:
    """virt/kvm/kvm_main.c: kvm_vcpu_pre_fault_memory() (6.11+): 0 after any progress, else the error.

    The fields are __u64: the kernel works on its copy_from_user() copy and copies it back
    whatever happens, so out-of-range Python ints are taken modulo 2**64 (a negative gpa is a
    huge one and wraps), exactly as the C struct would hold them.
    """
    r.gpa &= uapi.U64_MAX
    r.size &= uapi.U64_MAX
    r.flags &= uapi.U64_MAX
    if r.flags:
        return -uapi.EINVAL
    if r.gpa % PAGE_SIZE or r.size % PAGE_SIZE or r.gpa + r.size <= r.gpa or r.gpa + r.size > uapi.U64_MAX:
        return -uapi.EINVAL
    from ..x86.mmu.prefault import kvm_arch_vcpu_pre_fault_memory

    vm = vcpu.vm
    full_size = r.size
    idx = await vm.srcu.read_lock()
    ret = 0
    try:
        while True:
            if signal_pending():
                ret = -uapi.EINTR
                break
            ret = await kvm_arch_vcpu_pre_fault_memory(vcpu, r.gpa, r.size)
            if ret == 0 or ret == -uapi.EIO:
                # WARN_ON_ONCE(r == 0 || r == -EIO) [6.11+]: -EIO also comes from the VM-dead check
                # kvm_tdp_map_page() gained later, so a killed VM trips it too (kvm-core.md 8).
                vm.oracles.warn(f"kvm_vcpu_pre_fault_memory: the arch hook returned {ret}")
                break
            if ret < 0:
                break
            r.size -= ret
            r.gpa += ret
            if not r.size:
                break
            await cond_resched()
    finally:
        await vm.srcu.read_unlock(idx)
    return 0 if full_size != r.size else ret


async def kvm_arch_vcpu_run(vcpu: Vcpu) -> list[bytes]:
    """x86.c: vcpu_run() for the model's guest programs: enter, access, fault, retry, exit."""
    from ..x86.mmu.fault import (
        PFERR_GUEST_FINAL_MASK,
        PFERR_PRIVATE_ACCESS,
        PFERR_WRITE_MASK,
        RET_PF_EMULATE,
        RET_PF_RETRY,
        kvm_mmu_do_page_fault,
    )

    vm = vcpu.vm
    reads: list[bytes] = []
    vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_UNKNOWN
    r = vm.arch.vcpu_pre_run(vcpu)
    if r:
        raise KvmError(-r, "the vCPU cannot run in this state")
    idx = await vm.srcu.read_lock()
    try:
        while vcpu.pc < len(vcpu.program):
            if signal_pending():
                vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_INTR
                raise KvmError(uapi.EINTR, "signal pending in KVM_RUN")
            if vm.dead:
                raise KvmError(uapi.EIO, "VM is dead")
            # vcpu_enter_guest(): pending requests, a valid root, then the guest runs.
            if vcpu.check_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"):
                await vcpu.arch.kvm_mmu_free_obsolete_roots()
            r = (
                await vcpu.arch.kvm_mmu_load()
                if vcpu.arch.root is None or (vm.arch.has_mirrored_tdp and vcpu.arch.mirror_root is None)
                else 0
            )
            if r:
                raise KvmError(-r, "kvm_mmu_load")
            access = vcpu.program[vcpu.pc]
            gfn = (access.gpa >> PAGE_SHIFT) & ~vm.arch.gfn_direct_bits(vm)
            private = vm.arch.guest_access_is_private(vm, access) if access.private is None else access.private
            await traps.point(vcpu)  # the guest executes the access
            await vm.arch.before_guest_access(vcpu, gfn, private)
            data = guest_access(vcpu, access, gfn, private)
            if data is not None:
                if access.op == "read":
                    reads.append(data)
                    vcpu.guest_reads.append(data)
                vcpu.pc += 1
                continue
            # EPT violation -> kvm_mmu_page_fault() (not a prefetch); RETRY re-enters the guest.
            err = PFERR_GUEST_FINAL_MASK
            if access.op == "write":
                err |= PFERR_WRITE_MASK
            if private:
                err |= PFERR_PRIVATE_ACCESS
            gpa = access.gpa if private else access.gpa | (vm.arch.gfn_direct_bits(vm) << PAGE_SHIFT)
            r, _level = await kvm_mmu_do_page_fault(vcpu, gpa, err, prefetch=False)
            if r < 0:
                if r == -uapi.EAGAIN:
                    continue
                raise KvmError(-r, "KVM_RUN page fault")
            if r == RET_PF_EMULATE:
                vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_MMIO
                vcpu.pc += 1
                return reads
            if r == RET_PF_RETRY:
                await spin_yield()  # the guest re-faults at once; the invalidation must get to run
        vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_HLT
        return reads
    finally:
        await vm.srcu.read_unlock(idx)


def guest_access(vcpu: Vcpu, access: GuestAccess, gfn: int, private: bool) -> bytes | None:
    """The hardware walk: through the root for the access kind to the pfn, or None (EPT violation)."""
    vm = vcpu.vm
    root = vcpu.arch.root_for(private)
    if root is None or root.invalid:
        return None
    hit = root.leaf_at(gfn)
    if hit is None:
        return None
    _level, leaf = hit
    if leaf.private != private and vm.arch.has_mirrored_tdp is False and vm.arch.has_private_mem(vm):
        return None
    if access.op == "write" and not leaf.writable:
        return None
    pfn = leaf.pfn(gfn)
    folio = vm.kvm.allocator.folio_at(pfn)
    if folio is None or folio.freed:
        raise Violation(
            "guest_uaf",
            f"{vcpu.name} accessed gfn {gfn:#x} through a mapping of freed pfn {pfn:#x}",
            signature="guest_uaf",
            gfn=gfn,
            pfn=pfn,
        )
    vm.arch.check_guest_access(vm, folio, pfn, private)
    if not folio.initialized:
        raise Violation(
            "stale_host_data",
            f"{vcpu.name} read gfn {gfn:#x} (pfn {pfn:#x}) before it was zeroed or written: stale host data",
            signature="stale_host_data",
            gfn=gfn,
        )
    index = pfn - folio.pfn
    off = access.gpa % PAGE_SIZE
    if access.op == "write":
        folio.write_page(index, off, access.data)
        return b""
    return folio.read_page(index)[off : off + access.length]
