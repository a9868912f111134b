"""Every SEV-SNP oracle can fire (ISSUE 6; DESIGN.md "Correctness rules"): each test monkeypatches
the model into the buggy form its oracle exists to catch, shows the oracle firing, and runs the
same scenario clean without it. Oracles: rmp_host_write, rmp_freed_private (at the free and at
quiescence), snp_double_launch, snp_prepare_before_finish, rmp_guest_shared."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.x86.sev import snp
from asyncvm.x86.sev.firmware import SnpFirmware
from asyncvm.x86.svm import svm_x86_ops

from .helpers import PAGE, PUNCH, errno_of, image, run_failing, run_guest, run_once, snp_vm, source, tolerate

NORMAL = uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL


def update(gfn: int, uaddr: int, npages: int = 1, page_type: int = NORMAL) -> uapi.SevSnpLaunchUpdate:
    return uapi.SevSnpLaunchUpdate(gfn, uaddr, npages * PAGE, page_type)


# -- rmp_host_write: the host writes a page the RMP assigns to the guest -------------------------------------


def post_populate_without_the_rmp_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """sev.c: sev_gmem_post_populate() without its snp_lookup_rmpentry() "already assigned ->
    -EEXIST" check: it copies the source into whatever page it is given."""
    post_populate = snp.sev_gmem_post_populate

    async def unchecked(vm: Any, *args: Any) -> int:
        fw = snp.to_kvm_sev(vm).firmware
        fw.lookup = lambda pfn: None  # type: ignore[method-assign]
        try:
            r: int = await post_populate(vm, *args)
            return r
        finally:
            del fw.lookup

    monkeypatch.setattr(snp, "sev_gmem_post_populate", unchecked)


async def launch_a_page_twice(kvm: asyncvm.Kvm) -> None:
    vm, _gmem, _hva = await snp_vm(kvm, 2)
    src = await source(kvm, image(1))
    await vm.snp_launch_update(update(0, src))
    assert await tolerate(vm.snp_launch_update(update(0, src))) == uapi.EIO


async def fallocate_then_launch(kvm: asyncvm.Kvm) -> None:
    vm, gmem, _hva = await snp_vm(kvm, 2)
    src = await source(kvm, image(1))
    await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 2 * PAGE)
    await tolerate(vm.snp_launch_update(update(0, src)))


@pytest.mark.parametrize(
    ("profile", "body"),
    [("7.0", launch_a_page_twice), ("6.10", fallocate_then_launch)],
    ids=["7.0-second-launch", "6.10-fallocate-prepared"],
)
def test_rmp_host_write_fires_when_post_populate_skips_the_rmp_check(
    profile: str, body: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sev.c: sev_gmem_post_populate(): the RMP check is the only thing standing between
    LAUNCH_UPDATE and an assigned page when gmem has no -EEXIST ([G20] second launch, [6.10] a
    folio fallocate() already prepared); without it the host writes guest-owned memory, an RMP
    #PF on real hardware (kvm-coco.md 0.18, 4.2)."""
    run_once(body, profile=profile)
    post_populate_without_the_rmp_check(monkeypatch)
    failure = run_failing(body, profile=profile)
    assert failure.signature == "rmp_host_write", failure


# -- rmp_freed_private: a page freed while the RMP still assigns it -----------------------------------------


async def refused_cpuid_page_then_punch(kvm: asyncvm.Kvm) -> None:
    vm, gmem, _hva = await snp_vm(kvm, 2)
    vm.snp_firmware.cpuid_forbidden[(0x7, "ebx")] = 1 << 5
    page = bytearray(PAGE)
    page[0] = 1  # one entry: function 0x7 with the refused ebx bit set
    page[16] = 0x7
    page[16 + 28] = 1 << 5
    src = await source(kvm, bytes(page))
    assert await tolerate(vm.snp_launch_update(update(1, src, 1, uapi.KVM_SEV_SNP_PAGE_TYPE_CPUID))) == uapi.EIO
    await gmem.fallocate(PUNCH, PAGE, PAGE)


def test_rmp_freed_private_fires_when_a_refused_page_is_not_reclaimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """sev.c: sev_gmem_post_populate(): a firmware LAUNCH_UPDATE failure must snp_page_reclaim()
    the page and make it shared again; skipped, the page stays firmware-owned (immutable) and
    guest_memfd frees it to the host on PUNCH_HOLE (kvm-coco.md 0.19, 4.3)."""
    run_once(refused_cpuid_page_then_punch)

    async def skipped(self: SnpFirmware, pfn: int) -> int:
        return 0

    monkeypatch.setattr(SnpFirmware, "snp_page_reclaim", skipped)
    monkeypatch.setattr(SnpFirmware, "rmpupdate_shared", skipped)
    failure = run_failing(refused_cpuid_page_then_punch)
    assert failure.signature == "rmp_freed_private", failure
    assert "firmware" in failure.message


def no_gmem_invalidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_free_folio() without kvm_arch_gmem_invalidate() (sev.c:
    sev_gmem_invalidate()): freed pages keep their RMP entries."""
    monkeypatch.setattr(svm_x86_ops, "gmem_invalidate", None)


async def launch_then_punch(kvm: asyncvm.Kvm) -> None:
    vm, gmem, _hva = await snp_vm(kvm, 2)
    src = await source(kvm, image(2))
    await vm.snp_launch_update(update(0, src, 2))
    await gmem.fallocate(PUNCH, PAGE, PAGE)
    await vm.snp_launch_finish()


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_rmp_freed_private_fires_when_freed_pages_stay_assigned(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sev.c: sev_gmem_invalidate() on free_folio returns every assigned pfn to shared (RMPUPDATE,
    no reclaim needed for a Guest-Valid launched page); without it the host allocator hands out
    memory the RMP still gives to the guest (kvm-coco.md 4.5)."""
    run_once(launch_then_punch, profile=profile)
    no_gmem_invalidate(monkeypatch)
    failure = run_failing(launch_then_punch, profile=profile)
    assert failure.signature == "rmp_freed_private", failure
    assert "still assigned" in failure.message


# -- snp_double_launch --------------------------------------------------------------------------------------------


async def launch_punch_relaunch(kvm: asyncvm.Kvm) -> None:
    vm, gmem, _hva = await snp_vm(kvm, 2)
    src = await source(kvm, image(1))
    await vm.snp_launch_update(update(0, src))
    await gmem.fallocate(PUNCH, 0, PAGE)
    await tolerate(vm.snp_launch_update(update(0, src)))
    await vm.snp_launch_finish()


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_snp_double_launch_fires_when_a_gpa_is_launched_while_its_page_is_still_assigned(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sev.c: sev_gmem_invalidate(): PUNCH_HOLE of a launched page must return it to shared before
    the GPA can be populated again (a new folio); without it the same GPA is launched twice while
    the first page is still the guest's (kvm-coco.md 4.6 "do not allow populating the same page
    twice"). With the free hook, punching and re-launching is legitimate."""
    run_once(launch_punch_relaunch, profile=profile)
    no_gmem_invalidate(monkeypatch)
    failure = run_failing(launch_punch_relaunch, profile=profile)
    assert failure.signature == "snp_double_launch", failure


# -- snp_prepare_before_finish ---------------------------------------------------------------------------------------


async def pre_fault_while_launching(kvm: asyncvm.Kvm) -> None:
    vm, _gmem, _hva = await snp_vm(kvm, 4)
    vcpu = await vm.create_vcpu(0)
    src = await source(kvm, image(2))
    await vm.snp_launch_update(update(0, src, 2))
    r = uapi.PreFaultMemory(0, 4 * PAGE)
    assert await errno_of(vcpu.pre_fault_memory(r)) == uapi.EOPNOTSUPP
    await vm.snp_launch_finish()


def allow_pre_fault_from_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    """svm.c: svm_vm_init() that sets pre_fault_allowed for an SNP VM at creation."""
    vm_init = svm_x86_ops.vm_init

    def allowed_from_creation(vm: Any) -> Any:
        sev = vm_init(vm)
        vm.arch.pre_fault_allowed = True
        return sev

    monkeypatch.setattr(svm_x86_ops, "vm_init", allowed_from_creation)


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_snp_prepare_before_finish_fires_when_pre_fault_is_allowed_from_creation(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """svm.c: svm_vm_init() must leave pre_fault_allowed false for SNP until snp_launch_finish()
    (Paolo Bonzini, "KVM: x86: disallow pre-fault for SNP VMs before initialization"); with it
    true from creation a pre-fault RMP-assigns pages before LAUNCH_FINISH (sev_gmem_prepare())."""
    run_once(pre_fault_while_launching, profile=profile)

    allow_pre_fault_from_creation(monkeypatch)
    failure = run_failing(pre_fault_while_launching, profile=profile)
    assert failure.signature == "snp_prepare_before_finish", failure


def test_the_pre_fault_race_campaign_catches_the_early_pre_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered race (asyncvm/scenarios/snp.py: snp_launch_update_vs_prefault) with pre-fault allowed from
    creation: the campaign reports snp_prepare_before_finish."""

    allow_pre_fault_from_creation(monkeypatch)
    report = asyncvm.explore("snp_launch_update_vs_prefault", strategy="pct", runs=200, seed=3)
    assert report.failing_runs == report.runs, report.summary()
    assert report.first("snp_prepare_before_finish") is not None, report.summary()


# -- rmp_guest_shared ------------------------------------------------------------------------------------------------


async def launch_finish_and_run(kvm: asyncvm.Kvm) -> None:
    vm, _gmem, _hva = await snp_vm(kvm, 2)
    src = await source(kvm, image(1))
    await vm.snp_launch_update(update(0, src))
    await vm.snp_launch_finish()
    vcpu = await vm.create_vcpu(0)
    await run_guest(vcpu, [GuestAccess.read(0, 8), GuestAccess.read(PAGE, 8)])


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_rmp_guest_shared_fires_when_a_fault_skips_the_rmp_assignment(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sev.c: sev_gmem_prepare() must RMP-assign a page before KVM maps it private; a prepare hook
    that does nothing lets the guest's private access reach a hypervisor-owned page (kvm-coco.md
    4.4)."""
    run_once(launch_finish_and_run, profile=profile)

    async def prepare_nothing(vm: Any, pfn: int, gfn: int, order: int) -> int:
        return 0

    monkeypatch.setattr(svm_x86_ops, "gmem_prepare", prepare_nothing)
    failure = run_failing(launch_finish_and_run, profile=profile)
    assert failure.signature == "rmp_guest_shared", failure
