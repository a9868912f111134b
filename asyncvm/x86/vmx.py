"""``vt_x86_ops`` (arch/x86/kvm/vmx/main.c): the Intel host's table, for TDs and ordinary VMs alike.

Each ``vt_*`` entry dispatches on ``is_td()``: a TD goes to tdx.c, anything else to VMX, which
has nothing to add in the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import uapi
from ..uapi import KvmError
from .ops import KvmX86Ops
from .tdx import tdx

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm


def vt_vm_init(vm: Vm) -> tdx.KvmTdx | None:
    """main.c: vt_vm_init()"""
    return tdx.tdx_vm_init(vm) if tdx.is_td(vm) else None


def vt_vcpu_precreate(vm: Vm) -> int:
    """main.c: vt_vcpu_precreate() (and tdx_vcpu_create()'s state check)."""
    return tdx.tdx_vcpu_precreate(vm) if tdx.is_td(vm) else 0


def vt_vcpu_create(vcpu: Vcpu) -> tdx.VcpuTdx | None:
    """main.c: vt_vcpu_create()"""
    return tdx.tdx_vcpu_create(vcpu) if tdx.is_td(vcpu.vm) else None


def vt_vcpu_pre_run(vcpu: Vcpu) -> int:
    """main.c: vt_vcpu_pre_run()"""
    return tdx.tdx_vcpu_pre_run(vcpu) if tdx.is_td(vcpu.vm) else 0


async def vt_mem_enc_ioctl(vm: Vm, cmd: Any, payload: Any) -> None:
    """main.c: vt_mem_enc_ioctl(): -ENOTTY for a VM that is not a TD."""
    if not tdx.is_td(vm):
        raise KvmError(uapi.ENOTTY, f"TDX command on a {uapi.vm_type_name(vm.type)} VM")
    await tdx.tdx_vm_ioctl(vm, cmd, payload)


async def vt_vcpu_mem_enc_ioctl(vcpu: Vcpu, cmd: Any, payload: Any) -> None:
    """main.c: vt_vcpu_mem_enc_ioctl(): -EINVAL for a vCPU that is not a TD's."""
    if not tdx.is_td(vcpu.vm):
        raise KvmError(uapi.EINVAL, f"TDX command on a {uapi.vm_type_name(vcpu.vm.type)} vCPU")
    await tdx.tdx_vcpu_ioctl(vcpu, cmd, payload)


async def vt_vcpu_mem_enc_unlocked_ioctl(vcpu: Vcpu, cmd: Any, payload: Any) -> int:
    """main.c: vt_vcpu_mem_enc_unlocked_ioctl() (6.19+): TDs only; the rest take vcpu->mutex."""
    if not tdx.is_td(vcpu.vm):
        return -uapi.ENOIOCTLCMD
    return await tdx.tdx_vcpu_unlocked_ioctl(vcpu, cmd, payload)


def vt_private_max_mapping_level(vm: Vm) -> int:
    """guest_memfd reports max_order 0 in mainline: private memory maps 4K."""
    return 1


async def vt_guest_before_access(vcpu: Vcpu, gfn: int, private: bool) -> None:
    """The model's guest: a TD accepts PENDING pages before touching them."""
    if tdx.is_td(vcpu.vm):
        await tdx.tdx_guest_before_access(vcpu, gfn, private)


vt_x86_ops = KvmX86Ops(
    name="vt",
    vm_init=vt_vm_init,
    vcpu_precreate=vt_vcpu_precreate,
    vcpu_create=vt_vcpu_create,
    vcpu_pre_run=vt_vcpu_pre_run,
    mem_enc_ioctl=vt_mem_enc_ioctl,
    vcpu_mem_enc_ioctl=vt_vcpu_mem_enc_ioctl,
    vcpu_mem_enc_unlocked_ioctl=vt_vcpu_mem_enc_unlocked_ioctl,
    gmem_prepare=None,
    gmem_invalidate=None,
    private_max_mapping_level=vt_private_max_mapping_level,
    link_external_spt=tdx.tdx_sept_link_private_spt,
    set_external_spte=tdx.tdx_sept_set_private_spte,
    remove_external_spte=tdx.tdx_sept_remove_private_spte,
    guest_before_access=vt_guest_before_access,
)
