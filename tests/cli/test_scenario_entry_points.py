"""Scenarios are found through the `asyncvm.scenarios` entry-point group: the bundled ones and any
installed package's; a broken entry point is one line and hides nothing."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncvm.explore import scenarios
from asyncvm.explore.scenarios import ENTRY_POINT_GROUP, REGISTRY, UnknownScenario, get_scenario, load_bundled

from .conftest import SCENARIO, cli_env, explain, run_cli

BUNDLED = {
    "fault_vs_attribute_flip",
    "gmem_conversion_vs_host_fault",
    "gmem_host_write_vs_prefault_vs_punch_hole",
    "gmem_mmap_coco_refuses",
    "gmem_release_vs_memslot_delete",
    "prefault_vs_memslot_delete",
    "prefault_vs_munmap",
    "prefault_vs_punch_hole",
    "snp_launch_update_vs_fallocate",
    "snp_launch_update_vs_prefault",
    "snp_launch_update_vs_punch_hole",
    "snp_post_launch_faults",
    "snp_post_launch_faults_vs_conversion",
    "tdx_init_mem_region_overlap",
    "tdx_init_mem_region_parallel",
    "tdx_init_mem_region_vs_punch_hole",
    "tdx_post_finalize_faults_vs_punch_hole",
    "tdx_prefault_before_finalize",
    # issue 15: the TDX state-ioctl races 7.0 fixed, and the design-question scenarios
    "tdx_init_mem_region_vs_init_vcpu",
    "tdx_init_vcpu_vs_punch_hole",
    "tdx_init_mem_region_threads",
    "tdx_prefault_then_finalize",
    "prefault_loop_vs_punch_hole",
    "populate_sequences",
    "gmem_write_before_bind",
    # issue 17: the async TDX launcher of examples/tdx_launcher.py
    "tdx_launcher",
    # issue 14: installs into an invalid root, and the generated programs of asyncvm fuzz
    "fault_vs_zap_all",
    "fuzz",
    # SNP blind spots the mutation test found: populate of a converted gfn, concurrent first faults
    "snp_launch_update_vs_conversion",
    "snp_faults_race",
}
THIRD_PARTY = '''
import asyncvm

@asyncvm.scenario(name="third_party_race", params={"pages": 2})
async def third_party_race(kvm, pages=2):
    """A scenario registered by another package's entry point."""
'''


def test_bundled_scenarios_are_entry_points_of_asyncvm() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value.startswith("asyncvm.")]
    assert {ep.value for ep in eps} >= {"asyncvm.scenarios.prefault_vs_punch_hole", "asyncvm.scenarios.tdx"}
    load_bundled()
    assert {n for n, s in REGISTRY.items() if s.module.startswith("asyncvm.")} == BUNDLED


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Entry points as installed, plus one that cannot import, one that raises, one that works."""
    (tmp_path / "third_party_races.py").write_text(THIRD_PARTY)
    (tmp_path / "raising_races.py").write_text("raise RuntimeError('no TDX module here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points
    extra = [
        importlib.metadata.EntryPoint("missing", "no_such_package_xyz.races", ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("raising", "raising_races", ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("good", "third_party_races", ENTRY_POINT_GROUP),
    ]

    def entry_points(**selection: Any) -> Any:
        found = list(real(**selection))
        return found + extra if selection.get("group") == ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(scenarios, "LOAD_ERRORS", {})
    monkeypatch.setattr(scenarios, "_LOADED", set(scenarios._LOADED))
    yield
    REGISTRY.pop("third_party_race", None)
    for name in ("third_party_races", "raising_races"):
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("third_party")
def test_broken_entry_points_are_one_line_each_and_hide_nothing() -> None:
    errors = load_bundled()
    assert len(errors) == 2, errors
    missing, raising = sorted(errors)
    assert "'missing'" in missing and "no_such_package_xyz" in missing and "ModuleNotFoundError" in missing
    assert "'raising'" in raising and "RuntimeError: no TDX module here" in raising
    assert all("\n" not in e and "Traceback" not in e for e in errors)
    assert BUNDLED <= set(REGISTRY) and "third_party_race" in REGISTRY
    assert get_scenario("third_party_race").module == "third_party_races"
    # An unknown name says which entry points did not load.
    with pytest.raises(UnknownScenario, match="entry points that failed to load: missing = no_such_package_xyz"):
        get_scenario("no_such_scenario")


def test_an_installed_package_registers_scenarios_through_its_metadata(tmp_path: Path) -> None:
    """A real (if minimal) installed distribution: a dist-info with entry_points.txt on sys.path."""
    site = tmp_path / "site"
    dist = site / "third_party_races-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-races\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_package_xyz.races\nraces = third_party_races\n"
    )
    (site / "third_party_races.py").write_text(THIRD_PARTY)
    env = cli_env(site)
    listing = run_cli("scenarios", cwd=tmp_path, env=env)
    assert listing.returncode == 0, explain(listing)
    names = {line.split()[0] for line in listing.stdout.splitlines() if line and not line.startswith(" ")}
    assert names == BUNDLED | {"third_party_race"}, listing.stdout
    errors = [line for line in listing.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in listing.stderr, explain(listing)
    assert errors[0].startswith("asyncvm: error: scenario entry point 'broken' of third-party-races"), errors[0]
    # Both the package's scenario and a bundled one still run as campaigns.
    for name in ("third_party_race", SCENARIO):
        proc = run_cli("stress", name, "--runs", "5", "--jobs", "1", "--out", "logs", cwd=tmp_path, env=env)
        assert proc.returncode == 0, explain(proc)
