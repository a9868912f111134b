"""`asyncvm compare SCENARIO --profiles A,B` and `asyncvm profiles`, end to end (subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import assert_one_line_error, explain, run_cli

TDX_RACE = "tdx_init_vcpu_vs_punch_hole"
KEYS = {"profile", "runs", "failures", "signatures", "first_failure_run", "first_failure_s", "artifacts"}


def compare_json(cwd: Path, scenario: str, profiles: str, *extra: Any) -> list[dict[str, Any]]:
    proc = run_cli(
        "compare", scenario, "--profiles", profiles, "--format", "json", "--no-shrink", "--out", "logs", *extra, cwd=cwd
    )
    assert proc.returncode == 0, explain(proc)
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list), explain(proc)
    return rows


@pytest.fixture(scope="module")
def kernel_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    cwd = tmp_path_factory.mktemp("compare")
    return cwd, compare_json(cwd, TDX_RACE, "6.18,7.0", "--runs", "150", "--seed", "3")


def test_compare_json_6_18_fails_7_0_clean(kernel_rows: tuple[Path, list[dict[str, Any]]]) -> None:
    cwd, rows = kernel_rows
    assert [r["profile"] for r in rows] == ["6.18", "7.0"]
    old, new = rows
    for r in rows:
        assert set(r) == KEYS, r
        assert r["runs"] == 150
    # 6.18: TDH.VP.INIT outside mmu_lock meets the zap's RANGE.BLOCK (or VP.CREATE/INIT loses) BUSY
    assert old["failures"] > 0 and old["signatures"], old
    assert all(s.startswith("kvm_bug:") for s in old["signatures"]), old
    assert isinstance(old["first_failure_run"], int) and old["first_failure_run"] < 150
    assert old["first_failure_s"] is not None and old["first_failure_s"] >= 0
    for sig in old["signatures"]:
        folder = cwd / old["artifacts"][sig]
        assert (folder / "schedule.json").is_file(), folder
    # 7.0: "all the locks" and VP.INIT under mmu_lock
    assert new["failures"] == 0 and new["signatures"] == [] and new["artifacts"] == {}
    assert new["first_failure_run"] is None and new["first_failure_s"] is None


def test_compare_artifact_replays_the_failure(kernel_rows: tuple[Path, list[dict[str, Any]]]) -> None:
    cwd, rows = kernel_rows
    sig = rows[0]["signatures"][0]
    schedule = cwd / rows[0]["artifacts"][sig] / "schedule.json"
    assert json.loads(schedule.read_text())["profile"] == "6.18"
    proc = run_cli("replay", schedule, cwd=cwd)
    assert proc.returncode == 1, explain(proc)
    assert sig.split(":")[0] in proc.stdout + proc.stderr, explain(proc)


def test_compare_same_seed_same_rows(tmp_path: Path, kernel_rows: tuple[Path, list[dict[str, Any]]]) -> None:
    _cwd, rows = kernel_rows
    again = compare_json(tmp_path, TDX_RACE, "6.18,7.0", "--runs", "150", "--seed", "3")
    for a, b in zip(rows, again, strict=True):
        for key in ("profile", "runs", "failures", "signatures", "first_failure_run"):
            assert a[key] == b[key], key


def test_compare_markdown_and_table(tmp_path: Path) -> None:
    proc = run_cli(
        "compare", TDX_RACE, "--profiles", "6.18,7.0", "--runs", "30", "--format", "markdown", "--no-shrink",
        "--out", "logs", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| profile | runs | failing | signatures |"), explain(proc)
    assert lines[2].startswith("| 6.18 |") and lines[3].startswith("| 7.0 |"), explain(proc)
    assert "clean" in lines[3]
    proc = run_cli("compare", TDX_RACE, "--profiles", "6.18,7.0", "--runs", "20", "--no-shrink", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "6.18" in proc.stdout and "7.0" in proc.stdout and "clean" in proc.stdout


@pytest.mark.parametrize(
    ("profiles", "needles"),
    [
        ("6.10,7.0", ("not meaningful", "6.10", "6.18, 7.0")),
        ("6.18,9.9", ("unknown profile", "9.9")),
        ("6.18", ("at least two",)),
        ("7.0,7.0", ("twice",)),
    ],
)
def test_compare_bad_profiles_one_line(tmp_path: Path, profiles: str, needles: tuple[str, ...]) -> None:
    proc = run_cli("compare", TDX_RACE, "--profiles", profiles, "--runs", "5", cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "logs").exists()


def test_compare_bad_format_and_scenario(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("compare", TDX_RACE, "--profiles", "6.18,7.0", "--format", "csv", cwd=tmp_path), "--format"
    )
    assert_one_line_error(run_cli("compare", "no_such", "--profiles", "6.18,7.0", cwd=tmp_path), "unknown scenario")
    assert_one_line_error(run_cli("compare", TDX_RACE, cwd=tmp_path), "--profiles")


def test_compare_any_profile_when_none_declared(tmp_path: Path) -> None:
    rows = compare_json(
        tmp_path, "prefault_vs_punch_hole", "6.10,6.18", "--runs", "10", "--param", "pages=4", "--strategy", "random"
    )
    assert [r["profile"] for r in rows] == ["6.10", "6.18"]


def test_profiles_lists_both_kinds(tmp_path: Path) -> None:
    proc = run_cli("profiles", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    kinds = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.strip()}
    assert kinds["6.18"] == "kernel" and kinds["7.0"] == "kernel"
    assert "design" in kinds.values(), proc.stdout


def test_compare_json_merged_design_clean_variant_failing(tmp_path: Path) -> None:
    """The vCPU-0 scratch-page design against the merged INIT_MEM_REGION, end to end."""
    rows = compare_json(
        tmp_path, "tdx_init_mem_region_threads", "7.0,tdx-init-mem-region-vcpu0", "--runs", "60", "--seed", "1"
    )
    merged, variant = rows
    assert merged["profile"] == "7.0" and merged["failures"] == 0 and merged["signatures"] == []
    assert variant["profile"] == "tdx-init-mem-region-vcpu0"
    assert variant["failures"] > 0 and variant["first_failure_run"] is not None
    assert any(s.startswith("kvm_bug:") for s in variant["signatures"]), variant
    assert set(variant["artifacts"]) == set(variant["signatures"])


# -- comparisons as a suite kind (stress/*.toml [[compare]]) ----------------------------------------

COMPARE_SUITE = """
[[compare]]
name = "state"
scenario = "tdx_init_vcpu_vs_punch_hole"
profiles = ["6.18", "7.0"]
expect = { "6.18" = "fail", "7.0" = "clean" }
runs = 60
shrink = false
"""


def test_compare_suite_kind_expands_per_profile(tmp_path: Path) -> None:
    from asyncvm.explore.scenarios import load_bundled
    from asyncvm.explore.suite import load_suite

    load_bundled()
    path = tmp_path / "c.toml"
    path.write_text(COMPARE_SUITE)
    suite = load_suite(path)
    assert [(c.name, c.spec.profile, c.expect, c.spec.runs) for c in suite.campaigns] == [
        ("state@6.18", "6.18", "fail", 60),
        ("state@7.0", "7.0", "clean", 60),
    ]
    shipped = load_suite(Path(__file__).parents[2] / "stress" / "compare.toml")
    assert {c.spec.profile for c in shipped.campaigns} >= {"6.18", "7.0", "tdx-init-mem-region-vcpu0"}


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ('profiles = ["6.18", "7.0"]', 'profiles = ["6.10", "7.0"]'),
        ('profiles = ["6.18", "7.0"]', 'profiles = ["6.18"]'),
        ('expect = { "6.18" = "fail", "7.0" = "clean" }', 'expect = { "9.9" = "fail" }'),
    ],
)
def test_compare_suite_kind_bad_tables_one_line(tmp_path: Path, edit: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(COMPARE_SUITE.replace(edit, needle))
    proc = run_cli("stress", "--suite", path, "--out", "logs", cwd=tmp_path)
    assert_one_line_error(proc, "compare 1")


def test_compare_suite_kind_runs(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(COMPARE_SUITE)
    proc = run_cli("stress", "--suite", path, "--jobs", "1", "--out", "logs", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "2/2 campaigns as expected" in proc.stdout, explain(proc)


def test_compare_folder_records_known_kernel_behaviour(kernel_rows: tuple[Path, list[dict[str, Any]]]) -> None:
    """A bug real in a profile is reported as such, with the kernel change that fixed it."""
    cwd, _rows = kernel_rows
    (record,) = [json.loads(p.read_text()) for p in (cwd / "logs").glob("compare-*/compare.json")]
    assert record["scenario"] == TDX_RACE and record["seed"] == 3
    old, new = record["profiles"]
    assert old["known"] and set(old["known"]) == set(old["signatures"])
    assert all("Take MMU lock around tdh_vp_init()" in text for text in old["known"].values())
    assert new["known"] == {} and new["fired"] == {}
