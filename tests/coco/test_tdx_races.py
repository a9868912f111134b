"""TDX races under the controlled runtime (kvm-coco.md sections 5 and 7, ISSUE 5c): each bundled
scenario, run by its registered name, is clean on the correct model over 1,000 PCT schedules in
the default profile ("6.18", [T16]) and over a shorter campaign in "7.0" ([T19]); counters
wrapped around the model show that each campaign reached both sides of its race. Last, the one
race that differs by design between the flows: PUNCH_HOLE during KVM_TDX_INIT_VCPU (5.7)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.x86.tdx import tdx as tdx_mod
from asyncvm.x86.tdx.module import is_busy
from asyncvm.x86.tdx.tdx import TD_STATE_RUNNABLE, to_kvm_tdx
from asyncvm.x86.vmx import vt_x86_ops

from .helpers import MEASURE, PAGE, PUNCH, RUNS, build_td, clean_campaign

PROFILES = pytest.mark.parametrize("profile", sorted(RUNS))


def count_removals(monkeypatch: pytest.MonkeyPatch, seen: Counter[str]) -> None:
    """Count S-EPT removals by TD state, and removal SEAMCALLs that were BUSY and retried after
    the kick (tdx.c: tdh_do_no_vcpus())."""
    remove = vt_x86_ops.remove_external_spte
    no_vcpus = tdx_mod.tdh_do_no_vcpus
    assert remove is not None

    async def counted_remove(vm: Any, gfn: int, level: int) -> None:
        seen["removal_" + ("runnable" if to_kvm_tdx(vm).state == TD_STATE_RUNNABLE else "building")] += 1
        await remove(vm, gfn, level)

    async def counted_no_vcpus(vm: Any, seamcall: Callable[[], Any]) -> int:
        tries: list[int] = []

        async def once() -> int:
            err: int = await seamcall()
            tries.append(err)
            return err

        err = await no_vcpus(vm, once)
        if len(tries) > 1 and is_busy(tries[0]):
            seen["busy_retried"] += 1
        return err

    monkeypatch.setattr(vt_x86_ops, "remove_external_spte", counted_remove)
    monkeypatch.setattr(tdx_mod, "tdh_do_no_vcpus", counted_no_vcpus)


@PROFILES
def test_init_mem_region_on_several_vcpus_in_parallel_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdx_vcpu_init_mem_region() on three vCPUs at once: [T16] serialized by
    kvm->slots_lock (one vCPU mutex each), [T19] by tdx_acquire_vm_state_locks(); TDX-module
    TDR contention (PAGE.ADD, MR.EXTEND exclusive) never reaches KVM_BUG_ON (kvm-coco.md 5.6, 7);
    every page is PAGE.ADDed once and MR.EXTENDed once per chunk."""
    adds: Counter[int] = Counter()
    post_populate = tdx_mod.tdx_gmem_post_populate

    async def counted(vm: Any, *args: Any) -> int:
        r: int = await post_populate(vm, *args)
        adds[len(to_kvm_tdx(vm).module.added_pages)] += 1
        return r

    monkeypatch.setattr(tdx_mod, "tdx_gmem_post_populate", counted)
    clean_campaign("tdx_init_mem_region_parallel", profile)
    assert max(adds) == 6, "every run adds the whole 6-page image"


@PROFILES
def test_init_mem_region_vs_punch_hole_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_populate() holds filemap_invalidate_lock across get-pfn and the TDX
    post_populate; kvm_gmem_punch_hole() takes it exclusively, so a page is zapped either before
    it is populated or after its PAGE.ADD, never in between (kvm-coco.md 0.13, 5.4); removal
    before FINALIZE is BLOCK -> REMOVE -> WBINVD without TRACK (tdx_sept_remove_private_spte())."""
    seen: Counter[str] = Counter()
    count_removals(monkeypatch, seen)
    clean_campaign("tdx_init_mem_region_vs_punch_hole", profile)
    assert seen["removal_building"], "some schedules must punch pages already PAGE.ADDed"
    assert not seen["removal_runnable"]


@PROFILES
def test_init_mem_region_vs_pre_fault_before_finalize_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmu.c: kvm_arch_vcpu_pre_fault_memory() returns -EOPNOTSUPP while !pre_fault_allowed
    (the scenario's errno oracle checks it), so INIT_MEM_REGION is the only producer of private
    leaves before FINALIZE and nothing premapped is left behind: FINALIZE succeeds ([T16]
    nr_premapped == 0) and mirror and S-EPT agree (kvm-coco.md 0.4-0.6, 5.3)."""
    finals: Counter[int] = Counter()
    finalize = tdx_mod.tdx_td_finalize

    async def counted(vm: Any, cmd: Any) -> None:
        await finalize(vm, cmd)
        finals[to_kvm_tdx(vm).nr_premapped] += 1

    monkeypatch.setattr(tdx_mod, "tdx_td_finalize", counted)
    clean_campaign("tdx_prefault_before_finalize", profile)
    assert set(finals) == {0} and sum(finals.values()) >= RUNS[profile]


@PROFILES
def test_post_finalize_faults_vs_punch_hole_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tdx.c: tdx_sept_remove_private_spte() under mmu_lock held for write (BLOCK -> TRACK ->
    REMOVE -> WBINVD) against guest faults installing PAGE.AUG under mmu_lock read; a BUSY from
    a vCPU in the guest (zero-step mitigation holding the S-EPT tree) is retried once after
    kicking every vCPU out (tdh_do_no_vcpus(), kvm-coco.md 2.5, 5.8): no KVM_BUG, no freed page
    left in the S-EPT."""
    seen: Counter[str] = Counter()
    count_removals(monkeypatch, seen)
    clean_campaign("tdx_post_finalize_faults_vs_punch_hole", profile)
    assert seen["removal_runnable"], "some schedules must remove AUGed pages"
    assert seen["busy_retried"], "some schedules must hit TDX_OPERAND_BUSY and retry after the kick"


def test_the_tdx_module_is_reached_through_the_model_under_test() -> None:
    """The counters above patch tdx.c and vt_x86_ops in this process: the TD's hooks are those."""
    assert vt_x86_ops.remove_external_spte is tdx_mod.tdx_sept_remove_private_spte
    assert vt_x86_ops.set_external_spte is tdx_mod.tdx_sept_set_private_spte


async def init_vcpu_vs_punch_hole(kvm: asyncvm.Kvm) -> None:
    """KVM_TDX_INIT_VCPU of a late vCPU while userspace punches a hole in the added image."""
    td = await build_td(kvm, image_pages=2)
    await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 2), MEASURE)
    late = await td.vm.create_vcpu(1)
    async with asyncvm.TaskGroup() as tg:
        tg.spawn(late.tdx_init_vcpu, name="vcpu1")
        tg.spawn(td.gmem.fallocate, PUNCH, 0, 2 * PAGE, name="punch_hole")
    await td.vm.tdx_finalize_vm()


def test_init_vcpu_vs_punch_hole_bugs_the_vm_in_t16() -> None:
    """kvm-coco.md 5.7 [T16]: TDH.VP.INIT (leaf version 1) takes the TDR exclusively while the
    S-EPT removal SEAMCALLs of a concurrent PUNCH_HOLE take it shared and must not fail: a BUSY
    there (or in VP.INIT) is a KVM_BUG_ON. The race the T19 fix closes."""
    report = asyncvm.explore(
        init_vcpu_vs_punch_hole,
        strategy="pct",
        runs=500,
        seed=3,
        profile="6.18",
        data_probs={"signal": 0.0},
        stop_on_first_failure=True,
    )
    found = report.first("kvm_bug")
    assert found is not None, report.summary()
    assert "0x8000020000000080" in found.message, found  # TDX_OPERAND_BUSY on the TDR


def test_init_vcpu_vs_punch_hole_is_clean_in_t19() -> None:
    """tdx.c [T19] "KVM: TDX: Take MMU lock around tdh_vp_init()": VP.INIT runs under mmu_lock held
    for write, as every S-EPT removal does, so the two never contend in the TDX module (TDH.VP.CREATE
    takes the TDR shared and never conflicts with removal)."""
    report = asyncvm.explore(
        init_vcpu_vs_punch_hole, strategy="pct", runs=500, seed=3, profile="7.0", data_probs={"signal": 0.0}
    )
    assert report.runs == 500
    assert report.ok, report.summary()
