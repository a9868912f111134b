"""Campaigns on a Dask distributed cluster find what the local campaign finds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BUGGY, SCENARIO, Campaign, assert_one_line_error, cli_env, comparable, explain, run_cli

distributed = pytest.importorskip("distributed")


@pytest.fixture
def cluster() -> Iterator[Any]:
    # Threads in this process, reachable over TCP so the CLI in a subprocess can use it too.
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=50,
    ) as c:
        yield c


@pytest.mark.slow
def test_run_campaign_on_dask_matches_local(campaign: Campaign, cluster: Any, tmp_path: Path) -> None:
    from asyncvm.explore.campaign import CampaignSpec
    from asyncvm.explore.runner import run_campaign

    local = json.loads((campaign.folder / "campaign.json").read_text())["spec"]
    spec = CampaignSpec(**{**local, "steps": None})  # let the campaign calibrate PCT as the CLI did
    with distributed.Client(cluster) as client:
        report, folder = run_campaign(spec, out=tmp_path, dask=client)
    assert comparable(json.loads((folder / "summary.json").read_text())) == comparable(campaign.summary)
    assert [f.signature for f in report.failures] == [f["signature"] for f in campaign.failures]
    for failure in campaign.failures:
        mine = json.loads((folder / failure["dir"] / "schedule.json").read_text())
        assert mine["choices"] == campaign.schedule(failure)["choices"]


@pytest.mark.slow
def test_stress_cli_with_dask_address(campaign: Campaign, cluster: Any, tmp_path: Path) -> None:
    proc = run_cli("stress", SCENARIO, *BUGGY, "--dask", cluster.scheduler_address, "--out", "logs", cwd=tmp_path)
    assert proc.returncode == 1, explain(proc)
    summary = json.loads(next((tmp_path / "logs").glob(f"{SCENARIO}/*/summary.json")).read_text())
    assert comparable(summary) == comparable(campaign.summary)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "notascheme://host:1", "no-port"])
def test_unreachable_or_bad_dask_address_is_one_line(address: str, tmp_path: Path) -> None:
    env = cli_env()
    env["ASYNCVM_DASK_CONNECT_TIMEOUT"] = "1"
    proc = run_cli("stress", SCENARIO, "--runs", "5", "--dask", address, "--out", "logs", cwd=tmp_path, env=env)
    assert_one_line_error(proc, "Dask", address)
    assert not (tmp_path / "logs").exists(), "no campaign folder for a campaign that never started"
