"""SEV-SNP after launch: private faults preparing pages, while attributes convert."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import private_vm
from .snp import POLICY


@asyncvm.scenario(
    name="snp_post_launch_faults",
    params={"pages": 4},
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

    async def convert(fault: Any) -> None:
        attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if fault.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE else 0
        if vm.mem_is_private(fault.gpa // PAGE_SIZE) == bool(attrs):
            return  # the attribute is right: the fault failed for another reason; retry
        await vm.set_memory_attributes(uapi.MemoryAttributes(fault.gpa, PAGE_SIZE, attrs))

    async def guest() -> None:
        vcpu.load_program([GuestAccess.read(i * PAGE_SIZE) for i in range(pages)] * 2)
        while True:
            try:
                await vcpu.run()
                return
            except KvmError as e:
                if e.errno == uapi.EINTR:
                    continue
                # A private fault whose prepare failed exits with the guest_memfd errno; the VMM
                # retries the access, converting first if the attribute is what faulted.
                if vcpu.kvm_run.exit_reason != uapi.KVM_EXIT_MEMORY_FAULT:
                    raise
                expect_errno(e, {uapi.EFAULT, uapi.EINVAL}, "KVM_RUN memory fault exit")
                await convert(vcpu.kvm_run.memory_fault)

    async def flip() -> None:
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, pages // 2 * PAGE_SIZE, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(guest, name="vcpu0")
        tg.spawn(flip, name="attr_flip")
