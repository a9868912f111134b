"""TDX scenarios: building a TD image while other things happen, and running it afterwards."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import expect_prefault_refused, pages_param, private_vm, run_guest, until_done, vcpus_param


async def build_td(kvm: Any, pages: int, vcpus: int) -> tuple[Any, Any, list[Any], int]:
    """INIT_VM, a private guest_memfd slot, vCPUs created and INIT_VCPU'd, a source image in kvm.mm."""
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_TDX_VM, pages)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    for v in cpus:
        await v.tdx_init_vcpu()
    src = await kvm.mm.mmap(pages * PAGE_SIZE)
    await kvm.mm.write(src, b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(pages)))
    return vm, gmem, cpus, src


def init_mem_region(
    vcpu: Any, src: int, gfn: int, n: int, *, measure: bool = True, tolerate: tuple[int, ...] = ()
) -> Coroutine[Any, Any, int]:
    """KVM_TDX_INIT_MEM_REGION until done; the struct tells where to restart after EINTR
    (until_done()'s coroutine itself, as pre_fault() hands it back)."""
    region = uapi.TdxInitMemRegion(src + gfn * PAGE_SIZE, gfn * PAGE_SIZE, n)
    flags = uapi.KVM_TDX_MEASURE_MEMORY_REGION if measure else 0
    return until_done(lambda: vcpu.tdx_init_mem_region(region, flags), lambda: region.nr_pages > 0, tolerate)


async def init_mem_region_split(cpus: list[Any], src: int, pages: int) -> None:
    """Each vCPU issues KVM_TDX_INIT_MEM_REGION for its own slice of the image, all at once."""
    per = max(1, pages // len(cpus))

    async def work(i: int) -> None:
        first = i * per
        n = per if i < len(cpus) - 1 else pages - first
        if n > 0:
            await init_mem_region(cpus[i], src, first, n)

    async with asyncvm.TaskGroup() as tg:
        for i in range(len(cpus)):
            tg.spawn(work, i, name=f"vcpu{i}")


async def finalize(vm: Any) -> None:
    while True:
        try:
            await vm.tdx_finalize_vm()
            return
        except KvmError as e:
            if e.errno != uapi.EBUSY:
                raise


@asyncvm.scenario(name="tdx_init_mem_region_parallel", params={"vcpus": vcpus_param(3), "pages": pages_param(6)})
async def tdx_init_mem_region_parallel(kvm: Any, vcpus: int = 3, pages: int = 6) -> None:
    """Each vCPU issues KVM_TDX_INIT_MEM_REGION for its own part of the image at the same time.

    Hunts: TDX module lock contention (PAGE.ADD and MR.EXTEND take the TDR exclusively) turning
    into BUSY/KVM_BUG, S-EPT non-leaf races (SEPT.ADD under FROZEN_SPTE), nr_premapped drift.
    Watched by kvm_bug, mirror/S-EPT coherence, MR.EXTEND-once, PAGE.ADD-once and nr_premapped.
    """
    if pages < vcpus:  # (a set-up error: a usage error, not a finding)
        raise ValueError(f"pages={pages} must be at least vcpus={vcpus}: each vCPU populates its own part")
    vm, _gmem, cpus, src = await build_td(kvm, pages, vcpus)
    await init_mem_region_split(cpus, src, pages)
    await finalize(vm)


@asyncvm.scenario(name="tdx_init_mem_region_vs_punch_hole", params={"pages": pages_param(4)})
async def tdx_init_mem_region_vs_punch_hole(kvm: Any, pages: int = 4) -> None:
    """INIT_MEM_REGION races a PUNCH_HOLE over the same pages of the image.

    Hunts: a page truncated between kvm_gmem_get_pfn and PAGE.ADD (the invalidate lock must
    exclude it), S-EPT removal of premapped or added pages before FINALIZE. Watched by
    tdx_freed_page, mirror/S-EPT coherence, nr_premapped and stale mappings.
    """
    vm, gmem, cpus, src = await build_td(kvm, pages, 1)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, PAGE_SIZE, 2 * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(init_mem_region, cpus[0], src, 0, pages, name="vcpu0")
        tg.spawn(punch, name="punch_hole")
    await finalize(vm)


@asyncvm.scenario(name="tdx_prefault_before_finalize", params={"pages": pages_param(4)})
async def tdx_prefault_before_finalize(kvm: Any, pages: int = 4) -> None:
    """KVM_PRE_FAULT_MEMORY on one vCPU while another builds the image, then FINALIZE.

    Hunts the mailing-list scenario: a pre-fault before finalization leaving a mirror mapping
    that never gets PAGE.ADD (FINALIZE then fails, or the S-EPT and the mirror disagree).
    pre_fault_allowed must stay false until RUNNABLE: the pre-fault must fail with -EOPNOTSUPP
    (errno oracle). Watched by tdx_premapped (a leaf installed before FINALIZE by anything but
    INIT_MEM_REGION; nr_premapped drift), mirror/S-EPT coherence and kvm_bug.
    """
    vm, _gmem, cpus, src = await build_td(kvm, pages, 2)

    async def prefault() -> None:
        await expect_prefault_refused(cpus[1], pages * PAGE_SIZE, "on a TD before KVM_TDX_FINALIZE_VM")

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(init_mem_region, cpus[0], src, 0, pages // 2, name="vcpu0")
        tg.spawn(prefault, name="vcpu1")
    await finalize(vm)


@asyncvm.scenario(name="tdx_post_finalize_faults_vs_punch_hole", params={"pages": pages_param(4)})
async def tdx_post_finalize_faults_vs_punch_hole(kvm: Any, pages: int = 4) -> None:
    """After FINALIZE, a vCPU faults private pages in (PAGE.AUG) while userspace punches them out.

    Hunts: S-EPT removal under mmu_lock write racing AUG under read, BUSY from the module (a vCPU
    in the guest holding the S-EPT tree) without the kick-and-retry, removing an entry twice.
    Watched by kvm_bug, mirror/S-EPT coherence, tdx_freed_page and the stale-mapping oracles.
    """
    vm, gmem, cpus, src = await build_td(kvm, pages, 1)
    await init_mem_region(cpus[0], src, 0, 1)
    await finalize(vm)
    program = [GuestAccess.read(i * PAGE_SIZE) for i in range(pages)]

    async def guest() -> None:
        await run_guest(cpus[0], program)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, PAGE_SIZE, 2 * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(guest, name="vcpu0")
        tg.spawn(punch, name="punch_hole")
