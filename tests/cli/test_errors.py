"""Usage and input errors: exit 2 and exactly one line on stderr, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCENARIO, Campaign, assert_one_line_error, cli_env, explain, run_cli

STRESS_ERRORS = {
    "unknown_scenario": (["stress", "no_such_scenario"], "unknown scenario 'no_such_scenario'"),
    "unknown_strategy": (["stress", SCENARIO, "--strategy", "bogus"], "unknown strategy 'bogus'"),
    "unknown_profile": (["stress", SCENARIO, "--profile", "2.6"], "unknown profile '2.6'"),
    "unknown_bug": (["stress", SCENARIO, "--bug", "no_such_bug"], "unknown bug 'no_such_bug'"),
    "param_without_value": (["stress", SCENARIO, "--param", "pages"], "KEY=VALUE"),
    "unknown_param": (["stress", SCENARIO, "--param", "bogus=1"], "bogus"),
    "param_wrong_type": (["stress", SCENARIO, "--param", "pages=eight"], "pages"),
    "zero_runs": (["stress", SCENARIO, "--runs", "0"], "--runs"),
    "runs_not_a_number": (["stress", SCENARIO, "--runs", "many"], "--runs"),
    "negative_jobs": (["stress", SCENARIO, "--jobs", "-3"], "--jobs"),
    "negative_time": (["stress", SCENARIO, "--time", "-1"], "--time"),
    "unknown_option": (["stress", SCENARIO, "--frobnicate"], "--frobnicate"),
    "missing_scenario": (["stress"], "scenario"),
    "unknown_module": (["stress", SCENARIO, "--module", "no_such_module_xyz"], "no_such_module_xyz"),
    "resume_not_a_campaign": (["stress", SCENARIO, "--resume", "."], "not a campaign folder"),
    "unknown_command": (["frobnicate"], "frobnicate"),
    "replay_missing_file_argument": (["replay"], "FILE"),
    "replay_bad_log_level": (["replay", "x.json", "--log-level", "loud"], "--log-level"),
}


@pytest.mark.parametrize("case", list(STRESS_ERRORS))
def test_usage_errors(case: str, tmp_path: Path) -> None:
    args, needle = STRESS_ERRORS[case]
    proc = run_cli(*args, "--out", "logs", cwd=tmp_path) if args[0] == "stress" else run_cli(*args, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("ledger.jsonl"))


@pytest.mark.parametrize(
    ("contents", "needle"),
    [("{", "malformed campaign file"), ('{"spec": {"scenario": 1, "bogus": 2}}', "malformed campaign file")],
)
def test_resume_of_a_broken_campaign_folder(contents: str, needle: str, tmp_path: Path) -> None:
    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "campaign.json").write_text(contents)
    assert_one_line_error(run_cli("stress", SCENARIO, "--resume", folder, cwd=tmp_path), needle)


def test_resume_of_another_scenarios_campaign(campaign: Campaign, tmp_path: Path) -> None:
    proc = run_cli("stress", "fault_vs_attribute_flip", "--resume", campaign.folder, cwd=tmp_path)
    assert_one_line_error(proc, SCENARIO)


# -- bad, truncated and foreign schedule files ------------------------------------------------------


def _edit(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for key, value in changes.items():
        if key == "scenario_name":
            out["scenario"]["name"] = value
        elif key == "params":
            out["scenario"]["params"] = value
        else:
            out[key] = value
    return out


def make_bad_file(case: str, good: Path, campaign: Campaign, where: Path) -> tuple[Path, str]:
    """Write the bad file for `case`; returns it and a substring the error line must contain."""
    text = good.read_text()
    data = json.loads(text)
    path = where / f"{case}.json"
    params = dict(data["scenario"]["params"])
    contents: str | bytes | dict[str, Any] | list[Any]
    needle = str(path)
    if case == "missing":
        return where / "does-not-exist.json", "no such file"
    if case == "directory":
        d = where / "a-directory.json"
        d.mkdir()
        return d, "cannot read"
    if case == "empty":
        contents, needle = "", "truncated"
    elif case == "truncated":
        contents, needle = text[: len(text) // 2], "truncated"
    elif case == "truncated_to_one_byte":
        contents, needle = "{", "truncated"
    elif case == "binary":
        contents, needle = bytes(range(256)) * 8, str(path)
    elif case == "not_json":
        contents, needle = "this is not a schedule\n", "not valid JSON"
    elif case == "foreign_trace":
        contents, needle = (campaign.dir(campaign.failures[0]) / "trace.json").read_text(), "not an asyncvm schedule"
    elif case == "foreign_summary":
        contents, needle = (campaign.folder / "summary.json").read_text(), "not an asyncvm schedule"
    elif case == "foreign_list":
        contents, needle = [1, 2, 3], "not an asyncvm schedule"
    elif case == "future_format_version":
        contents, needle = _edit(data, version=99), "version"
    elif case == "other_asyncvm_version":
        contents, needle = _edit(data, asyncvm="0.0.0-other"), "--force"
    elif case == "unknown_scenario":
        contents, needle = _edit(data, scenario_name="no_such_scenario"), "unknown scenario 'no_such_scenario'"
    elif case == "scenario_not_an_object":
        contents, needle = _edit(data, scenario=SCENARIO), "malformed"
    elif case == "choices_missing":
        contents = {k: v for k, v in data.items() if k != "choices"}
        needle = "malformed"
    elif case == "choices_not_a_list":
        contents, needle = _edit(data, choices={"0": 1}), "choices"
    elif case == "choice_garbage":
        contents, needle = _edit(data, choices=[0, "vcpu0", 1]), "choice 1"
    elif case == "choice_negative":
        contents, needle = _edit(data, choices=[0, -1]), "choice 1"
    elif case == "failure_malformed":
        contents, needle = _edit(data, failure={"kind": "x"}), "malformed"
    elif case == "param_wrong_type":
        contents, needle = _edit(data, params={**params, "pages": "eight"}), "pages"
    elif case == "param_unknown":
        contents, needle = _edit(data, params={**params, "bogus": 1}), "bogus"
    elif case == "choices_diverge":
        contents, needle = _edit(data, choices=[7] * len(data["choices"])), "diverged"
    else:
        raise AssertionError(case)
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif isinstance(contents, str):
        path.write_text(contents)
    else:
        path.write_text(json.dumps(contents))
    return path, needle


ALL_CASES = [
    "missing",
    "directory",
    "empty",
    "truncated",
    "truncated_to_one_byte",
    "binary",
    "not_json",
    "foreign_trace",
    "foreign_summary",
    "foreign_list",
    "future_format_version",
    "other_asyncvm_version",
    "unknown_scenario",
    "scenario_not_an_object",
    "choices_missing",
    "choices_not_a_list",
    "choice_garbage",
    "choice_negative",
    "failure_malformed",
    "param_wrong_type",
    "param_unknown",
    "choices_diverge",
]
SOME_CASES = ["truncated", "foreign_trace", "future_format_version", "unknown_scenario", "choices_diverge"]


@pytest.mark.parametrize(
    ("command", "case"),
    [("replay", c) for c in ALL_CASES] + [(cmd, c) for cmd in ("shrink", "show") for c in SOME_CASES],
)
def test_bad_schedule_files(command: str, case: str, campaign: Campaign, schedule_file: Path, tmp_path: Path) -> None:
    bad, needle = make_bad_file(case, schedule_file, campaign, tmp_path)
    extra = ["--html", tmp_path / "t.html", "--trace", tmp_path / "t.json"] if command == "show" else []
    proc = run_cli(command, bad, *extra, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "t.html").exists() and not (tmp_path / "t.json").exists()
    assert not list(tmp_path.glob("*.shrunk.json"))


def test_other_version_replays_with_force(campaign: Campaign, schedule_file: Path, tmp_path: Path) -> None:
    bad, _ = make_bad_file("other_asyncvm_version", schedule_file, campaign, tmp_path)
    proc = run_cli("replay", bad, "--force", cwd=tmp_path)
    assert proc.returncode == 1, explain(proc)
    assert "REPRODUCED" in proc.stdout


def test_replay_never_imports_code_named_by_the_file(schedule_file: Path, tmp_path: Path) -> None:
    """A file naming a module or a path gets an unknown-scenario error; that code never runs."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported.marker"
    (code / "evil_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import asyncvm\n\n@asyncvm.scenario(name='evil_mod:evil')\nasync def evil(kvm):\n    pass\n"
    )
    data = json.loads(schedule_file.read_text())
    cases = [("replay", "evil_mod:evil"), ("replay", str(code / "evil_mod.py")), ("show", "evil_mod")]
    for command, name in cases:
        data["scenario"] = {"name": name, "params": {}, "module": "evil_mod", "path": str(code / "evil_mod.py")}
        bad = tmp_path / "evil.json"
        bad.write_text(json.dumps(data))
        proc = run_cli(command, bad, cwd=tmp_path, env=cli_env(code))
        assert_one_line_error(proc, "unknown scenario")
        assert not marker.exists(), f"{command} imported code named by the file"
