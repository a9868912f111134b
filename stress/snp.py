"""SEV-SNP scenarios: LAUNCH_UPDATE and the guest_memfd paths around it."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import private_vm

POLICY = 1 << 17  # the reserved-must-be-one bit


# KVM_SEV_SNP_LAUNCH_UPDATE turns a first-page -EINTR into -EIO: signals would only end runs early.
@asyncvm.scenario(name="snp_launch_update_vs_fallocate", params={"pages": 4}, data={"signal": 0.0})
async def snp_launch_update_vs_fallocate(kvm: Any, pages: int = 4) -> None:
    """fallocate() of the image's guest_memfd racing KVM_SEV_SNP_LAUNCH_UPDATE of it.

    The mailing-list thread: under the 6.10 profile fallocate zeroes and *prepares* (RMP-assigns)
    the folios, so a LAUNCH_UPDATE that comes after it fails with -EIO; from 6.11 fallocate only
    allocates and the launch succeeds whatever the order. Hunts that, double population (-EEXIST),
    and folios marked uptodate before they were prepared. Watched by snp_double_launch,
    rmp_host_write, rmp_freed_private and the launch completing.
    """
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SNP_VM, pages)
    await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=POLICY))
    src = await kvm.mm.mmap(pages * PAGE_SIZE)
    await kvm.mm.write(src, b"\x5a" * (pages * PAGE_SIZE))

    async def launch() -> None:
        update = uapi.SevSnpLaunchUpdate(0, src, pages * PAGE_SIZE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        while update.len:
            await vm.snp_launch_update(update)

    async def allocate() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, pages * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(launch, name="launch_update")
        tg.spawn(allocate, name="fallocate")
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    r = uapi.PreFaultMemory(0, pages * PAGE_SIZE)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            if e.errno != uapi.EINTR:
                raise
