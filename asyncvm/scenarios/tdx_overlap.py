"""TDX: two vCPUs populating overlapping parts of the image."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.uapi import PAGE_SIZE, KvmError

from .tdx import build_td, finalize


@asyncvm.scenario(name="tdx_init_mem_region_overlap", params={"pages": 4})
async def tdx_init_mem_region_overlap(kvm: Any, pages: int = 4) -> None:
    """Two vCPUs issue KVM_TDX_INIT_MEM_REGION over ranges that share a page.

    Whoever comes second finds the shared page already populated and must get -EEXIST
    ([6.11-6.19] kvm_gmem_populate() refuses an uptodate folio), skip it and go on. Hunts a
    populate that loses that check (double PAGE.ADD / double MR.EXTEND attempts). Watched by the
    errno oracle, PAGE.ADD-once, MR.EXTEND-once and mirror/S-EPT coherence.
    """
    vm, _gmem, cpus, src = await build_td(kvm, pages, 2)
    half = pages // 2

    async def populate(vcpu: Any, first: int, n: int) -> None:
        region = uapi.TdxInitMemRegion(src + first * PAGE_SIZE, first * PAGE_SIZE, n)
        while region.nr_pages:
            try:
                await vcpu.tdx_init_mem_region(region, uapi.KVM_TDX_MEASURE_MEMORY_REGION)
            except KvmError as e:
                if e.errno == uapi.EINTR:
                    continue
                expect_errno(e, {uapi.EEXIST}, "KVM_TDX_INIT_MEM_REGION of a populated page")
                # The struct points at the page that failed: step over it.
                region.source_addr += PAGE_SIZE
                region.gpa += PAGE_SIZE
                region.nr_pages -= 1

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(populate, cpus[0], 0, half + 1, name="vcpu0")
        tg.spawn(populate, cpus[1], half, pages - half, name="vcpu1")
    await finalize(vm)
