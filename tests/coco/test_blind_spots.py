"""The blind spots a mutation test found (kernel bugs re-injected into the model that no oracle or
scenario caught), each closed and shown to fail: the bug is monkeypatched into the model function
and a short PCT campaign finds it; the correct model runs the same campaign clean.

- KVM skipping tdx_track() before TDH.MEM.PAGE.REMOVE: the TDX module refuses the removal with
  TDX_TLB_TRACKING_NOT_DONE once the TD is RUNNABLE (tdx_post_finalize_faults_vs_punch_hole).
- kvm_gmem_populate() without its PRIVATE-attribute check (snp_launch_update_vs_conversion).
- kvm_gmem_get_pfn() unlocking the folio before zeroing and preparing it (snp_faults_race).
"""

from __future__ import annotations
import __future__

import inspect
import textwrap
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import asyncvm
from asyncvm.explore.known import known_behaviour
from asyncvm.explore.scenarios import get_scenario
from asyncvm.kvm import guest_memfd
from asyncvm.runtime.failures import Failure
from asyncvm.x86.mmu import fault
from asyncvm.x86.tdx import tdx as tdx_mod
from asyncvm.x86.tdx.module import TDX_SUCCESS, TdxModule, is_busy

from .helpers import RUNS, clean_campaign

PROFILES = pytest.mark.parametrize("profile", sorted(RUNS))
#: a mutation must be found within this many PCT runs
FIND_WITHIN = 200


def mutated(module: ModuleType, name: str, edits: list[tuple[str, str]]) -> Callable[..., Any]:
    """`module.name` recompiled from its source with each (old, new) edit applied exactly once."""
    src = textwrap.dedent(inspect.getsource(getattr(module, name)))
    for old, new in edits:
        assert src.count(old) == 1, f"the model changed: {old!r} not found once in {name}"
        src = src.replace(old, new)
    namespace = dict(vars(module))
    flags = __future__.annotations.compiler_flag
    exec(compile(src, str(module.__file__), "exec", flags=flags, dont_inherit=True), namespace)
    fn: Callable[..., Any] = namespace[name]
    return fn


def find(name: str, profile: str) -> asyncvm.Report:
    report = asyncvm.explore(
        name, strategy="pct", runs=FIND_WITHIN, seed=0, profile=profile, stop_on_first_failure=True
    )
    assert not report.ok, f"{name} did not find the mutation in {FIND_WITHIN} runs under {profile}"
    return report


# -- TDX: PAGE.REMOVE without TDH.MEM.TRACK ---------------------------------------------------------


def skip_tdx_track(monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdx_sept_remove_private_spte() with tdx_track() left out (TRACK "succeeds" unissued)."""
    real = tdx_mod.tdh_do_no_vcpus

    async def no_track(vm: Any, seamcall: Callable[[], Any]) -> int:
        if getattr(seamcall, "__func__", None) is TdxModule.tdh_mem_track:
            return TDX_SUCCESS
        result: int = await real(vm, seamcall)
        return result

    monkeypatch.setattr(tdx_mod, "tdh_do_no_vcpus", no_track)


@PROFILES
def test_page_remove_without_track_is_refused_by_the_tdx_module(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TDX module tdh_mem_page_remove(): from RUNNABLE on, a page BLOCKed in the current TLB epoch
    is TDX_TLB_TRACKING_NOT_DONE (0xC0000B08 | operand RCX); KVM's KVM_BUG_ON names the status."""
    skip_tdx_track(monkeypatch)
    report = find("tdx_post_finalize_faults_vs_punch_hole", profile)
    found = report.failures[0]
    assert found.kind == "kvm_bug", report.summary()
    assert "TDH.MEM.PAGE.REMOVE failed 0xc0000b0800000001 (TDX_TLB_TRACKING_NOT_DONE)" in found.message
    assert found.signature == "kvm_bug:KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed N (TDX_TLB_TRACKING_NOT_DONE)"
    assert found.known is None


@PROFILES
def test_post_finalize_removals_pass_the_tlb_tracking_check(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tdx_track() in place no PAGE.REMOVE of a RUNNABLE TD fails but for BUSY: clean, and some ran."""
    seen: Counter[str] = Counter()
    remove = TdxModule.tdh_mem_page_remove

    async def counted(self: TdxModule, gfn: int) -> int:
        err: int = await remove(self, gfn)
        if self.finalized and not is_busy(err):  # BUSY: kicked and retried (tdh_do_no_vcpus())
            seen["ok" if err == TDX_SUCCESS else hex(err)] += 1
        return err

    monkeypatch.setattr(TdxModule, "tdh_mem_page_remove", counted)
    clean_campaign("tdx_post_finalize_faults_vs_punch_hole", profile)
    assert seen["ok"] and set(seen) == {"ok"}, seen


def test_a_tlb_tracking_kvm_bug_is_not_the_known_6_18_busy_race() -> None:
    """tdx_init_vcpu_vs_punch_hole declares its 6.18 KVM_BUG_ONs known (TDH.VP.INIT outside
    mmu_lock: BUSY); a PAGE.REMOVE refused for missing TLB tracking is a new finding there."""
    scenario = get_scenario("tdx_init_vcpu_vs_punch_hole").fn

    def bug(message: str, signature: str) -> Failure:
        return Failure("kvm_bug", "kvm_bug:" + signature, message, 24, "punch_hole")

    busy = bug("KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed 0x8000020000000080", "KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed N")
    tlb = bug(
        "KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed 0xc0000b0800000001 (TDX_TLB_TRACKING_NOT_DONE)",
        "KVM_BUG_ON: TDH.MEM.PAGE.REMOVE failed N (TDX_TLB_TRACKING_NOT_DONE)",
    )
    assert known_behaviour(scenario, "6.18", busy)
    assert known_behaviour(scenario, "6.18", tlb) is None
    assert known_behaviour(scenario, "7.0", busy) is None


# -- SNP: LAUNCH_UPDATE of a gfn converted to shared -------------------------------------------------


@PROFILES
def test_populate_without_the_private_check_is_found(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_populate() with kvm_range_has_memory_attributes() answering "PRIVATE"
    for everything: the launch encrypts gfn 1 after the VMM made it shared (populate_shared)."""
    monkeypatch.setattr(guest_memfd, "kvm_range_has_memory_attributes", lambda *args: True)
    report = find("snp_launch_update_vs_conversion", profile)
    assert report.failures[0].signature == "populate_shared", report.summary()


@PROFILES
def test_launch_update_vs_conversion_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The correct model: gfn 1 is either launched before the conversion or refused after it, and
    campaigns see both orders."""
    seen: Counter[str] = Counter()
    populate = guest_memfd._populate_one

    async def counted(vm: Any, file: Any, slot: Any, gfn: int, *args: Any) -> int:
        ret: int = await populate(vm, file, slot, gfn, *args)
        if gfn == 1:
            seen["refused" if ret else "launched"] += 1
        return ret

    monkeypatch.setattr(guest_memfd, "_populate_one", counted)
    clean_campaign("snp_launch_update_vs_conversion", profile)
    assert seen["refused"] and seen["launched"], seen


# -- SNP: concurrent first private faults ------------------------------------------------------------


def unlock_before_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_gmem_get_pfn() dropping the folio lock right after __kvm_gmem_get_pfn(), before the
    uptodate check, the zeroing and the arch prepare hook."""
    buggy = mutated(
        guest_memfd,
        "kvm_gmem_get_pfn",
        [
            (
                "        prof = vm.profile\n",
                "        await folio_unlock(folio)  # the bug\n        prof = vm.profile\n",
            ),
            ("                    await folio_unlock(folio)\n                    vm.kvm", "                    vm.kvm"),
            ("                await folio_unlock(folio)\n                vm.kvm", "                vm.kvm"),
            ("        await folio_unlock(folio)\n        traps.emit", "        traps.emit"),
        ],
    )
    monkeypatch.setattr(fault, "kvm_gmem_get_pfn", buggy)


@PROFILES
def test_get_pfn_unlocking_before_prepare_is_found(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two vCPUs' first faults on gfn 0 both zero and prepare it: the second RMPUPDATE fails the
    fault (an errno KVM_RUN never returns for it), or a write is zeroed away."""
    unlock_before_prepare(monkeypatch)
    report = find("snp_faults_race", profile)
    assert report.failures[0].kind in ("errno", "guest_data", "rmp_guest_shared"), report.summary()


@PROFILES
def test_snp_faults_race_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The correct model: the folio lock serializes the first faults; campaigns see both vCPUs
    fault gfn 0 while the other is inside kvm_gmem_get_pfn()."""
    seen: Counter[str] = Counter()
    get_pfn = fault.kvm_gmem_get_pfn
    inside: dict[int, int] = {}

    async def counted(vm: Any, slot: Any, gfn: int) -> Any:
        if inside.get(gfn):
            seen["overlap"] += 1
        inside[gfn] = inside.get(gfn, 0) + 1
        try:
            return await get_pfn(vm, slot, gfn)
        finally:
            inside[gfn] -= 1

    monkeypatch.setattr(fault, "kvm_gmem_get_pfn", counted)
    clean_campaign("snp_faults_race", profile)
    assert seen["overlap"], seen
