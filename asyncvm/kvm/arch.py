"""The arch slots: the only way generic KVM reaches architecture code (the kvm_arch_* hooks).

virt/kvm calls a fixed set of ``kvm_arch_*`` functions that each architecture implements. Here
they are one table of typed slots, filled once by the architecture when it is loaded (as
kvm-intel/kvm-amd fill ``kvm_x86_ops`` at module init) and read by every VM. Generic code calls
``vm.ops.<slot>(...)``; nothing looks a hook up by name.

Per-VM and per-vCPU arch state (``kvm->arch``, ``vcpu->arch``) is whatever ``init_vm`` and
``vcpu_create`` return; generic code never looks inside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..runtime.failures import ToolError

if TYPE_CHECKING:
    from ..host.pages import Folio
    from .invalidate import GfnRange
    from .memslots import Memslot
    from .vcpu import Vcpu
    from .vm import Vm


@dataclass
class KvmArchOps:
    """The kvm_arch_* hooks generic KVM calls, one typed slot each (names without ``kvm_arch_``)."""

    #: the VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES)
    vm_types: tuple[int, ...]
    #: kvm_arch_init_vm(): returns the VM's arch state (``kvm->arch``)
    init_vm: Callable[[Vm], Any]
    #: kvm_arch_has_private_mem()
    has_private_mem: Callable[[Vm], bool]
    #: kvm_vm_ioctl_check_extension()'s arch part: a capability's value, 0 if unknown
    check_extension: Callable[[Vm, int], int]
    #: kvm_arch_vcpu_precreate(): 0 or -errno
    vcpu_precreate: Callable[[Vm], int]
    #: kvm_arch_vcpu_create(): returns the vCPU's arch state (``vcpu->arch``)
    vcpu_create: Callable[[Vcpu], Any]
    #: kvm_arch_vcpu_ioctl_run(): KVM_RUN; returns what the guest read
    vcpu_ioctl_run: Callable[[Vcpu], Awaitable[list[bytes]]]
    #: kvm_arch_vcpu_pre_fault_memory(vcpu, gpa, size): bytes mapped (> 0) or -errno
    vcpu_pre_fault_memory: Callable[[Vcpu, int, int], Awaitable[int]]
    #: kvm_arch_vm_ioctl(KVM_MEMORY_ENCRYPT_OP): the vendor command struct, updated in place
    vm_mem_enc_ioctl: Callable[[Vm, Any, Any], Awaitable[None]]
    #: kvm_arch_vcpu_unlocked_ioctl(): before vcpu->mutex; -ENOIOCTLCMD if not handled there
    vcpu_unlocked_ioctl: Callable[[Vcpu, Any, Any], Awaitable[int]]
    #: kvm_arch_vcpu_ioctl(KVM_MEMORY_ENCRYPT_OP), under vcpu->mutex
    vcpu_mem_enc_ioctl: Callable[[Vcpu, Any, Any], Awaitable[None]]
    #: kvm_arch_gmem_prepare(vm, pfn, gfn, order): 0 or -errno
    gmem_prepare: Callable[[Vm, int, int, int], Awaitable[int]]
    #: kvm_arch_gmem_invalidate(): a guest_memfd folio is being freed
    gmem_invalidate: Callable[[Vm, Folio], None]
    #: kvm_unmap_gfn_range(): zap the range's mappings per its filter; True if a flush is due
    unmap_gfn_range: Callable[[Vm, GfnRange], Awaitable[bool]]
    #: kvm_flush_remote_tlbs()
    flush_remote_tlbs: Callable[[Vm], None]
    #: kvm_arch_flush_shadow_memslot(): a memslot is being deleted or moved
    flush_shadow_memslot: Callable[[Vm, Memslot], Awaitable[None]]
    #: kvm_arch_pre_set_memory_attributes(): inside the invalidation; True if a flush is due
    pre_set_memory_attributes: Callable[[Vm, GfnRange], Awaitable[bool]]
    #: kvm_arch_post_set_memory_attributes()
    post_set_memory_attributes: Callable[[Vm, GfnRange], Awaitable[None]]


_arch: KvmArchOps | None = None


def kvm_register_arch(ops: KvmArchOps) -> None:
    """What loading the architecture's module does: fill the slots every new VM will use."""
    global _arch
    _arch = ops


def kvm_arch_ops() -> KvmArchOps:
    """The loaded architecture's slots."""
    if _arch is None:
        raise ToolError("no KVM architecture is loaded (import asyncvm.x86)")
    return _arch
