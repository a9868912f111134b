"""`asyncvm stress`: exit codes, the campaign folder and its artifacts, determinism across --jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import (
    ARTIFACTS,
    BUGGY,
    RUNS,
    SCENARIO,
    Campaign,
    cli_env,
    comparable,
    explain,
    read_ledger,
    stress,
)


def test_clean_campaign_exits_0(tmp_path: Path) -> None:
    c = stress(tmp_path, "--param", "pages=8", "--runs", "120", "--jobs", "1")
    assert c.proc.returncode == 0, explain(c.proc)
    summary = c.summary
    assert summary["runs"] == 120 and summary["failing_runs"] == 0 and summary["failures"] == []
    ledger = read_ledger(c.folder)
    assert ledger and all(line["type"] == "chunk" for line in ledger)
    assert sum(line["chunk"]["runs"] for line in ledger) == 120
    assert json.loads((c.folder / "campaign.json").read_text())["spec"]["scenario"] == SCENARIO
    assert [p.name for p in c.folder.iterdir() if p.is_dir()] == []
    # No progress bar unless stderr is a terminal (or ASYNCVM_PROGRESS=1).
    assert "runs/s" not in c.proc.stderr


def test_progress_bar_on_request_goes_to_stderr(tmp_path: Path) -> None:
    env = cli_env()
    env["ASYNCVM_PROGRESS"] = "1"
    c = stress(tmp_path, "--param", "pages=8", "--runs", "60", "--jobs", "1", env=env)
    assert c.proc.returncode == 0, explain(c.proc)
    assert "runs/s" in c.proc.stderr and "signatures" in c.proc.stderr
    assert "runs/s" not in c.proc.stdout


def test_failing_campaign_exits_1_with_artifacts(campaign: Campaign) -> None:
    summary = campaign.summary
    assert summary["runs"] == RUNS and summary["failing_runs"] >= len(summary["failures"]) >= 1
    assert summary["scenario"] == SCENARIO and summary["strategy"]["name"] == "pct"
    ledger = read_ledger(campaign.folder)
    found = [line for line in ledger if line["type"] == "failure"]
    assert sorted(f["signature"] for f in found) == sorted(f["signature"] for f in summary["failures"])
    assert sum(line["chunk"]["runs"] for line in ledger if line["type"] == "chunk") == RUNS
    for failure in summary["failures"]:
        d = campaign.dir(failure)
        for name in ARTIFACTS:
            assert (d / name).is_file() and (d / name).stat().st_size > 0, d / name
        schedule = campaign.schedule(failure)
        assert schedule["format"] == "asyncvm-schedule"
        assert schedule["scenario"]["name"] == SCENARIO and schedule["scenario"]["params"]["pages"] == 8
        assert schedule["bugs"] == ["drop_invalidate_retry"] and schedule["seed"] == 1
        # The schedule is the campaign's smallest witness of the signature, not necessarily its first.
        assert schedule["execution"] == failure["witness_run"] and failure["first_run"] <= failure["witness_run"]
        assert schedule["failure"]["signature"] == failure["signature"]
        shrunk = campaign.schedule(failure, "schedule.shrunk.json")
        assert shrunk["failure"]["signature"] == failure["signature"]
        assert (shrunk["preemptions"], shrunk["steps"]) <= (schedule["preemptions"], schedule["steps"])
        # The summary and the output report both sizes, in preemptions and steps.
        assert (failure["preemptions"], failure["steps"]) == (schedule["preemptions"], schedule["steps"])
        minimal = shrunk["strategy"]["minimal"]
        assert failure["shrunk"] == {"preemptions": shrunk["preemptions"], "steps": shrunk["steps"], "minimal": minimal}
        assert (
            f"{failure['signature']}: {schedule['preemptions']} preemptions, {schedule['steps']} steps "
            f"(run {failure['witness_run']}); shrunk: {shrunk['preemptions']} preemptions, {shrunk['steps']} steps"
        ) in campaign.proc.stdout
        events = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
        assert events and all("event" in e and "step" in e for e in events)
        # The failure event stands at its own step (the failing task's cleanup may come after it).
        at = [i for i, e in enumerate(events) if e["event"] == "failure"]
        assert len(at) == 1 and events[at[0]]["step"] == schedule["failure"]["step"]
        assert all(e["step"] <= schedule["failure"]["step"] for e in events[: at[0]])
        assert f"{failure['dir']}/schedule.json" in campaign.proc.stdout
    assert not list(campaign.folder.rglob("*.tmp")), "a temporary file was left behind"
    assert "asyncvm replay" in campaign.proc.stdout


@pytest.mark.slow
def test_same_seed_same_failures_for_jobs_1_and_2(campaign: Campaign, tmp_path: Path) -> None:
    two = stress(tmp_path, *BUGGY, "--jobs", "2")
    assert two.proc.returncode == 1, explain(two.proc)
    assert comparable(two.summary) == comparable(campaign.summary)
    for failure in campaign.failures:
        for name in ("schedule.json", "schedule.shrunk.json"):
            a, b = campaign.schedule(failure, name), two.schedule(failure, name)
            assert a["choices"] == b["choices"] and a["failure"] == b["failure"], (failure["signature"], name)
            assert a["execution"] == b["execution"] == failure["witness_run"]


def test_stop_on_first_failure_without_shrink(campaign: Campaign, tmp_path: Path) -> None:
    c = stress(tmp_path, *BUGGY, "--jobs", "1", "--stop-on-first-failure", "--no-shrink")
    assert c.proc.returncode == 1, explain(c.proc)
    summary = c.summary
    assert len(summary["failures"]) == 1 and summary["runs"] < RUNS
    first = min(campaign.failures, key=lambda f: f["first_run"])
    assert summary["failures"][0]["first_run"] == first["first_run"]
    assert summary["failures"][0]["signature"] == first["signature"]
    d = c.dir(summary["failures"][0])
    assert (d / "schedule.json").is_file() and not (d / "schedule.shrunk.json").exists()
    assert (d / "timeline.html").is_file() and (d / "trace.json").is_file() and (d / "events.jsonl").is_file()


@pytest.mark.parametrize("strategy", ["random", "pos", "dfs", "portfolio", "idpct"])
def test_strategies(strategy: str, tmp_path: Path) -> None:
    c = stress(tmp_path, "--strategy", strategy, "--param", "pages=4", "--runs", "30", "--jobs", "1", "--no-shrink")
    summary = c.summary
    assert summary["strategy"]["name"] == strategy
    assert 1 <= summary["runs"] <= 30
    assert c.proc.returncode == (1 if summary["failures"] else 0), explain(c.proc)


def test_time_budget(tmp_path: Path) -> None:
    c = stress(tmp_path, "--param", "pages=4", "--time", "1", "--jobs", "1", "--no-shrink")
    summary = c.summary
    assert summary["runs"] > 0
    assert summary["elapsed_s"] < 60
    assert c.proc.returncode == (1 if summary["failures"] else 0), explain(c.proc)


def test_the_folder_is_printed_once_and_files_share_one_mode(campaign: Campaign) -> None:
    out = campaign.proc.stdout + campaign.proc.stderr
    assert out.count("campaign folder: ") == 1, out
    mode = (campaign.folder / "ledger.jsonl").stat().st_mode & 0o777
    files = [p for p in campaign.folder.rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}
