"""Scenarios that settle the design questions of the mailing-list threads (``asyncvm compare``).

Each declares the profiles it is meaningful for: the merged kernel the design was argued against
and the design profiles (``asyncvm profiles``) that answer the question differently. Their checks
are what the VMM relies on (the image it built is the image it asked for, FINALIZE succeeds, the
pre-fault loop of the selftest terminates with progress or an error, never both).
"""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.explore.known import Known
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime.failures import Violation
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import pre_fault, private_vm, run_guest
from .snp import _launch_update, _launched_vm
from .tdx import build_td, finalize, init_mem_region, init_mem_region_split

VCPU0_DESIGNS = ("6.18", "7.0", "tdx-init-mem-region-vcpu0", "tdx-init-mem-region-vcpu0-locked")
PREFAULT_DESIGNS = ("6.18", "7.0", "prefault-before-finalize")
MAP_MEMORY_DESIGNS = ("6.18", "7.0", "map-memory-v2")
POPULATE_DESIGNS = ("6.10", "6.18", "7.0", "populate-no-uptodate-check", "populate-zeroes-at-fallocate")
#: [6.10] fallocate() ran the arch prepare hook: SNP's LAUNCH_UPDATE then finds the page assigned
PREPARING_FALLOCATE_6_10 = Known(
    ("errno",),
    "fallocate() zeroed and prepared (RMP-assigned) the folios, so KVM_SEV_SNP_LAUNCH_UPDATE of them fails -EIO",
    'virt/kvm/guest_memfd.c: kvm_gmem_allocate(); fixed in 6.11 by "KVM: guest_memfd: delay '
    'kvm_gmem_prepare_folio() until the memory is passed to the guest"',
)

#: what each design's thread predicted, reported as that design's behaviour (not a new finding)
VCPU0_PREDICTED = Known(
    ("kvm_bug", "tdx_image"),
    "the per-VM kvm_tdx->source_pa is shared by unserialized INIT_MEM_REGION callers: a page gets "
    "another call's source, the other hook finds the field consumed, or their SEAMCALLs meet BUSY",
    "design tdx-init-mem-region-vcpu0 (TDX KVM series v18/v19); the merged design passes the source "
    "per call through kvm_gmem_populate() (6.16)",
)
PREFAULT_PREDICTED = Known(
    ("tdx_premapped", "errno"),
    "a pre-fault before FINALIZE leaves mirror SPTEs with no S-EPT entry (and prepared folios that "
    "INIT_MEM_REGION then refuses), so FINALIZE refuses",
    "design prefault-before-finalize; the merged kernel keeps pre_fault_allowed false until tdx_td_finalize() (6.16)",
)
MAP_MEMORY_PREDICTED = Known(
    ("errno", "prefault_progress"),
    "RET_PF_RETRY reaches userspace as -EAGAIN and an error is returned after progress",
    "design map-memory-v2 (KVM_MAP_MEMORY RFC v2); merged as KVM_PRE_FAULT_MEMORY (6.11)",
)


def check_td_image(vm: Any, src: bytes, pages: int) -> None:
    """Every page of the TD image holds what its source page held (read through the S-EPT leaf)."""
    module = vm.tdx_module
    allocator = vm.kvm.allocator
    for gfn in range(pages):
        leaf = module.sept.get(gfn)
        if leaf is None:
            raise Violation("tdx_image", f"gfn {gfn:#x} is not in the TD image", signature="tdx_image:missing")
        folio = allocator.folio_at(leaf.pfn)
        got = folio.read_page(leaf.pfn - folio.pfn) if folio is not None else b""
        want = src[gfn * PAGE_SIZE : (gfn + 1) * PAGE_SIZE]
        if got != want:
            raise Violation(
                "tdx_image",
                f"gfn {gfn:#x} of the TD image holds source page {got[:1].hex() or '?'}, not {want[:1].hex()}: "
                "PAGE.ADD copied another call's source (and MR.EXTEND measured it)",
                signature="tdx_image:contents",
                gfn=gfn,
            )


@asyncvm.scenario(
    name="tdx_init_mem_region_threads",
    params={"vcpus": 2, "pages": 4},
    profiles=VCPU0_DESIGNS,
    known={"tdx-init-mem-region-vcpu0": VCPU0_PREDICTED},
)
async def tdx_init_mem_region_threads(kvm: Any, vcpus: int = 2, pages: int = 4) -> None:
    """Several VMM threads build one TD image, each with measured INIT_MEM_REGION on its own vCPU.

    Settles the vCPU-0 scratch-page question: with the source passed per call (6.16+) or the
    scratch field under the lock it needed, every page holds its own source; with the per-VM
    ``source_pa`` shared by unserialized callers, a page gets another call's contents (and MRTD
    measures them) or the S-EPT hook finds the field consumed (KVM_BUG_ON). Watched by kvm_bug,
    the image check after FINALIZE, PAGE.ADD-once and MR.EXTEND-once.
    """
    vcpus = max(2, vcpus)
    vm, _gmem, cpus, src = await build_td(kvm, pages, vcpus)
    image = await kvm.mm.read(src, pages * PAGE_SIZE)
    await init_mem_region_split(cpus, src, pages)
    await finalize(vm)
    check_td_image(vm, image, pages)


@asyncvm.scenario(
    name="tdx_prefault_then_finalize",
    params={"pages": 4},
    profiles=PREFAULT_DESIGNS,
    known={"prefault-before-finalize": PREFAULT_PREDICTED},
)
async def tdx_prefault_then_finalize(kvm: Any, pages: int = 4) -> None:
    """A VMM pre-faults the whole private range on vCPU 1 while vCPU 0 adds the first half of the
    image, then finalizes.

    Merged kernels refuse the pre-fault before FINALIZE (-EOPNOTSUPP) and the launch succeeds.
    With pre-fault allowed before finalization, the pre-faulted GPAs that no INIT_MEM_REGION
    covers have a mirror SPTE and no S-EPT entry, and FINALIZE refuses (-EINVAL: pages premapped
    without PAGE.ADD). Watched by the errno oracle (FINALIZE may only be retried on EBUSY) and the
    TDX premap oracles.
    """
    vm, _gmem, cpus, src = await build_td(kvm, pages, 2)

    async def prefault() -> None:
        await pre_fault(cpus[1], 0, pages * PAGE_SIZE, tolerate=(uapi.EOPNOTSUPP,))

    async def populate() -> None:
        try:
            await init_mem_region(cpus[0], src, 0, max(1, pages // 2))
        except KvmError as e:
            # a pre-faulted (prepared) folio is uptodate: populate refuses it with -EEXIST
            expect_errno(e, (), "KVM_TDX_INIT_MEM_REGION")

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(populate, name="vcpu0")
        tg.spawn(prefault, name="vcpu1")
    try:
        await finalize(vm)
    except KvmError as e:
        expect_errno(e, (), "KVM_TDX_FINALIZE_VM")


@asyncvm.scenario(
    name="prefault_loop_vs_punch_hole",
    params={"pages": 4},
    profiles=MAP_MEMORY_DESIGNS,
    known={"map-memory-v2": MAP_MEMORY_PREDICTED},
)
async def prefault_loop_vs_punch_hole(kvm: Any, pages: int = 4) -> None:
    """The pre_fault_memory_test loop (re-issue after progress or EINTR; progress XOR error) on a
    private slot while userspace punches a hole in it.

    Settles the KVM_MAP_MEMORY RFC v2 question: the merged ioctl retries an invalidation in the
    kernel and reports any progress as success, so this loop is all a VMM needs; the RFC v2
    returned -EAGAIN on RET_PF_RETRY (the loop must learn a new errno) and the error even after
    progress (the selftest's "progress XOR error" assertion breaks). Watched by the errno oracle
    and the loop's own assertion.
    """
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, pages)
    vcpu = await vm.create_vcpu(0)

    async def prefault() -> None:
        r = uapi.PreFaultMemory(0, pages * PAGE_SIZE)
        while r.size:
            before = r.size
            try:
                await vcpu.pre_fault_memory(r)
            except KvmError as e:
                if r.size < before:
                    raise Violation(
                        "prefault_progress",
                        f"KVM_PRE_FAULT_MEMORY failed with {uapi.errno_name(e.errno or 0)} after mapping "
                        f"{before - r.size:#x} bytes; the selftest expects progress or an error, not both",
                        signature="prefault_progress:error_after_progress",
                    ) from None
                if e.errno == uapi.EINTR:
                    continue
                expect_errno(e, (), "KVM_PRE_FAULT_MEMORY")
            else:
                if r.size >= before:
                    raise Violation(
                        "prefault_progress",
                        "KVM_PRE_FAULT_MEMORY returned 0 without progress",
                        signature="prefault_progress:success_without_progress",
                    )

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, PAGE_SIZE, 2 * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(prefault, name="vcpu0")
        tg.spawn(punch, name="punch_hole")


PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


# LAUNCH_UPDATE turns a first-page -EINTR into -EIO: signals would only end runs early.
@asyncvm.scenario(
    name="populate_sequences",
    params={"vm": "snp", "pages": 4},
    profiles=POPULATE_DESIGNS,
    data={"signal": 0.0},
    known={"6.10": PREPARING_FALLOCATE_6_10},
)
async def populate_sequences(kvm: Any, vm: str = "snp", pages: int = 4) -> None:
    """The populate thread's sequences on the SNP (vm="snp") or TDX (vm="tdx") launch path:
    fallocate then populate the first half; fallocate, PUNCH_HOLE, then populate the second half;
    then finish the launch.

    A VMM may pre-allocate its guest_memfd before launch, so each sequence must work. It fails
    only where fallocate() prepares the folios (6.10: SNP's RMP-assigned pages refuse
    LAUNCH_UPDATE); clearing and marking folios uptodate at fallocate (uptodate = cleared) or
    dropping the uptodate check from populate both keep it working. Watched by the errno oracle
    and the SNP/TDX launch oracles.
    """
    half = max(1, pages // 2)
    if vm == "tdx":
        td, gmem, cpus, src = await build_td(kvm, pages, 1)

        async def populate(gfn: int, n: int) -> None:
            await init_mem_region(cpus[0], src, gfn, n)
    elif vm == "snp":
        td, gmem, src = await _launched_vm(kvm, pages)

        async def populate(gfn: int, n: int) -> None:
            await _launch_update(td, src, gfn, n)
    else:
        raise ValueError(f"vm must be snp or tdx, not {vm!r}")
    what = "KVM_TDX_INIT_MEM_REGION" if vm == "tdx" else "KVM_SEV_SNP_LAUNCH_UPDATE"
    try:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, half * PAGE_SIZE)
        await populate(0, half)
        if pages > half:
            await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, half * PAGE_SIZE, (pages - half) * PAGE_SIZE)
            await gmem.fallocate(PUNCH, half * PAGE_SIZE, (pages - half) * PAGE_SIZE)
            await populate(half, pages - half)
    except KvmError as e:
        expect_errno(e, (), f"{what} after fallocate")
    if vm == "tdx":
        await finalize(td)
    else:
        await td.snp_launch_finish()


GMEM_STATE_DESIGNS = ("6.18", "7.0", "gmem-bind-preserves-data", "gmem-unbound-state")
PREBIND_PREDICTED = Known(
    ("rmp_guest_shared", "gmem_prebind_data"),
    "data the host wrote into the memfile before binding stays in the folio the guest then uses as "
    "private memory: unmeasured on SNP (never RMP-assigned), visible on a SW-protected VM",
    "design gmem-bind-preserves-data (the fd-based private memory proposal, 2021-22); mainline "
    "guest_memfd is private from creation and refuses host faults without INIT_SHARED",
)


@asyncvm.scenario(
    name="gmem_write_before_bind",
    params={"vm": "snp"},
    profiles=GMEM_STATE_DESIGNS,
    data={"signal": 0.0},
    known={"gmem-bind-preserves-data": PREBIND_PREDICTED},
)
async def gmem_write_before_bind(kvm: Any, vm: str = "snp") -> None:
    """A VMM writes into its guest_memfd (mmap, GUEST_MEMFD_FLAG_MMAP) before binding it, then
    binds it PRIVATE, launches the other page and lets the guest read the page it never launched.

    The fd-based proposal's question, made concrete: where the memfile starts shared and keeps
    its data, the guest finds the host's bytes in private memory (SW-protected: visible; SNP: a
    private access to a page the RMP never assigned; TDX: the module's ACCEPT zeroes it). Where it
    starts UNBOUND (or, mainline, private from creation), the write is refused and the guest reads
    zeros. vm: "sw", "snp" or "tdx". Watched by the SNP RMP oracles and the guest's own check.
    """
    pages = 2
    kinds = {"sw": uapi.KVM_X86_SW_PROTECTED_VM, "snp": uapi.KVM_X86_SNP_VM, "tdx": uapi.KVM_X86_TDX_VM}
    if vm not in kinds:
        raise ValueError(f"vm must be one of {', '.join(kinds)}, not {vm!r}")
    td = await kvm.create_vm(kinds[vm])
    if vm == "tdx":
        await td.tdx_init_vm()
    elif vm == "snp":
        await td.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
    gmem = await td.create_guest_memfd(size=pages * PAGE_SIZE, flags=uapi.GUEST_MEMFD_FLAG_MMAP)
    try:
        host = kvm.mm.mmap(pages * PAGE_SIZE, fd=gmem, offset=0, shared=True)
        await kvm.mm.write(host, b"\xee" * 8)
    except (KvmError, asyncvm.SigBus):
        pass  # refused before binding: nothing of the host's reaches the guest
    hva = kvm.mm.mmap(pages * PAGE_SIZE)
    await td.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, pages * PAGE_SIZE, hva, 0, gmem)
    )
    await td.set_memory_attributes(uapi.MemoryAttributes(0, pages * PAGE_SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    src = kvm.mm.mmap(PAGE_SIZE)
    await kvm.mm.write(src, b"\x5a" * PAGE_SIZE)
    vcpu = await td.create_vcpu(0)
    if vm == "tdx":
        await vcpu.tdx_init_vcpu()
        await vcpu.tdx_init_mem_region(uapi.TdxInitMemRegion(src, PAGE_SIZE, 1), uapi.KVM_TDX_MEASURE_MEMORY_REGION)
        await finalize(td)
    elif vm == "snp":
        update = uapi.SevSnpLaunchUpdate(1, src, PAGE_SIZE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        while update.len:
            await td.snp_launch_update(update)
        await td.snp_launch_finish()
    reads = await run_guest(vcpu, [GuestAccess.read(0, 8, private=True)])
    if reads and reads[0] != bytes(8):
        raise Violation(
            "gmem_prebind_data",
            f"the guest read {reads[0].hex()} from private memory nobody launched: the host's pre-binding write",
            signature="gmem_prebind_data:visible",
        )
