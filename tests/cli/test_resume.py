"""A campaign killed with SIGKILL midway keeps its ledger and failures; --resume finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from asyncvm.explore.runner import ran_so_far

from .conftest import (
    ARTIFACTS,
    BUGGY,
    SCENARIO,
    Campaign,
    assert_one_line_error,
    cli_cmd,
    cli_env,
    comparable,
    explain,
    folder_of,
    read_ledger,
    run_cli,
    stress,
)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigkill_midway_then_resume(campaign: Campaign, tmp_path: Path) -> None:
    out = tmp_path / "logs"
    log = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        cli_cmd("stress", SCENARIO, *BUGGY, "--jobs", "2", "--out", out),
        cwd=tmp_path,
        env=cli_env(),
        stdout=log[0],
        stderr=log[1],
        stdin=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        # Wait until the first failure is on disk, then kill the campaign process without warning.
        deadline = time.monotonic() + 180
        folder = None
        while time.monotonic() < deadline and proc.poll() is None:
            ledgers = list(out.glob(f"{SCENARIO}/*/ledger.jsonl"))
            if ledgers and '"type":"failure"' in ledgers[0].read_text():
                folder = ledgers[0].parent
                break
            time.sleep(0.02)
        assert folder is not None, f"no failure before the campaign ended (exit {proc.poll()})"
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log[0].close()
        log[1].close()

    # The worker processes notice and go away too.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    stray = [w for w in workers if _alive(w)]
    for w in stray:
        os.kill(w, signal.SIGKILL)
    assert not stray, "worker processes outlived the killed campaign"

    # Killed midway: no summary yet, but every failure the ledger names is complete on disk.
    assert not (folder / "summary.json").exists(), "the campaign finished before the kill"
    text = (folder / "ledger.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    recorded = [line for line in lines if line["type"] == "failure"]
    assert recorded
    for line in recorded:
        for name in ARTIFACTS:
            assert (folder / line["dir"] / name).is_file(), (line["dir"], name)
    assert sum(line["chunk"]["runs"] for line in lines if line["type"] == "chunk") < campaign.summary["runs"]
    # A kill can also cut the ledger's last line short: resume must cope with that too.
    with (folder / "ledger.jsonl").open("a") as f:
        f.write('{"type":"chunk","chunk":{"first":')

    resumed = run_cli("stress", SCENARIO, "--resume", folder, "--jobs", "1", cwd=tmp_path)
    assert resumed.returncode == 1, explain(resumed)
    summary = json.loads((folder / "summary.json").read_text())
    assert comparable(summary) == comparable(campaign.summary)
    lines = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    signatures = [line["signature"] for line in lines if line["type"] == "failure"]
    assert sorted(signatures) == sorted(f["signature"] for f in campaign.failures), "one failure line each"
    for failure in campaign.failures:
        for name in ARTIFACTS:
            assert (folder / failure["dir"] / name).is_file(), (failure["dir"], name)
        for name in ("schedule.json", "schedule.shrunk.json"):
            assert (folder / failure["dir"] / name).read_text() == (campaign.dir(failure) / name).read_text()

    # Resuming a finished campaign changes nothing.
    before = (folder / "ledger.jsonl").read_text()
    again = run_cli("stress", SCENARIO, "--resume", folder, "--jobs", "2", cwd=tmp_path)
    assert again.returncode == 1, explain(again)
    assert (folder / "ledger.jsonl").read_text() == before
    assert comparable(json.loads((folder / "summary.json").read_text())) == comparable(campaign.summary)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_stops_at_once_and_names_the_folder_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "logs"
    proc = subprocess.Popen(
        cli_cmd("stress", SCENARIO, "--param", "pages=8", "--runs", "100000", "--jobs", "2", "--out", out),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C would reach it
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ledgers = list(out.glob(f"{SCENARIO}/*/ledger.jsonl"))
            if ledgers and ledgers[0].read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        workers = _children(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert took < 20, f"Ctrl-C took {took:.1f}s"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("asyncvm: interrupted") and "--resume" in lines[-1], err
    # The summary so far: printed, and in summary.json, counting what the ledger has.
    folder = next(out.glob(f"{SCENARIO}/*/"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["interrupted"] is True
    # (chunks merge in execution order: one that finished early waits in the ledger for resume)
    ran = sum(line["chunk"]["runs"] for line in read_ledger(folder) if line["type"] == "chunk")
    assert 0 < ran and summary["runs"] <= ran
    assert f"{SCENARIO}: {summary['runs']} runs" in stdout, stdout
    time.sleep(0.5)
    stray = [w for w in workers if _alive(w)]
    for w in stray:
        os.kill(w, signal.SIGKILL)
    assert not stray, "worker processes outlived an interrupted campaign"


SMALL = ["--bug", "drop_invalidate_retry", "--param", "pages=8", "--seed", "2", "--no-shrink", "--jobs", "2"]


def test_resume_extends_a_finished_campaign_to_new_runs_and_time(tmp_path: Path) -> None:
    """--runs on a finished campaign runs the executions it did not have (the same ones a campaign
    asked for that many from the start); the scenario and options come from the folder; --time
    extends it again, to a new time budget."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "part").mkdir()
    whole = stress(tmp_path / "whole", *SMALL, "--runs", "150")
    part = stress(tmp_path / "part", *SMALL, "--runs", "100")
    assert part.summary["runs"] == 100
    more = run_cli("stress", "--resume", part.folder, "--runs", "150", "--jobs", "1", cwd=tmp_path)
    assert more.returncode in (0, 1), explain(more)
    assert comparable(part.summary) == comparable(whole.summary)
    assert json.loads((part.folder / "campaign.json").read_text())["spec"]["runs"] == 150
    assert more.stdout.count("campaign folder: ") == 1 and str(part.folder) in more.stdout
    timed = run_cli("stress", "--resume", part.folder, "--time", "3", "--jobs", "1", cwd=tmp_path)
    assert timed.returncode in (0, 1), explain(timed)
    assert part.summary["runs"] > 150
    assert json.loads((part.folder / "campaign.json").read_text())["time"] == 3
    _, used = ran_so_far(read_ledger(part.folder))
    assert 0 < used <= 3 + 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "pos"], "--strategy pos conflicts"),
        (["--seed", "7"], "--seed 7 conflicts"),
        (["--bug", "populate_skips_uptodate_check"], "--bug populate_skips_uptodate_check conflicts"),
        (["--param", "pages=4"], "--param pages=4 conflicts"),
        (["--no-shrink"], "--no-shrink conflicts"),
        (["--profile", "7.0"], "--profile 7.0 conflicts"),
        (["--runs", "10"], "--runs 10"),
        (["--time", "0.001"], "--time 0.001"),
        (["--strategy", "pct", "--seed", "1", "--runs", "599"], "--runs 599"),
    ],
)
def test_resume_refuses_a_conflicting_option(args: list[str], needle: str, campaign: Campaign, tmp_path: Path) -> None:
    before = (campaign.folder / "ledger.jsonl").read_text()
    assert_one_line_error(run_cli("stress", "--resume", campaign.folder, *args, cwd=tmp_path), needle)
    assert (campaign.folder / "ledger.jsonl").read_text() == before


def test_resume_with_the_same_options_and_no_scenario(campaign: Campaign, tmp_path: Path) -> None:
    same = run_cli("stress", "--resume", campaign.folder, "--seed", "1", "--param", "pages=8", cwd=tmp_path)
    assert same.returncode == 1, explain(same)
    assert folder_of(same, tmp_path).resolve() == campaign.folder.resolve()
    assert comparable(json.loads((campaign.folder / "summary.json").read_text())) == comparable(campaign.summary)


# -- issue 16: a damaged campaign folder is one line, never a traceback or a hang ------------------

CLEAN = ["--param", "pages=4", "--seed", "3", "--no-shrink", "--jobs", "1"]


@pytest.fixture(scope="module")
def clean_campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """A small finished campaign with no failures: 100 runs in chunks of 20."""
    c = stress(tmp_path_factory.mktemp("clean"), *CLEAN, "--runs", "100")
    assert c.proc.returncode == 0, explain(c.proc)
    return c


def _copy(campaign: Campaign, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(campaign.folder, where / "campaign"))


def _set(meta: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        meta = meta[p]
    meta[last] = value


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("spec.runs", "abc", "spec.runs"),
        ("spec.seed", "x", "spec.seed"),
        ("spec.seed", "1e999", "spec.seed"),
        ("spec.max_steps", "x", "spec.max_steps"),
        ("spec.depth", 0, "spec.depth"),
        ("spec.params", {"pages": 4, "bogus": 1}, "bogus"),
        ("spec.params", {"pages": 0}, "pages"),
        ("spec.scenario", "no_such_scenario", "spec.scenario: unknown scenario 'no_such_scenario'"),  # was: spec.params
        ("chunk", "x", "chunk"),
        ("chunk", 0, "chunk"),
        ("time", "1e999", "time"),
        ("time", -5, "time"),
    ],
)
def test_resume_of_a_damaged_campaign_json(
    field: str, value: Any, needle: str, clean_campaign: Campaign, tmp_path: Path
) -> None:
    folder = _copy(clean_campaign, tmp_path)
    meta = json.loads((folder / "campaign.json").read_text())
    _set(meta, field, 12345 if value == "1e999" else value)
    text = json.dumps(meta)
    if value == "1e999":
        text = text.replace(": 12345", ": 1e999")
    (folder / "campaign.json").write_text(text)
    proc = run_cli("stress", "--resume", folder, "--runs", "200", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, needle)


def test_an_edited_ledger_record_is_refused(clean_campaign: Campaign, tmp_path: Path) -> None:
    """A chunk record edited to count 10**9 once made the resumed campaign report 50 runs instead of
    200 with no error: the record's checksum no longer matches, and resuming says so."""
    folder = _copy(clean_campaign, tmp_path)
    lines = (folder / "ledger.jsonl").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "chunk")
    record = json.loads(lines[n])
    record["chunk"]["count"] = 10**9
    lines[n] = json.dumps(record, separators=(",", ":"))
    (folder / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("stress", "--resume", folder, "--runs", "200", cwd=tmp_path)
    assert_one_line_error(proc, f"line {n + 1}", "checksum")


def test_a_resumed_ledger_still_counts_every_run(clean_campaign: Campaign, tmp_path: Path) -> None:
    folder = _copy(clean_campaign, tmp_path)
    proc = run_cli("stress", "--resume", folder, "--runs", "200", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert json.loads((folder / "summary.json").read_text())["runs"] == 200


MODULE = """
import asyncvm
from asyncvm.scenarios.prefault_vs_punch_hole import prefault_vs_punch_hole


@asyncvm.scenario(name="user_scenario", params={"pages": 4})
async def user_scenario(kvm, pages=4):
    await prefault_vs_punch_hole(kvm, vcpus=2, pages=pages, hole=2)
"""


def test_resume_imports_a_module_only_when_the_user_names_it(tmp_path: Path) -> None:
    marker = tmp_path / "imported.marker"
    (tmp_path / "user_mod.py").write_text(MODULE + f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (tmp_path / "other_mod.py").write_text(MODULE.replace("user_scenario", "other_scenario"))
    proc = run_cli(
        "stress",
        "user_scenario",
        "--module",
        "user_mod.py",
        "--runs",
        "40",
        "--jobs",
        "1",
        "--out",
        "logs",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    folder = folder_of(proc, tmp_path)
    marker.unlink()
    proc = run_cli("stress", "--resume", folder, "--runs", "60", cwd=tmp_path)
    assert_one_line_error(proc, "--module", "user_mod.py")
    assert not marker.exists(), "resume imported the module campaign.json names"
    proc = run_cli("stress", "--resume", folder, "--runs", "60", "--module", "other_mod.py", cwd=tmp_path)
    assert_one_line_error(proc, "--module", "user_mod.py")
    proc = run_cli("stress", "--resume", folder, "--runs", "60", "--module", "user_mod.py", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert json.loads((folder / "summary.json").read_text())["runs"] == 60


def test_a_resealed_ledger_record_outside_the_chunk_grid_is_refused(clean_campaign: Campaign, tmp_path: Path) -> None:
    """Even with its checksum recomputed, a chunk larger than the campaign's chunks is refused."""
    from asyncvm.explore.files import seal

    folder = _copy(clean_campaign, tmp_path)
    lines = (folder / "ledger.jsonl").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "chunk")
    record = {k: v for k, v in json.loads(lines[n]).items() if k != "sum"}
    record["chunk"]["count"] = 10**9
    lines[n] = json.dumps(seal(record), separators=(",", ":"))
    (folder / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("stress", "--resume", folder, "--runs", "200", cwd=tmp_path)
    assert_one_line_error(proc, f"line {n + 1}", "chunk")
