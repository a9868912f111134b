"""``struct kvm_x86_ops``: the vendor slots x86 KVM calls (arch/x86/include/asm/kvm_host.h).

x86.c and the MMU reach a vendor (VMX with TDX, SVM with SEV-SNP) only through these named,
typed slots. The kernel has one table per host (``vt_x86_ops`` on Intel, ``svm_x86_ops`` on AMD)
whose entries dispatch on the VM type; the model picks the table by VM type too, as a host of
that vendor would: TDX, default and SW-protected VMs run on ``vt_x86_ops``, SNP VMs on
``svm_x86_ops``. A slot left None is an op the vendor does not implement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..host.pages import Folio
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm
    from .mmu.tdp_mmu import Leaf


@dataclass
class KvmX86Ops:
    """One vendor's ``kvm_x86_ops`` (only the slots the model exercises)."""

    name: str
    #: vm_init(): the vendor's per-VM state (``struct kvm_tdx`` / ``kvm_sev_info``), or None
    vm_init: Callable[[Vm], Any]
    #: vcpu_precreate(): 0 or -errno
    vcpu_precreate: Callable[[Vm], int]
    #: vcpu_create(): the vendor's per-vCPU state (``struct vcpu_tdx``), or None
    vcpu_create: Callable[[Vcpu], Any]
    #: vcpu_pre_run(): 0 if KVM_RUN may enter the guest, -errno to fail it, or > 0 to return to
    #: userspace at once with the exit the hook wrote in kvm_run (e.g. KVM_EXIT_FAIL_ENTRY)
    vcpu_pre_run: Callable[[Vcpu], int]
    #: mem_enc_ioctl(): KVM_MEMORY_ENCRYPT_OP on the VM fd (the command struct, its payload)
    mem_enc_ioctl: Callable[[Vm, Any, Any], Awaitable[None]] | None
    #: vcpu_mem_enc_ioctl(): KVM_MEMORY_ENCRYPT_OP on a vCPU fd, under vcpu->mutex
    vcpu_mem_enc_ioctl: Callable[[Vcpu, Any, Any], Awaitable[None]] | None
    #: vcpu_mem_enc_unlocked_ioctl(): before vcpu->mutex; -ENOIOCTLCMD if not handled there
    vcpu_mem_enc_unlocked_ioctl: Callable[[Vcpu, Any, Any], Awaitable[int]] | None
    #: gmem_prepare(vm, pfn, gfn, order): 0 or -errno
    gmem_prepare: Callable[[Vm, int, int, int], Awaitable[int]] | None
    #: gmem_invalidate(): a guest_memfd folio is being freed
    gmem_invalidate: Callable[[Vm, Folio], None] | None
    #: private_max_mapping_level(): the largest level a private fault may map
    private_max_mapping_level: Callable[[Vm], int]
    #: link_external_spt(vm, gfn, level): 0 or -errno (a page table of the mirror's external twin)
    link_external_spt: Callable[[Vm, int, int], Awaitable[int]] | None = None
    #: set_external_spte(vm, gfn, level, leaf): 0 or -errno
    set_external_spte: Callable[[Vm, int, int, Leaf], Awaitable[int]] | None = None
    #: remove_external_spte(vm, gfn, level): the external leaf goes (mmu_lock held for write)
    remove_external_spte: Callable[[Vm, int, int], Awaitable[None]] | None = None
    #: the model's guest, not a kernel op: what the guest does before touching a page
    guest_before_access: Callable[[Vcpu, int, bool], Awaitable[None]] | None = None
