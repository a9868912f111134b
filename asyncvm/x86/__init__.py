"""x86 KVM: the arch hooks generic KVM calls (kvm_x86_ops), and the vendor back ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import uapi
from .x86 import X86Arch

if TYPE_CHECKING:
    from ..kvm.vm import Vm


def make_arch(vm: Vm) -> X86Arch:
    """Pick the vendor back end for the VM type, as kvm_x86_ops + the VM type do."""
    if vm.type == uapi.KVM_X86_TDX_VM:
        from .tdx.tdx import TdxArch

        return TdxArch(vm)
    if vm.type == uapi.KVM_X86_SNP_VM:
        from .sev.snp import SnpArch

        return SnpArch(vm)
    return X86Arch(vm)
