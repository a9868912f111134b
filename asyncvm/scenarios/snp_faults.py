"""SEV-SNP after launch: private faults preparing pages, while attributes convert."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi

from .common import guest_reads_during_conversion, pages_param, private_vm
from .snp import POLICY


@asyncvm.scenario(
    name="snp_post_launch_faults",
    params={"pages": pages_param(4, low=2)},
    # RMPUPDATE failing (a hardware/firmware error) exercises sev_gmem_prepare()'s error path;
    # signals would only stop LAUNCH_UPDATE through its -EIO, which is not what is hunted here.
    data={"rmpupdate_error": 0.25, "signal": 0.0},
)
async def snp_post_launch_faults(kvm: Any, pages: int = 4) -> None:
    """After LAUNCH_FINISH the guest touches its private pages while half of them go shared.

    Each first private fault zeroes the folio and RMP-assigns it (sev_gmem_prepare); a failed
    prepare must leave the folio "not uptodate" so the retried fault prepares again. Hunts a page
    mapped private but left shared in the RMP, and conversion races. Watched by rmp_guest_shared,
    attribute_mismatch, snp_prepare_before_finish and the stale-mapping oracles.
    """
    vm, _gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SNP_VM, pages)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=POLICY))
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    # A private fault whose prepare failed exits with the guest_memfd errno (-EINVAL); the VMM
    # retries the access.
    await guest_reads_during_conversion(vm, vcpu, pages, rounds=2, fault_errnos=(uapi.EFAULT, uapi.EINVAL))
