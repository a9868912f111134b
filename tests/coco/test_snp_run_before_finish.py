"""KVM_RUN on an SNP vCPU before KVM_SEV_SNP_LAUNCH_FINISH (found by ``asyncvm soak``, issue 16):
no VMSA is launched yet, so the vCPU never enters the guest; the model used to run the guest
program and fault private pages in, which the RMP oracle reports as impossible."""

from __future__ import annotations

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess

from ..support import run_once
from .helpers import snp_vm


def test_kvm_run_before_launch_finish_exits_fail_entry_and_touches_nothing() -> None:
    """sev.c: pre_sev_run() (6.15+, 72d12715edcd): an SEV-ES+ vCPU without a valid VMSA gets no
    VMRUN; KVM_RUN returns 0 with KVM_EXIT_FAIL_ENTRY."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _src = await snp_vm(kvm, 4)
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.read(0, private=True), GuestAccess.write(uapi.PAGE_SIZE, b"x")])
        assert await vcpu.run() == []
        assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_FAIL_ENTRY
        assert vcpu.pc == 0 and not vm.snp_firmware.rmp
        await vm.snp_launch_finish()
        await vcpu.run()  # now the guest runs: the private read faults the page in
        assert vcpu.pc == 2 and vcpu.kvm_run.exit_reason != uapi.KVM_EXIT_FAIL_ENTRY

    run_once(body)
