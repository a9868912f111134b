"""The emulated /dev/kvm: the system-level handle a VMM opens to create VMs."""

from __future__ import annotations

from collections.abc import Iterable

from .. import uapi
from ..host.mm import Mm
from ..host.pages import PageAllocator
from ..profile import Profile, get_profile
from ..runtime import traps
from ..uapi import KvmError
from .arch import KvmArchOps, kvm_arch_ops
from .guest_memfd import kvm_gmem_get_supported_flags
from .vm import Vm


class Kvm:
    """What ``open("/dev/kvm")`` gives a VMM, plus the VMM's own address space (``kvm.mm``).

    Every VM it creates follows one kernel profile (``"6.18"`` by default) and one set of
    injected bugs (names from ``asyncvm.bugs``).
    """

    def __init__(
        self, profile: str | Profile = "6.18", bugs: Iterable[str] = (), *, ops: KvmArchOps | None = None
    ) -> None:
        #: the architecture's slots (the loaded arch's by default)
        self.ops = ops or kvm_arch_ops()
        self.profile = get_profile(profile)
        self.bugs = frozenset(bugs)
        if self.bugs:
            from ..bugs import check_bug_names

            check_bug_names(self.bugs)
        self.allocator = PageAllocator()
        self.mm = Mm(self.allocator)
        self.vms: list[Vm] = []

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm."""
        cap = uapi.check_int(cap, "cap", "kvm.check_extension")
        if cap == uapi.KVM_CAP_VM_TYPES:
            return sum(1 << t for t in self.ops.vm_types)
        if cap in (uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_USER_MEMORY2, uapi.KVM_CAP_GUEST_MEMFD):
            return 1
        if cap == uapi.KVM_CAP_MEMORY_ATTRIBUTES:
            return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        if cap == uapi.KVM_CAP_GUEST_MEMFD_FLAGS:
            # kvm_gmem_get_supported_flags(NULL): every flag the kernel knows
            return kvm_gmem_get_supported_flags(None, self.profile.gmem_supported_flags)
        return 0

    @traps.syscall
    async def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        """KVM_CREATE_VM: unsupported types are -EINVAL, as kvm_arch_init_vm() says."""
        vm_type = uapi.check_int(vm_type, "vm_type", "kvm.create_vm")
        if vm_type not in self.ops.vm_types:
            raise KvmError(uapi.EINVAL, f"VM type {vm_type} is not supported")
        vm = Vm(self, vm_type, len(self.vms))
        self.vms.append(vm)
        return vm
