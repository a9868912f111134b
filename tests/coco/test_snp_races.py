"""SEV-SNP races under the controlled runtime (kvm-coco.md sections 4 and 7, ISSUE 6): each bundled
scenario, run by its registered name, is clean on the correct model over 1,000 PCT schedules in
the default profile ("6.18") and over a shorter campaign in "7.0" ([G20]: per-page invalidate
lock, prepare on every fault); counters show each campaign reached both sides of its race. The
seed scenario (fallocate racing LAUNCH_UPDATE) fails in "6.10" and is clean from "6.18" on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import asyncvm
from asyncvm.x86.sev.firmware import SnpFirmware
from asyncvm.x86.sev.snp import to_kvm_sev
from asyncvm.x86.svm import svm_x86_ops
from asyncvm.x86.trace import trace_kvm_guest_access

from .helpers import RUNS, clean_campaign

PROFILES = pytest.mark.parametrize("profile", sorted(RUNS))


def count_launches(monkeypatch: pytest.MonkeyPatch, seen: Counter[str]) -> None:
    """Count successful page launches, and launched pages returned to shared by the free path."""
    launch = SnpFirmware.snp_launch_update
    invalidate = svm_x86_ops.gmem_invalidate
    assert invalidate is not None

    async def counted_launch(self: SnpFirmware, *args: Any) -> Any:
        rc, corrected = await launch(self, *args)
        seen["launched" if rc == 0 else "refused"] += 1
        return rc, corrected

    def counted_invalidate(vm: Any, folio: Any) -> None:
        entry = to_kvm_sev(vm).firmware.rmp.get(folio.pfn)
        if entry is not None and entry.validated:
            seen["launched_page_freed"] += 1
        invalidate(vm, folio)

    monkeypatch.setattr(SnpFirmware, "snp_launch_update", counted_launch)
    monkeypatch.setattr(svm_x86_ops, "gmem_invalidate", counted_invalidate)


@PROFILES
def test_launch_update_vs_punch_hole_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sev.c: snp_launch_update() -> kvm_gmem_populate() holds filemap_invalidate_lock across the RMP
    check, the copy, rmp_make_private() and SNP_LAUNCH_UPDATE; kvm_gmem_punch_hole() takes it
    exclusively. A page punched after its launch is returned to shared by sev_gmem_invalidate()
    on free_folio (Guest-Valid pages need no reclaim) and the guest later reads zeros there."""
    seen: Counter[str] = Counter()
    count_launches(monkeypatch, seen)
    clean_campaign("snp_launch_update_vs_punch_hole", profile)
    assert seen["launched_page_freed"], "some schedules must punch pages already launched"
    assert not seen["refused"]


@PROFILES
def test_launch_update_vs_pre_fault_before_finish_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmu.c: kvm_arch_vcpu_pre_fault_memory() is -EOPNOTSUPP until snp_launch_finish() sets
    pre_fault_allowed ("KVM: x86: disallow pre-fault for SNP VMs before initialization"), so no
    fault RMP-assigns a page the launch still needs; after FINISH the pre-fault maps everything."""
    seen: Counter[str] = Counter()
    count_launches(monkeypatch, seen)
    clean_campaign("snp_launch_update_vs_prefault", profile)
    assert seen["launched"] >= 4 * RUNS[profile] and not seen["refused"]


@PROFILES
def test_post_launch_faults_vs_attribute_conversion_is_clean(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes() zaps the private mappings of converted gfns under the
    mmu_invalidate protocol; a private fault after it exits to userspace (KVM_EXIT_MEMORY_FAULT),
    a shared one maps the host page; sev.c: sev_gmem_prepare() RMP-assigns a faulted private page
    (idempotent for launched ones). No private mapping of a shared page, no stale install."""
    accesses: Counter[bool] = Counter()

    def counted(vcpu: Any, gfn: int, pfn: int, private: bool) -> None:
        accesses[private] += 1

    monkeypatch.setattr(trace_kvm_guest_access, "probes", (*trace_kvm_guest_access.probes, counted))
    clean_campaign("snp_post_launch_faults_vs_conversion", profile)
    assert accesses[True] and accesses[False], "the guest must read pages both private and shared"


def test_the_seed_race_fallocate_vs_launch_update_is_clean_in_6_18() -> None:
    """The seed scenario (asyncvm/scenarios/snp.py: snp_launch_update_vs_fallocate): from 6.11 fallocate() only
    allocates, so LAUNCH_UPDATE succeeds whichever runs first (kvm-coco.md 4.6)."""
    clean_campaign("snp_launch_update_vs_fallocate", "6.18")


def test_the_seed_race_fallocate_vs_launch_update_fails_in_6_10() -> None:
    """[6.10] fallocate() prepares (RMP-assigns) the folios: a LAUNCH_UPDATE after it fails -EIO."""
    report = asyncvm.explore(
        "snp_launch_update_vs_fallocate", strategy="pct", runs=200, seed=11, profile="6.10", stop_on_first_failure=True
    )
    found = report.first("exception")
    assert found is not None, report.summary()
    assert "EIO" in found.message and found.task == "launch_update", found
