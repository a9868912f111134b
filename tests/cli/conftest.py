"""End-to-end CLI tests: every command runs as a subprocess (``python -m asyncvm.cli``).

The campaigns are small (pre-fault vs PUNCH_HOLE on 8 pages with the ``drop_invalidate_retry`` bug,
600 PCT runs) and shared across tests through session fixtures, so the whole set stays within a
few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCENARIO = "prefault_vs_punch_hole"
BUG = "drop_invalidate_retry"
RUNS = 600
#: the campaign every comparison is made against: same seed, same spec, whatever runs it
BUGGY = ["--bug", BUG, "--param", "pages=8", "--seed", "1", "--runs", str(RUNS)]
ARTIFACTS = ("schedule.json", "schedule.shrunk.json", "events.jsonl", "trace.json", "timeline.html")
#: summary.json fields that depend on the machine, not on the campaign
VOLATILE = ("elapsed_s", "runs_per_second", "folder")


def cli_env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ASYNCVM_PROGRESS", None)
    env["COLUMNS"] = "160"
    env["PYTHONUNBUFFERED"] = "1"
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    return env


def cli_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "asyncvm.cli", *(str(a) for a in args)]


def run_cli(
    *args: Any, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_cmd(*args),
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback anywhere; returns the line."""
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, explain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, explain(proc)
    assert lines[0].startswith("asyncvm: error: "), explain(proc)
    for needle in needles:
        assert needle in lines[0], explain(proc)
    return lines[0]


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def read_ledger(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]


@dataclass
class Campaign:
    """A finished `asyncvm stress` run and its folder."""

    proc: subprocess.CompletedProcess[str]
    folder: Path

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.folder / "summary.json").read_text())

    @property
    def failures(self) -> list[dict[str, Any]]:
        return list(self.summary["failures"])

    def dir(self, failure: dict[str, Any]) -> Path:
        return self.folder / failure["dir"]

    def schedule(self, failure: dict[str, Any], name: str = "schedule.json") -> dict[str, Any]:
        return json.loads((self.dir(failure) / name).read_text())


def folder_of(proc: subprocess.CompletedProcess[str], cwd: Path) -> Path:
    for line in proc.stdout.splitlines():
        if line.startswith("campaign folder: "):
            return cwd / line.split(": ", 1)[1]
    raise AssertionError(f"no campaign folder in the output\n{explain(proc)}")


def stress(cwd: Path, *args: Any, env: dict[str, str] | None = None) -> Campaign:
    proc = run_cli("stress", SCENARIO, *args, "--out", "logs", cwd=cwd, env=env)
    assert proc.returncode in (0, 1), explain(proc)
    return Campaign(proc, folder_of(proc, cwd))


@pytest.fixture(scope="session")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """The reference campaign: one process, failures found, artifacts written."""
    cwd = tmp_path_factory.mktemp("jobs1")
    c = stress(cwd, *BUGGY, "--jobs", "1")
    assert c.proc.returncode == 1, explain(c.proc)
    assert c.failures, explain(c.proc)
    return c


@pytest.fixture(scope="session")
def first_failure(campaign: Campaign) -> dict[str, Any]:
    return campaign.failures[0]


@pytest.fixture(scope="session")
def schedule_file(campaign: Campaign, first_failure: dict[str, Any]) -> Path:
    return campaign.dir(first_failure) / "schedule.json"
