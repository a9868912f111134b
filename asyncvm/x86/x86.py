"""x86 KVM (arch/x86/kvm/x86.c): the arch slots generic KVM calls, KVM_RUN and the guest's accesses.

``kvm_x86_arch_ops()`` fills generic KVM's slot table (``kvm/arch.py``) with the x86 functions
below; they reach the MMU directly and a vendor only through its ``kvm_x86_ops`` table
(``ops.py``). ``vm.arch`` is ``struct kvm_arch`` (:class:`KvmX86`) and ``vcpu.arch`` is
``struct kvm_vcpu_arch`` (:class:`KvmVcpuArch`); vendor state hangs off them and is reached with
the vendor's typed accessors (``to_kvm_tdx(vm)``, ``to_tdx(vcpu)``, ``to_kvm_sev(vm)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..kvm.arch import KvmArchOps
from ..runtime import traps
from ..runtime.failures import Violation
from ..runtime.sync import signal_pending, spin_wait
from ..uapi import PAGE_SHIFT, PAGE_SIZE, KvmError
from .mmu import mmu
from .mmu.fault import (
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRIVATE_ACCESS,
    PFERR_WRITE_MASK,
    RET_PF_EMULATE,
    RET_PF_RETRY,
    kvm_mmu_do_page_fault,
)
from .mmu.mmu import VcpuMmu
from .mmu.prefault import kvm_arch_vcpu_pre_fault_memory
from .mmu.tdp_mmu import TdpMmu
from .ops import KvmX86Ops
from .trace import trace_kvm_guest_access

if TYPE_CHECKING:
    from ..host.pages import Folio
    from ..kvm.vcpu import GuestAccess, Vcpu
    from ..kvm.vm import Vm

PRIVATE_MEM_VM_TYPES = (uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM)


class KvmX86:
    """``struct kvm_arch`` (x86): the TDP MMU, the vendor's table and the vendor's own state."""

    def __init__(self, vm: Vm, ops: KvmX86Ops) -> None:
        self.vm_type = vm.type
        self.kvm_x86_ops = ops
        self.mmu = TdpMmu(vm)
        #: kvm->arch.has_private_mem (6.8+)
        self.has_private_mem = vm.type in PRIVATE_MEM_VM_TYPES
        #: kvm_has_mirrored_tdp(): TDX VMs map private memory through a mirror root
        self.has_mirrored_tdp = vm.type == uapi.KVM_X86_TDX_VM
        #: kvm->arch.pre_fault_allowed: default and SW-protected VMs at once, CoCo VMs once launched
        self.pre_fault_allowed = vm.type in (uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM)
        #: kvm->arch.gfn_direct_bits: the TDX shared bit as a gfn mask (0 elsewhere)
        self.gfn_direct_bits = 0
        #: the tdp_enabled module parameter (False: shadow paging, where pre-fault is unsupported)
        self.tdp_enabled = True
        #: KVM_X86_QUIRK_SLOT_ZAP_ALL (default on): memslot deletion on a default VM zaps everything
        self.slot_zap_all_quirk = True
        #: ``struct kvm_tdx`` / ``struct kvm_sev_info``, set by the vendor's vm_init
        self.vendor: Any = None

    @property
    def tdx_module(self) -> Any:
        return self.vendor.module if self.vm_type == uapi.KVM_X86_TDX_VM else None

    @property
    def snp_firmware(self) -> Any:
        return self.vendor.firmware if self.vm_type == uapi.KVM_X86_SNP_VM else None


class KvmVcpuArch:
    """``struct kvm_vcpu_arch``: the vCPU's MMU and the vendor's per-vCPU state."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.mmu = VcpuMmu(vcpu)
        #: ``struct vcpu_tdx``, set by the vendor's vcpu_create
        self.vendor: Any = None


# -- VM and vCPU lifecycle -----------------------------------------------------------------------
def kvm_arch_init_vm(vm: Vm, vendors: Mapping[int, KvmX86Ops]) -> KvmX86:
    """x86.c: kvm_arch_init_vm(): the VM's arch state, then the vendor's vm_init()."""
    arch = vm.arch = KvmX86(vm, vendors[vm.type])
    arch.vendor = arch.kvm_x86_ops.vm_init(vm)
    return arch


def kvm_arch_vcpu_create(vcpu: Vcpu) -> KvmVcpuArch:
    """x86.c: kvm_arch_vcpu_create(): the MMU context, then the vendor's vcpu_create()."""
    arch = vcpu.arch = KvmVcpuArch(vcpu)
    arch.vendor = vcpu.vm.arch.kvm_x86_ops.vcpu_create(vcpu)
    return arch


def kvm_vm_ioctl_check_extension(vm: Vm, cap: int) -> int:
    """x86.c: kvm_vm_ioctl_check_extension(): the x86 capabilities the model implements."""
    if cap == uapi.KVM_CAP_PRE_FAULT_MEMORY:
        return int(vm.arch.tdp_enabled)
    return 0


# -- KVM_MEMORY_ENCRYPT_OP -------------------------------------------------------------------------
async def kvm_arch_vm_mem_enc_ioctl(vm: Vm, cmd: Any, payload: Any, vendors: Mapping[type, KvmX86Ops]) -> None:
    """x86.c: kvm_arch_vm_ioctl(KVM_MEMORY_ENCRYPT_OP) -> kvm_x86_ops.mem_enc_ioctl.

    The model carries both hosts: a command goes to the vendor whose uAPI struct it is
    (``kvm_tdx_cmd`` to vt_mem_enc_ioctl(), ``kvm_sev_cmd`` to sev_mem_enc_ioctl()), which then
    refuses a VM that is not its own with that vendor's errno.
    """
    handler = vendors[type(cmd)].mem_enc_ioctl
    if handler is None:
        raise KvmError(uapi.ENOTTY, "no KVM_MEMORY_ENCRYPT_OP on this host")
    await handler(vm, cmd, payload)


async def kvm_arch_vcpu_unlocked_ioctl(vcpu: Vcpu, cmd: Any, payload: Any) -> int:
    """x86.c: kvm_arch_vcpu_unlocked_ioctl() (6.18+): the vendor's commands that take their own locks."""
    handler = vcpu.vm.arch.kvm_x86_ops.vcpu_mem_enc_unlocked_ioctl
    if handler is None:
        return -uapi.ENOIOCTLCMD
    return await handler(vcpu, cmd, payload)


async def kvm_arch_vcpu_mem_enc_ioctl(vcpu: Vcpu, cmd: Any, payload: Any) -> None:
    """x86.c: kvm_arch_vcpu_ioctl(KVM_MEMORY_ENCRYPT_OP): -ENOTTY if the vendor has none (AMD)."""
    handler = vcpu.vm.arch.kvm_x86_ops.vcpu_mem_enc_ioctl
    if handler is None:
        raise KvmError(uapi.ENOTTY, f"no vCPU KVM_MEMORY_ENCRYPT_OP on a {uapi.vm_type_name(vcpu.vm.type)} host")
    await handler(vcpu, cmd, payload)


# -- guest_memfd hooks ------------------------------------------------------------------------------
async def kvm_arch_gmem_prepare(vm: Vm, pfn: int, gfn: int, order: int) -> int:
    """x86.c: kvm_arch_gmem_prepare() -> kvm_x86_ops.gmem_prepare (SEV-SNP only)."""
    prepare = vm.arch.kvm_x86_ops.gmem_prepare
    return 0 if prepare is None else await prepare(vm, pfn, gfn, order)


def kvm_arch_gmem_invalidate(vm: Vm, folio: Folio) -> None:
    """x86.c: kvm_arch_gmem_invalidate() -> kvm_x86_ops.gmem_invalidate (SEV-SNP only)."""
    invalidate = vm.arch.kvm_x86_ops.gmem_invalidate
    if invalidate is not None:
        invalidate(vm, folio)


def kvm_flush_remote_tlbs(vm: Vm) -> None:
    """virt/kvm/kvm_main.c: kvm_flush_remote_tlbs() (the model has no TLBs: an event)."""
    traps.emit("tlb_flush", vm)


# -- KVM_RUN and the guest ----------------------------------------------------------------------------
async def kvm_arch_vcpu_ioctl_run(vcpu: Vcpu) -> list[bytes]:
    """x86.c: vcpu_run() for the model's guest programs: enter, access, fault, retry, exit."""
    vm = vcpu.vm
    arch = vm.arch
    ops = arch.kvm_x86_ops
    mmu_ctx = vcpu.arch.mmu
    reads: list[bytes] = []
    vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_UNKNOWN
    r = ops.vcpu_pre_run(vcpu)
    if r < 0:
        raise KvmError(-r, "the vCPU cannot run in this state")
    if r > 0:
        return reads  # KVM_RUN returns 0: the exit reason the vendor set says why nothing ran
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
                await mmu_ctx.kvm_mmu_free_obsolete_roots()
            r = (
                await mmu_ctx.kvm_mmu_load()
                if mmu_ctx.root is None or (arch.has_mirrored_tdp and mmu_ctx.mirror_root is None)
                else 0
            )
            if r:
                raise KvmError(-r, "kvm_mmu_load")
            access = vcpu.program[vcpu.pc]
            seen = vm.mmu_word.version
            gfn = (access.gpa >> PAGE_SHIFT) & ~arch.gfn_direct_bits
            private = access.private
            if private is None:
                private = guest_access_is_private(vm, access)
            await traps.point(vcpu)  # the guest executes the access
            if ops.guest_before_access is not None:
                await ops.guest_before_access(vcpu, gfn, private)
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
            gpa = access.gpa if private else access.gpa | (arch.gfn_direct_bits << PAGE_SHIFT)
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
                # The guest re-faults once what it read changed. vcpu_enter_guest() drops SRCU
                # while the guest runs, so a vCPU re-entering a faulting guest never holds up a
                # memslot update's synchronize_srcu().
                await vm.srcu.read_unlock(idx)
                try:
                    await spin_wait(vm.mmu_word, seen)
                finally:
                    idx = await vm.srcu.read_lock()
        vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_HLT
        return reads
    finally:
        await vm.srcu.read_unlock(idx)


def guest_access_is_private(vm: Vm, access: GuestAccess) -> bool:
    """How the guest reaches a gpa: by its shared bit where the VM has one (TDX), else by the
    gfn's current attribute (SW-protected, SNP); a default VM has no private memory."""
    gfn = access.gpa >> PAGE_SHIFT
    if vm.arch.gfn_direct_bits:
        return not gfn & vm.arch.gfn_direct_bits
    return vm.type != uapi.KVM_X86_DEFAULT_VM and vm.mem_is_private(gfn)


def guest_access(vcpu: Vcpu, access: GuestAccess, gfn: int, private: bool) -> bytes | None:
    """The hardware walk: through the root for the access kind to the pfn, or None (EPT violation)."""
    vm = vcpu.vm
    root = vcpu.arch.mmu.root_for(private)
    if root is None or root.invalid:
        return None
    hit = root.leaf_at(gfn)
    if hit is None:
        return None
    _level, leaf = hit
    if leaf.private != private and not vm.arch.has_mirrored_tdp and vm.arch.has_private_mem:
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
    trace_kvm_guest_access(vcpu, gfn, pfn, private)
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


# -- the slot table generic KVM gets ---------------------------------------------------------------
def kvm_x86_arch_ops(by_vm_type: Mapping[int, KvmX86Ops], by_cmd: Mapping[type, KvmX86Ops]) -> KvmArchOps:
    """Generic KVM's slots, filled with x86; `by_vm_type` picks each VM's vendor table and
    `by_cmd` the vendor that owns a KVM_MEMORY_ENCRYPT_OP command struct."""

    def init_vm(vm: Vm) -> KvmX86:
        return kvm_arch_init_vm(vm, by_vm_type)

    async def vm_mem_enc_ioctl(vm: Vm, cmd: Any, payload: Any) -> None:
        await kvm_arch_vm_mem_enc_ioctl(vm, cmd, payload, by_cmd)

    return KvmArchOps(
        vm_types=tuple(by_vm_type),
        init_vm=init_vm,
        has_private_mem=lambda vm: vm.arch.has_private_mem,
        check_extension=kvm_vm_ioctl_check_extension,
        vcpu_precreate=lambda vm: vm.arch.kvm_x86_ops.vcpu_precreate(vm),
        vcpu_create=kvm_arch_vcpu_create,
        vcpu_ioctl_run=kvm_arch_vcpu_ioctl_run,
        vcpu_pre_fault_memory=kvm_arch_vcpu_pre_fault_memory,
        vm_mem_enc_ioctl=vm_mem_enc_ioctl,
        vcpu_unlocked_ioctl=kvm_arch_vcpu_unlocked_ioctl,
        vcpu_mem_enc_ioctl=kvm_arch_vcpu_mem_enc_ioctl,
        gmem_prepare=kvm_arch_gmem_prepare,
        gmem_invalidate=kvm_arch_gmem_invalidate,
        unmap_gfn_range=mmu.kvm_unmap_gfn_range,
        flush_remote_tlbs=kvm_flush_remote_tlbs,
        flush_shadow_memslot=mmu.kvm_arch_flush_shadow_memslot,
        pre_set_memory_attributes=mmu.kvm_arch_pre_set_memory_attributes,
        post_set_memory_attributes=mmu.kvm_arch_post_set_memory_attributes,
    )
