"""Every TDX oracle can fire (ISSUE 5d; DESIGN.md "Correctness rules"): each test injects the bug
its oracle exists to catch -- a named bug from asyncvm.bugs, or a model function monkeypatched
into its buggy form -- shows the oracle firing, and the same scenario runs clean without it.

Oracles: tdx_premapped (a private leaf before FINALIZE from anything but INIT_MEM_REGION;
nr_premapped negative, drifting, or non-zero after FINALIZE), sept_incoherent (mirror vs S-EPT),
tdx_freed_page (a freed page still in the S-EPT), tdx_double_extend, tdx_double_add,
tdx_missing_add, and kvm_bug for the must-not-fail removal SEAMCALLs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.scenarios import tdx as tdx_scenarios
from asyncvm.x86.tdx import tdx as tdx_mod
from asyncvm.x86.tdx.module import TDX_SUCCESS, TdxModule
from asyncvm.x86.tdx.tdx import to_kvm_tdx
from asyncvm.x86.vmx import vt_x86_ops

from .helpers import MEASURE, PAGE, PUNCH, Td, build_td, run_failing, run_guest, run_once, tolerate

PROFILES = pytest.mark.parametrize("profile", ["6.18", "7.0"])


async def add_pages(td: Td, first: int, n: int, flags: int = MEASURE) -> None:
    region = uapi.TdxInitMemRegion(td.src + first * PAGE, first * PAGE, n)
    await td.vcpus[0].tdx_init_mem_region(region, flags)


# -- tdx_premapped: a private leaf before FINALIZE that INIT_MEM_REGION did not make ----------------


async def pre_fault_then_build(kvm: asyncvm.Kvm) -> None:
    td = await build_td(kvm, image_pages=2, vcpus=2)
    r = uapi.PreFaultMemory(0, 4 * PAGE)
    assert await tolerate(td.vcpus[1].pre_fault_memory(r)) == uapi.EOPNOTSUPP
    await add_pages(td, 0, 2)
    await td.vm.tdx_finalize_vm()


@PROFILES
def test_tdx_premapped_fires_when_pre_fault_is_allowed_before_finalize(profile: str) -> None:
    """bugs.py: prefault_allowed_before_finalize (tdx.c: tdx_td_finalize() sets pre_fault_allowed
    only after RUNNABLE; mmu.c: kvm_arch_vcpu_pre_fault_memory()): the pre-fault installs a
    private leaf that never gets PAGE.ADD (kvm-coco.md 5.3) -- caught at the install, ahead of the
    kernel's KVM_BUG_ON(pre_fault_allowed) backstop in tdx_sept_set_private_spte()."""
    run_once(pre_fault_then_build, profile=profile)
    failure = run_failing(pre_fault_then_build, profile=profile, bugs=["prefault_allowed_before_finalize"])
    assert failure.signature == "tdx_premapped:not_populate", failure


@PROFILES
def test_the_pre_fault_race_campaign_catches_the_early_pre_fault_in_every_run(profile: str) -> None:
    """The registered race (asyncvm/scenarios/tdx.py: tdx_prefault_before_finalize) with the named bug: every
    schedule fails -- tdx_premapped at the pre-fault's install, the KVM_BUG_ON(pre_fault_allowed)
    backstop when INIT_MEM_REGION installs first, or -EEXIST when the pre-fault prepared the folio
    first ([G11] kvm_gmem_populate())."""
    report = asyncvm.explore(
        "tdx_prefault_before_finalize",
        strategy="pct",
        runs=200,
        seed=3,
        profile=profile,
        bugs=["prefault_allowed_before_finalize"],
    )
    assert report.failing_runs == report.runs == 200, report.summary()
    assert report.first("tdx_premapped:not_populate") is not None, report.summary()


def premap_counter_bug(monkeypatch: pytest.MonkeyPatch, delta: int) -> None:
    """tdx_gmem_post_populate() [T16] adjusting nr_premapped by `delta` more than it should after a
    successful PAGE.ADD (+1: the decrement forgotten; -1: decremented twice, e.g. once more on a
    zap of an already-ADDed entry, the hole Sean pointed at in kvm-coco.md 5.2)."""
    post_populate = tdx_mod.tdx_gmem_post_populate

    async def buggy(vm: Any, *args: Any) -> int:
        r: int = await post_populate(vm, *args)
        if r == 0:
            to_kvm_tdx(vm).nr_premapped += delta
        return r

    monkeypatch.setattr(tdx_mod, "tdx_gmem_post_populate", buggy)


async def build_and_finalize_tolerantly(kvm: asyncvm.Kvm) -> None:
    td = await build_td(kvm, image_pages=1)
    await tolerate(add_pages(td, 0, 1))
    await tolerate(td.vm.tdx_finalize_vm())


def test_tdx_premapped_fires_when_nr_premapped_goes_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c [T16]: nr_premapped counts mirror leaves waiting for PAGE.ADD; a second decrement after
    the last page's PAGE.ADD drives it below zero where no KVM_BUG_ON(--nr_premapped < 0) site
    looks (kvm-coco.md 5.1); FINALIZE then refuses, and the counter is negative."""
    run_once(build_and_finalize_tolerantly)
    premap_counter_bug(monkeypatch, -1)
    failure = run_failing(build_and_finalize_tolerantly)
    assert failure.signature == "tdx_premapped:negative", failure


def test_tdx_premapped_fires_when_nr_premapped_drifts_from_the_premapped_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tdx.c [T16]: with the decrement after PAGE.ADD forgotten, tdx_td_finalize() refuses with
    -EINVAL ("pages are pending for INIT_MEM_REGION") although nothing is premapped; the counter no
    longer matches the mirror leaves lacking an S-EPT leaf."""
    premap_counter_bug(monkeypatch, +1)
    failure = run_failing(build_and_finalize_tolerantly)
    assert failure.signature == "tdx_premapped:drift", failure


def test_tdx_premapped_fires_when_finalize_leaves_nr_premapped_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c [T16]: tdx_td_finalize() must refuse while nr_premapped != 0; a FINALIZE that skips the
    check (and the counter bug behind it) leaves a RUNNABLE TD with pages counted as premapped."""
    premap_counter_bug(monkeypatch, +1)
    finalize = tdx_mod.tdx_td_finalize

    async def finalize_without_the_check(vm: Any, cmd: Any) -> None:
        kvm_tdx = to_kvm_tdx(vm)
        pending, kvm_tdx.nr_premapped = kvm_tdx.nr_premapped, 0
        try:
            await finalize(vm, cmd)
        finally:
            kvm_tdx.nr_premapped += pending

    monkeypatch.setattr(tdx_mod, "tdx_td_finalize", finalize_without_the_check)
    failure = run_failing(build_and_finalize_tolerantly)
    assert failure.signature == "tdx_premapped:final", failure


# -- sept_incoherent: the mirror root and the S-EPT disagree ------------------------------------------


async def add_then_convert_to_shared(kvm: asyncvm.Kvm) -> None:
    td = await build_td(kvm, image_pages=2)
    await add_pages(td, 0, 2)
    await td.vm.tdx_finalize_vm()
    # private -> shared: kvm_mmu_unmap_gfn_range() with the PRIVATE filter zaps the mirror leaf,
    # and the folio stays (only guest_memfd truncation frees it).
    await td.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))


async def skip_sept_removal(vm: Any, gfn: int, level: int) -> None:
    """tdx_sept_remove_private_spte() that forgets BLOCK/TRACK/REMOVE: the mirror leaf goes, the
    S-EPT leaf stays."""


@PROFILES
def test_sept_incoherent_fires_when_a_zap_skips_the_sept_removal(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdp_mmu.c: remove_external_spte() -> tdx.c: tdx_sept_remove_private_spte() must remove the
    S-EPT leaf whenever the mirror leaf is zapped (kvm-coco.md 0.7-0.8); skipped on a
    private->shared conversion, the S-EPT keeps a leaf no mirror SPTE describes."""
    run_once(add_then_convert_to_shared, profile=profile)
    monkeypatch.setattr(vt_x86_ops, "remove_external_spte", skip_sept_removal)
    failure = run_failing(add_then_convert_to_shared, profile=profile)
    assert failure.signature == "sept_incoherent:sept_only", failure


@PROFILES
def test_sept_incoherent_fires_when_page_add_is_lost(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: the S-EPT leaf of an INIT_MEM_REGION page comes from TDH.MEM.PAGE.ADD ([T16] in
    tdx_gmem_post_populate(), [T19] in the leaf hook); a PAGE.ADD that reports success without
    adding leaves a mirror leaf with no S-EPT leaf behind it (kvm-coco.md 0.6-0.7)."""

    async def lost_page_add(self: TdxModule, gfn: int, pfn: int, source: bytes) -> int:
        return TDX_SUCCESS

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=1)
        await add_pages(td, 0, 1, flags=0)
        await tolerate(td.vm.tdx_finalize_vm())

    run_once(body, profile=profile)
    monkeypatch.setattr(TdxModule, "tdh_mem_page_add", lost_page_add)
    failure = run_failing(body, profile=profile)
    assert failure.signature == "sept_incoherent:mirror_only", failure


# -- tdx_freed_page: a page freed while the S-EPT still maps it ---------------------------------------


async def add_run_then_punch(kvm: asyncvm.Kvm) -> None:
    td = await build_td(kvm, image_pages=1)
    await add_pages(td, 0, 1)
    await td.vm.tdx_finalize_vm()
    await run_guest(td.vcpus[0], [GuestAccess.read(0, 8), GuestAccess.read(PAGE, 8)])
    await td.gmem.fallocate(PUNCH, 0, 2 * PAGE)


@PROFILES
def test_tdx_freed_page_fires_when_punch_hole_skips_the_sept_removal(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """guest_memfd.c: kvm_gmem_punch_hole() zaps (-> tdx_sept_remove_private_spte()) before
    truncate frees the folio; with the S-EPT removal skipped the TDX module still maps a page the
    host allocator has taken back (kvm-coco.md 5.12)."""
    run_once(add_run_then_punch, profile=profile)
    monkeypatch.setattr(vt_x86_ops, "remove_external_spte", skip_sept_removal)
    failure = run_failing(add_run_then_punch, profile=profile)
    assert failure.signature == "tdx_freed_page:free", failure


def test_tdx_freed_page_fires_when_populate_drops_the_invalidate_lock() -> None:
    """bugs.py: populate_without_invalidate_lock (guest_memfd.c: kvm_gmem_populate()): PUNCH_HOLE
    truncates the folio INIT_MEM_REGION is adding (kvm-coco.md 0.13, 5.4)."""
    report = asyncvm.explore(
        "tdx_init_mem_region_vs_punch_hole",
        strategy="pct",
        runs=300,
        seed=11,
        bugs=["populate_without_invalidate_lock"],
    )
    found = report.first("tdx_freed_page")
    assert found is not None, report.summary()
    again = asyncvm.replay(found.schedule, tdx_scenarios.tdx_init_mem_region_vs_punch_hole)
    assert again.failure is not None and again.failure.signature == found.signature


# -- removal must not fail: a KVM_BUG when it does ---------------------------------------------------------


@PROFILES
def test_kvm_bug_fires_when_an_sept_entry_is_removed_twice(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdx_sept_remove_private_spte(): a second BLOCK of an entry already REMOVEd returns
    TDX_EPT_ENTRY_STATE_INCORRECT, and removal must not fail -> KVM_BUG_ON (kvm-coco.md 5.1)."""
    remove = tdx_mod.tdx_sept_remove_private_spte

    async def remove_twice(vm: Any, gfn: int, level: int) -> None:
        await remove(vm, gfn, level)
        await remove(vm, gfn, level)

    run_once(add_run_then_punch, profile=profile)
    monkeypatch.setattr(vt_x86_ops, "remove_external_spte", remove_twice)
    failure = run_failing(add_run_then_punch, profile=profile)
    assert failure.kind == "kvm_bug" and "RANGE.BLOCK" in failure.message, failure


def busy_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    async def once(vm: Any, seamcall: Callable[[], Any]) -> int:
        err: int = await seamcall()
        return err

    monkeypatch.setattr(tdx_mod, "tdh_do_no_vcpus", once)


@PROFILES
def test_kvm_bug_fires_when_a_busy_removal_is_not_retried(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdh_do_no_vcpus() ([T16] tdx_no_vcpus_enter_start/stop()): a BLOCK/TRACK/REMOVE that
    meets TDX_OPERAND_BUSY from a vCPU in the guest must kick all vCPUs out and retry once; without
    the retry the must-not-fail removal KVM_BUGs the VM (kvm-coco.md 2.5, 2.6, 5.8)."""
    busy_not_retried(monkeypatch)
    report = asyncvm.explore(
        "tdx_post_finalize_faults_vs_punch_hole",
        strategy="pct",
        runs=1000,
        seed=5,
        profile=profile,
        stop_on_first_failure=True,
    )
    found = report.first("kvm_bug")
    assert found is not None, report.summary()
    assert "0x80000200" in found.message, found  # TDX_OPERAND_BUSY


# -- the initial image: added once, measured once, every reported page added --------------------------------


@PROFILES
def test_tdx_double_extend_fires_when_a_chunk_is_extended_twice(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdx_gmem_post_populate() issues TDH.MR.EXTEND exactly once per 256-byte chunk
    (TDX_EXTENDMR_CHUNKSIZE); extending a chunk twice changes MRTD (kvm-coco.md 2.9)."""
    extend = TdxModule.tdh_mr_extend

    async def extend_twice(self: TdxModule, gpa: int) -> int:
        err: int = await extend(self, gpa)
        return err or await extend(self, gpa)

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=1)
        await add_pages(td, 0, 1)
        await td.vm.tdx_finalize_vm()

    run_once(body, profile=profile)
    monkeypatch.setattr(TdxModule, "tdh_mr_extend", extend_twice)
    failure = run_failing(body, profile=profile)
    assert failure.signature == "tdx_double_extend", failure


def test_tdx_double_add_fires_when_populate_skips_the_uptodate_check() -> None:
    """bugs.py: populate_skips_uptodate_check ([G11] kvm_gmem_populate() must refuse an uptodate
    folio with -EEXIST, "do not allow populating the same page twice", kvm-coco.md 4.6): a second
    INIT_MEM_REGION of an added page reaches tdx_gmem_post_populate(), whose kvm_tdp_map_page() is
    spurious, and [T16] issues TDH.MEM.PAGE.ADD for a GPA already in the image."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=1)
        await add_pages(td, 0, 1, flags=0)
        assert await tolerate(add_pages(td, 0, 1, flags=0)) == uapi.EEXIST
        await td.vm.tdx_finalize_vm()

    run_once(body)
    failure = run_failing(body, bugs=["populate_skips_uptodate_check"])
    assert failure.signature == "tdx_double_add", failure


def test_re_adding_a_punched_page_is_not_a_double_add() -> None:
    """No false positive: PUNCH_HOLE of an added page before FINALIZE removes it from the S-EPT
    (BLOCK -> REMOVE, no TRACK while not RUNNABLE), so INIT_MEM_REGION may add and measure it
    again (a new folio, not uptodate); MRTD then holds both PAGE.ADDs (kvm-coco.md 2.9)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=2)
        await add_pages(td, 0, 2)
        await td.gmem.fallocate(PUNCH, 0, PAGE)
        assert sorted(td.vm.tdx_module.sept) == [1]
        await add_pages(td, 0, 1)
        await td.vm.tdx_finalize_vm()
        assert td.vm.tdx_module.added_pages == [0, 1, 0]

    for profile in ("6.18", "7.0"):
        run_once(body, profile=profile)


@PROFILES
def test_tdx_missing_add_fires_when_populate_reports_pages_it_did_not_add(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tdx.c: tdx_vcpu_init_mem_region() advances past a page only when kvm_gmem_populate() says it
    was populated; a populate that reports success without running tdx_gmem_post_populate() leaves
    a FINALIZEd image missing pages userspace was told were added."""

    async def populate_that_does_nothing(vm: Any, gfn: int, src: Any, npages: int, cb: Any, opaque: Any) -> int:
        return npages

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=2)
        await add_pages(td, 0, 2)
        await td.vm.tdx_finalize_vm()

    run_once(body, profile=profile)
    monkeypatch.setattr(tdx_mod, "kvm_gmem_populate", populate_that_does_nothing)
    failure = run_failing(body, profile=profile)
    assert failure.signature == "tdx_missing_add", failure
