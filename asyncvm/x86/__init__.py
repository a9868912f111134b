"""x86 KVM: loading it fills generic KVM's arch slots (as kvm-intel/kvm-amd do at module init).

TDX, default and SW-protected VMs run on the Intel host's ``vt_x86_ops``; SNP VMs on the AMD
host's ``svm_x86_ops``. A KVM_MEMORY_ENCRYPT_OP command goes to the vendor whose struct it is.
"""

from __future__ import annotations

from .. import uapi
from ..kvm.arch import kvm_register_arch
from .svm import svm_x86_ops
from .vmx import vt_x86_ops
from .x86 import kvm_x86_arch_ops

kvm_register_arch(
    kvm_x86_arch_ops(
        by_vm_type={
            uapi.KVM_X86_DEFAULT_VM: vt_x86_ops,
            uapi.KVM_X86_SW_PROTECTED_VM: vt_x86_ops,
            uapi.KVM_X86_SNP_VM: svm_x86_ops,
            uapi.KVM_X86_TDX_VM: vt_x86_ops,
        },
        by_cmd={uapi.TdxCmd: vt_x86_ops, uapi.SevCmd: svm_x86_ops},
    )
)
