"""TDX: the state-changing ioctls (INIT_VCPU, INIT_MEM_REGION) racing each other and PUNCH_HOLE.

Until 6.18, KVM_TDX_INIT_VCPU held only the caller's vcpu->mutex and INIT_MEM_REGION only its own
vcpu->mutex and slots_lock, so nothing kept a TDH.VP.CREATE/INIT on one vCPU from meeting a
PAGE.ADD or MR.EXTEND issued through another, or a zap's RANGE.BLOCK, inside the TDX module's
try-locks: the SEAMCALL that loses gets TDX_OPERAND_BUSY and KVM turns it into a KVM_BUG_ON.
The 6.19 TDX overhaul ("Guard VM state transitions with "all" the locks", tdx.c:
tdx_acquire_vm_state_locks(): kvm->lock, every vcpu->mutex via kvm_lock_all_vcpus(), slots_lock;
"Take MMU lock around tdh_vp_init()") serializes them. On the 6.18 profile these scenarios fail
because the kernel really did; on 7.0 they run clean.
"""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.check.errno import expect_errno
from asyncvm.explore.known import Known
from asyncvm.uapi import PAGE_SIZE, KvmError

from .common import private_vm
from .tdx import finalize, init_mem_region

#: the kernel profiles these races are meaningful for: the one that has them, the one that fixed them
STATE_IOCTL_PROFILES = ("6.18", "7.0")

#: [6.18] the races are the kernel's own, fixed in the 6.19 TDX overhaul ("7.0" here)
KNOWN_6_18_INIT = Known(
    ("kvm_bug", "errno"),
    "KVM_TDX_INIT_VCPU held only its own vcpu->mutex, so TDH.VP.CREATE/INIT met another vCPU's "
    "INIT_MEM_REGION PAGE.ADD/MR.EXTEND BUSY on the TDR (KVM_BUG_ON, or -EBUSY to userspace)",
    'arch/x86/kvm/vmx/tdx.c: tdx_vcpu_unlocked_ioctl(); fixed by "KVM: TDX: Guard VM state transitions '
    'with "all" the locks" (tdx_acquire_vm_state_locks(), 6.19)',
)
KNOWN_6_18_PUNCH = Known(
    ("kvm_bug",),
    "TDH.VP.INIT (the TDR exclusively) ran outside mmu_lock, so the zap's TDH.MEM.RANGE.BLOCK or "
    "PAGE.REMOVE under mmu_lock met it BUSY (or VP.CREATE/INIT lost to them): KVM_BUG_ON",
    'arch/x86/kvm/vmx/tdx.c: tdx_td_vcpu_init(); fixed by "KVM: TDX: Take MMU lock around tdh_vp_init()" '
    "and the all-locks guard (6.19)",
)


async def _td_with_vcpus(kvm: Any, pages: int, vcpus: int) -> tuple[Any, Any, list[Any], int]:
    """INIT_VM, a private slot, `vcpus` vCPUs created (only vcpu0 INIT_VCPU'd), a source image."""
    vm, gmem, _hva = await private_vm(kvm, uapi.KVM_X86_TDX_VM, pages)
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    await cpus[0].tdx_init_vcpu()
    src = await kvm.mm.mmap(pages * PAGE_SIZE)
    await kvm.mm.write(src, b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(pages)))
    return vm, gmem, cpus, src


async def init_vcpu(vcpu: Any) -> None:
    """KVM_TDX_INIT_VCPU, re-issued after EINTR (a signal before the vCPU locks were all taken);
    any other errno is one the VMM has no answer for (the errno oracle)."""
    while True:
        try:
            await vcpu.tdx_init_vcpu()
            return
        except KvmError as e:
            if e.errno != uapi.EINTR:
                expect_errno(e, (), "KVM_TDX_INIT_VCPU")


async def populate(vcpu: Any, src: int, gfn: int, n: int) -> None:
    """Measured INIT_MEM_REGION of the whole range; [6.18] a PAGE.ADD that met another vCPU's
    SEAMCALL BUSY comes back as -EBUSY, which no VMM retries (the errno oracle reports it)."""
    try:
        await init_mem_region(vcpu, src, gfn, n)
    except KvmError as e:
        expect_errno(e, (), "KVM_TDX_INIT_MEM_REGION")


@asyncvm.scenario(
    name="tdx_init_mem_region_vs_init_vcpu",
    params={"vcpus": 3, "pages": 3},
    profiles=STATE_IOCTL_PROFILES,
    known={"6.18": KNOWN_6_18_INIT},
)
async def tdx_init_mem_region_vs_init_vcpu(kvm: Any, vcpus: int = 3, pages: int = 3) -> None:
    """vCPU 0 builds the image with measured INIT_MEM_REGION while the other vCPUs are INIT_VCPU'd.

    [6.18] INIT_VCPU holds only its own vcpu->mutex: TDH.VP.CREATE/INIT meet PAGE.ADD and
    MR.EXTEND (all take the TDR) BUSY inside the TDX module, and KVM_BUG_ONs (TDX_BUG_ON on
    VP.CREATE/INIT or MR.EXTEND). [7.0] both ioctls take kvm->lock, every vcpu->mutex and
    slots_lock (tdx_acquire_vm_state_locks()): serialized, clean. Watched by kvm_bug, PAGE.ADD-once,
    MR.EXTEND-once and mirror/S-EPT coherence.
    """
    vm, _gmem, cpus, src = await _td_with_vcpus(kvm, pages, max(2, vcpus))
    async with asyncvm.TaskGroup() as tg:
        tg.spawn(populate, cpus[0], src, 0, pages, name="vcpu0")
        for v in cpus[1:]:
            tg.spawn(init_vcpu, v, name=f"vcpu{v.vcpu_id}")
    await finalize(vm)


@asyncvm.scenario(
    name="tdx_init_vcpu_vs_punch_hole",
    params={"pages": 4},
    profiles=STATE_IOCTL_PROFILES,
    known={"6.18": KNOWN_6_18_PUNCH},
)
async def tdx_init_vcpu_vs_punch_hole(kvm: Any, pages: int = 4) -> None:
    """With part of the image added, vCPU 1 is INIT_VCPU'd while userspace punches a hole in it.

    [6.18] TDH.VP.INIT (the TDR exclusively) runs outside mmu_lock, so the zap's TDH.MEM.RANGE.BLOCK
    (under mmu_lock for write; "no-fail": one retry after kicking the vCPUs) can meet it BUSY and
    KVM_BUG_ON. [7.0] tdx_vcpu_init() wraps TDH.VP.INIT in mmu_lock for write: clean. Watched by
    kvm_bug, tdx_freed_page and mirror/S-EPT coherence.
    """
    vm, gmem, cpus, src = await _td_with_vcpus(kvm, pages, 2)
    await init_mem_region(cpus[0], src, 0, pages)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, pages * PAGE_SIZE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(init_vcpu, cpus[1], name="vcpu1")
        tg.spawn(punch, name="punch_hole")
    await finalize(vm)
