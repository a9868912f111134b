"""A vCPU (``struct kvm_vcpu``): vcpu->mutex, requests, KVM_PRE_FAULT_MEMORY and KVM_RUN."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..runtime import traps
from ..runtime.sync import Mutex, cond_resched, fatal_signal_pending, signal_pending
from ..uapi import PAGE_SIZE, KvmError
from .trace import WARN

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
        #: the arch's per-vCPU state (``vcpu->arch``)
        self.arch: Any = vm.ops.vcpu_create(self)

    def __repr__(self) -> str:
        return f"<Vcpu {self.vcpu_id} of vm{self.vm.id}>"

    # -- requests -------------------------------------------------------------------------
    def make_request(self, req: str) -> None:
        """kvm_make_request()"""
        self.requests.add(req)
        self.vm.mmu_word.write()

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

    @traps.syscall
    async def pre_fault_memory(self, r: uapi.PreFaultMemory) -> None:
        """KVM_PRE_FAULT_MEMORY: updates r.gpa/r.size in place; raises KvmError like the ioctl's -errno."""
        uapi.check_struct(r, uapi.PreFaultMemory, "vcpu.pre_fault_memory")
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

    @traps.syscall
    async def run(self) -> list[bytes]:
        """KVM_RUN: execute the guest program; returns what the guest read during this call.

        A private/shared mismatch (or a guest_memfd error) exits to userspace: KvmError(EFAULT or
        EHWPOISON) with ``kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT``; calling run() again
        resumes at the access that faulted. A finished program exits with KVM_EXIT_HLT.
        """
        await self._ioctl_enter()
        try:
            return await self.vm.ops.vcpu_ioctl_run(self)
        finally:
            await self.mutex.unlock()

    # -- vendor vCPU sub-commands (KVM_MEMORY_ENCRYPT_OP on the vCPU fd) ---------------------
    async def _mem_enc_op(self, cmd: uapi.TdxCmd, payload: Any) -> None:
        """virt/kvm/kvm_main.c: kvm_vcpu_ioctl(): the arch's unlocked handler first (before
        vcpu->mutex); -ENOIOCTLCMD from it means the command runs under the mutex."""
        self.vm.check_alive()
        r = await self.vm.ops.vcpu_unlocked_ioctl(self, cmd, payload)
        if r != -uapi.ENOIOCTLCMD:
            return
        await self._ioctl_enter()
        try:
            await self.vm.ops.vcpu_mem_enc_ioctl(self, cmd, payload)
        finally:
            await self.mutex.unlock()

    @traps.syscall
    async def tdx_init_vcpu(self, data: int = 0, *, flags: int = 0) -> None:
        """KVM_TDX_INIT_VCPU (`data` is the initial RCX)."""
        await self._mem_enc_op(uapi.TdxCmd(uapi.KVM_TDX_INIT_VCPU, flags, data), None)

    @traps.syscall
    async def tdx_init_mem_region(self, region: uapi.TdxInitMemRegion, flags: int = 0) -> None:
        """KVM_TDX_INIT_MEM_REGION: `region` advances past the pages done, even on error."""
        uapi.check_struct(region, uapi.TdxInitMemRegion, "vcpu.tdx_init_mem_region")
        await self._mem_enc_op(uapi.TdxCmd(uapi.KVM_TDX_INIT_MEM_REGION, flags), region)

    @traps.syscall
    async def tdx_get_cpuid(self, cpuid: uapi.Cpuid2) -> None:
        """KVM_TDX_GET_CPUID"""
        uapi.check_struct(cpuid, uapi.Cpuid2, "vcpu.tdx_get_cpuid")
        await self._mem_enc_op(uapi.TdxCmd(uapi.KVM_TDX_GET_CPUID), cpuid)


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
    vm = vcpu.vm
    full_size = r.size
    idx = await vm.srcu.read_lock()
    ret = 0
    try:
        while True:
            if signal_pending():
                ret = -uapi.EINTR
                break
            ret = await vm.ops.vcpu_pre_fault_memory(vcpu, r.gpa, r.size)
            if ret == 0 or ret == -uapi.EIO:
                # WARN_ON_ONCE(r == 0 || r == -EIO) [6.11+]: -EIO also comes from the VM-dead check
                # kvm_tdp_map_page() gained later, so a killed VM trips it too (kvm-core.md 8).
                WARN(vm, f"kvm_vcpu_pre_fault_memory: the arch hook returned {ret}")
                break
            if ret < 0:
                break
            # __u64 fields: a step larger than what is left wraps (only the map-memory-v2 design's
            # arch hook, which does not clamp to the size asked, ever takes one)
            r.size = (r.size - ret) & uapi.U64_MAX
            r.gpa += ret
            if not r.size:
                break
            await cond_resched()
    finally:
        await vm.srcu.read_unlock(idx)
    if vm.profile.map_memory_v2:
        # [design map-memory-v2] kvm_vcpu_map_memory() as the RFC v2 posted it: the error comes
        # back even after progress (the struct says how far it got)
        return ret
    return 0 if full_size != r.size else ret
