"""Bundled scenarios are clean on the profiles they hunt under, and report an older kernel's real
behaviour as that, with its kernel reference, not as a new finding (issue 16)."""

from __future__ import annotations

from pathlib import Path

import asyncvm

from .conftest import explain, run_cli


def test_tdx_overlap_is_clean_on_7_0() -> None:
    """[7.0] the second INIT_MEM_REGION of a page is -EIO (kvm_tdp_mmu_map_private_pfn(): the
    identical mirror SPTE is RET_PF_SPURIOUS): once failed 500/500 runs on the -EEXIST rule."""
    report = asyncvm.explore("tdx_init_mem_region_overlap", profile="7.0", runs=150, seed=4)
    assert report.ok, report.summary()


def test_tdx_overlap_still_finds_its_bug_on_6_18_as_a_new_finding() -> None:
    report = asyncvm.explore(
        "tdx_init_mem_region_overlap", bugs=["populate_skips_uptodate_check"], runs=300, stop_on_first_failure=True
    )
    assert report.failures and report.findings == report.failures, report.summary()


def test_6_10_double_add_is_the_known_behaviour() -> None:
    report = asyncvm.explore("tdx_init_mem_region_overlap", profile="6.10", runs=20, seed=1)
    assert report.failures and not report.findings, report.summary()
    assert all("6.11" in (f.known or "") for f in report.failures)


def test_6_10_prefault_hang_is_reported_as_the_known_kernel_behaviour(tmp_path: Path) -> None:
    proc = run_cli(
        "stress",
        "prefault_vs_memslot_delete",
        "--profile",
        "6.10",
        "--runs",
        "40",
        "--jobs",
        "1",
        "--no-shrink",
        "--out",
        "logs",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    assert "known 6.10 kernel behaviour" in proc.stdout and "kvm_mmu_reload()" in proc.stdout, explain(proc)
    assert "1 known kernel behaviour" in proc.stdout


def test_prefault_vs_memslot_delete_is_clean_where_both_fixes_are() -> None:
    for profile in ("6.18", "7.0"):
        report = asyncvm.explore("prefault_vs_memslot_delete", profile=profile, runs=100, seed=2)
        assert report.ok, report.summary()
