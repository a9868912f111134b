"""``svm_x86_ops`` (arch/x86/kvm/svm/svm.c): the AMD host's table, for SEV-SNP guests.

SVM has no vCPU-level KVM_MEMORY_ENCRYPT_OP (-ENOTTY) and no external (mirror) SPTEs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import uapi
from .ops import KvmX86Ops
from .sev import snp

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm


def svm_vcpu_precreate(vm: Vm) -> int:
    return 0


def svm_vcpu_create(vcpu: Vcpu) -> None:
    return None


def svm_vcpu_pre_run(vcpu: Vcpu) -> int:
    """svm.c: svm_vcpu_run() -> sev.c: pre_sev_run() (6.15+, 72d12715edcd "Refuse to attempt VMRUN
    if an SEV-ES+ guest has an invalid VMSA"): no VMRUN, KVM_RUN returns 0 with
    KVM_EXIT_FAIL_ENTRY. An SNP guest's VMSAs are launched by KVM_SEV_SNP_LAUNCH_FINISH, so before
    it no vCPU enters the guest (older kernels try VMRUN, which fails VMEXIT_INVALID: the same
    exit). The model keeps no per-vCPU VMSA: after LAUNCH_FINISH every vCPU runs."""
    vm = vcpu.vm
    if snp.sev_snp_guest(vm) and not snp.to_kvm_sev(vm).launch_finished:
        vcpu.kvm_run.exit_reason = uapi.KVM_EXIT_FAIL_ENTRY
        return 1
    return 0


def svm_private_max_mapping_level(vm: Vm) -> int:
    """guest_memfd reports max_order 0 in mainline: private memory maps 4K."""
    return 1


svm_x86_ops = KvmX86Ops(
    name="svm",
    vm_init=snp.sev_vm_init,
    vcpu_precreate=svm_vcpu_precreate,
    vcpu_create=svm_vcpu_create,
    vcpu_pre_run=svm_vcpu_pre_run,
    mem_enc_ioctl=snp.sev_mem_enc_ioctl,
    vcpu_mem_enc_ioctl=None,
    vcpu_mem_enc_unlocked_ioctl=None,
    gmem_prepare=snp.sev_gmem_prepare,
    gmem_invalidate=snp.sev_gmem_invalidate,
    private_max_mapping_level=svm_private_max_mapping_level,
)
