"""TDX: two vCPUs populating overlapping parts of the image."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.explore.known import Known
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import pages_param
from .tdx import build_td, finalize

#: [6.10] (the profile's gmem, with no populate -EEXIST and the [T16] TDX flow): the overlap adds
#: the shared page twice, the behaviour the -EEXIST check was added for.
KNOWN_6_10 = Known(
    ("tdx_double_add",),
    "kvm_gmem_populate() without the uptodate-folio -EEXIST check lets the second INIT_MEM_REGION "
    "PAGE.ADD a page already in the TD image",
    'virt/kvm/guest_memfd.c: kvm_gmem_populate(); the check came in 6.11 ("do not allow populating the '
    'same page twice")',
)


@asyncvm.scenario(
    name="tdx_init_mem_region_overlap", params={"pages": pages_param(4, low=2)}, known={"6.10": KNOWN_6_10}
)
async def tdx_init_mem_region_overlap(kvm: Any, pages: int = 4) -> None:
    """Two vCPUs issue KVM_TDX_INIT_MEM_REGION over ranges that share a page.

    Whoever comes second finds the shared page already populated, gets an error, skips the page
    and goes on: -EEXIST [6.11-6.19] (kvm_gmem_populate() refuses an uptodate folio), -EIO [7.0]
    (no gmem check any more; kvm_tdp_mmu_map_private_pfn() finds the identical mirror SPTE,
    RET_PF_SPURIOUS, and returns -EIO: arch/x86/kvm/mmu/mmu.c). Hunts a populate that loses that
    check (double PAGE.ADD / double MR.EXTEND attempts). Watched by the errno oracle, PAGE.ADD-once,
    MR.EXTEND-once and mirror/S-EPT coherence.
    """
    vm, _gmem, cpus, src = await build_td(kvm, pages, 2)
    half = pages // 2
    # What the second INIT_MEM_REGION of a page gets, as the profile's kernel answers it.
    populated = uapi.EEXIST if kvm.profile.gmem_populate_eexist or kvm.profile.tdx_flow == "T16" else uapi.EIO

    async def populate(vcpu: Any, first: int, n: int) -> None:
        region = uapi.TdxInitMemRegion(src + first * PAGE_SIZE, first * PAGE_SIZE, n)
        while region.nr_pages:
            try:
                await vcpu.tdx_init_mem_region(region, uapi.KVM_TDX_MEASURE_MEMORY_REGION)
            except KvmError as e:
                if e.errno == uapi.EINTR:
                    continue
                expect_errno(e, {populated}, "KVM_TDX_INIT_MEM_REGION of a populated page")
                # The struct points at the page that failed: step over it.
                region.source_addr += PAGE_SIZE
                region.gpa += PAGE_SIZE
                region.nr_pages -= 1

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(populate, cpus[0], 0, half + 1, name="vcpu0")
        tg.spawn(populate, cpus[1], half, pages - half, name="vcpu1")
    await finalize(vm)
