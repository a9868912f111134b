"""`asyncvm bench`: each benchmark's JSON as it finishes, progress on stderr, one-line errors.

These run the quick (smoke) variants and check the shape of what is reported, never a timing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from asyncvm.bench import BENCHMARKS
from asyncvm.bench.race import DEFAULT_STRATEGY
from asyncvm.bugs import BUGS

from .conftest import assert_one_line_error, cli_env, explain, run_cli


def _check_scheduling_decision(r: dict[str, Any]) -> None:
    for key in ("bare_send_us", "executor_decision_us", "ratio_executor_vs_bare_send", "trio_lowlevel_handoff_us"):
        assert r[key] > 0, key


def _check_executions_per_second(r: dict[str, Any]) -> None:
    assert r["bare_send_us"] > 0
    assert set(r["strategies"]) >= {"random", "pct"}
    for row in r["strategies"].values():
        assert row["executions_per_second"] > 0 and row["steps_per_execution"] > 0
        # sends per execution is the execution's cost in bare coro.send() switches
        expected = 1e6 / (row["executions_per_second"] * r["bare_send_us"])
        assert row["sends_per_execution"] == pytest.approx(expected, rel=0.01)


def _check_jobs_scaling(r: dict[str, Any]) -> None:
    assert r["cpu_count"] >= 1 and len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    assert r["jobs1"]["executions_per_second"] > 0 and r["jobs2"]["executions_per_second"] > 0
    assert r["speedup_jobs2_vs_jobs1"] > 0
    # One campaign, whatever runs it: the same executions, step for step.
    assert r["jobs1"]["runs"] == r["jobs2"]["runs"] == r["runs"]
    assert r["jobs1"]["steps"] == r["jobs2"]["steps"]
    if "skipped" not in r["dask"]:
        assert r["dask"]["workers"] == 2 and r["dask"]["executions_per_second"] > 0
        assert r["dask"]["steps"] == r["jobs1"]["steps"]


def _check_first_failure(r: dict[str, Any]) -> None:
    assert r["strategy"] == DEFAULT_STRATEGY
    assert set(r["bugs"]) == set(BUGS)
    for name, row in r["bugs"].items():
        assert row["scenario"] == BUGS[name].scenario
        for side in (DEFAULT_STRATEGY, "trio_uncontrolled"):
            seconds, runs = row[side]["median_seconds_to_first_failure"], row[side]["median_runs_to_first_failure"]
            if isinstance(seconds, str):
                assert seconds.startswith("not found in ") and runs == seconds
            else:
                assert seconds >= 0 and runs >= 1


def _check_scale(r: dict[str, Any]) -> None:
    assert set(r["sizes"]) == {"1GiB", "16GiB", "256GiB"}


def _check_false_positives(r: dict[str, Any]) -> None:
    assert r["scenarios"] and r["failures"] == 0
    assert r["executions"] == sum(row["runs"] for row in r["scenarios"].values())


def _check_fuzz(r: dict[str, Any]) -> None:
    assert r["bugs"] == len(BUGS) and set(r["per_bug"]) == set(BUGS)
    assert r["found"] == sum(row["found"] for row in r["per_bug"].values())
    for row in r["per_bug"].values():
        assert row["runs"] > 0
        if row["found"]:
            assert 1 <= row["runs_to_first"] <= row["runs"] and row["seconds_to_first"] >= 0
            # measured when the hunt stopped at it (`seconds` is rounded to 0.1 s)
            assert row["seconds_to_first"] <= row["seconds"] + 0.06


def _check_strategy_comparison(r: dict[str, Any]) -> None:
    assert r["strategies"] == ["random", "pct", "pos", "feedback"] and r["seeds"] >= 1
    assert set(r["bugs"]) == set(BUGS)
    for name, row in r["bugs"].items():
        assert row["scenario"] == BUGS[name].scenario
        for strategy in r["strategies"]:
            runs = row[strategy]["median_runs_to_first_failure"]
            assert runs == f"not found in {r['max_runs']} runs" if isinstance(runs, str) else runs >= 1
    assert sum(r["best_median_count"].values()) >= sum(
        1
        for row in r["bugs"].values()
        if any(not isinstance(row[s]["median_runs_to_first_failure"], str) for s in r["strategies"])
    )


CHECKS = {
    "scheduling_decision": _check_scheduling_decision,
    "executions_per_second": _check_executions_per_second,
    "jobs_scaling": _check_jobs_scaling,
    "first_failure": _check_first_failure,
    "scale": _check_scale,
    "false_positives": _check_false_positives,
    "fuzz": _check_fuzz,
    "strategy_comparison": _check_strategy_comparison,
}


def test_every_benchmark_has_a_test() -> None:
    assert set(CHECKS) == set(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_benchmark_prints_one_json_line_and_progress_on_stderr(name: str, tmp_path: Path) -> None:
    proc = run_cli("bench", "--quick", "--only", name, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, explain(proc)
    result = json.loads(lines[0])
    assert result["benchmark"] == name and result["quick"] is True
    CHECKS[name](result)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("asyncvm bench: ")]
    assert any(name in line and re.search(r" \d+/\d+", line) for line in progress), explain(proc)
    assert f"{name} done in " in progress[-1], explain(proc)


def test_out_folder_gets_one_file_per_benchmark_in_order(tmp_path: Path) -> None:
    proc = run_cli("bench", "--quick", "--only", "scale,scheduling_decision", "--out", "results", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == "", explain(proc)
    folder = tmp_path / "results"
    assert sorted(p.name for p in folder.iterdir()) == ["scale.json", "scheduling_decision.json"]
    for name in ("scale", "scheduling_decision"):
        assert json.loads((folder / f"{name}.json").read_text())["benchmark"] == name
    done = [line for line in proc.stderr.splitlines() if " done in " in line]
    assert "scale" in done[0] and "scheduling_decision" in done[1], explain(proc)


@pytest.mark.parametrize(("given", "suggested"), [("exec_per_sec", "executions_per_second"), ("scael", "scale")])
def test_unknown_benchmark_is_one_line_with_the_closest_name(given: str, suggested: str, tmp_path: Path) -> None:
    proc = run_cli("bench", "--only", given, cwd=tmp_path)
    assert_one_line_error(proc, f"unknown benchmark {given!r}", f"did you mean {suggested!r}")
    assert proc.stdout == ""


def test_help_fits_80_columns_and_names_the_benchmarks(tmp_path: Path) -> None:
    env = cli_env()
    env["COLUMNS"] = "80"
    proc = run_cli("bench", "--help", cwd=tmp_path, env=env)
    assert proc.returncode == 0, explain(proc)
    text = proc.stdout
    assert "<bool>" not in text and "<list[str]>" not in text and "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for option in ("--only", "--quick", "--out", "--help"):
        assert re.search(rf"{option}\b", text), option
    flat = " ".join(text.replace("│", " ").split())
    for name in BENCHMARKS:
        assert name in flat, name


def test_first_failure_uses_the_strategy_stress_defaults_to(tmp_path: Path) -> None:
    proc = run_cli("stress", "prefault_vs_punch_hole", "--runs", "1", "--jobs", "1", "--out", "logs", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    campaign = json.loads(next((tmp_path / "logs").glob("*/*/campaign.json")).read_text())
    assert campaign["spec"]["strategy"] == DEFAULT_STRATEGY
