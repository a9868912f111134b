"""`asyncvm replay | shrink | show` on the schedules a campaign wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCENARIO, Campaign, assert_one_line_error, explain, run_cli
from .test_trace import check_chrome_trace


@pytest.fixture(scope="session")
def clean_schedule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A schedule of one execution that does not fail (recorded through the Python API)."""
    from asyncvm.explore.engine import Program, scenario_params
    from asyncvm.explore.scenarios import get_scenario
    from asyncvm.explore.schedule import Schedule
    from asyncvm.runtime.strategies import make_strategy

    fn = get_scenario(SCENARIO).fn
    program = Program(fn, scenario_params(fn, {"pages": 8}))
    for seed in range(50):
        strategy = make_strategy("random", seed)
        strategy.new_execution(0)
        result = program.run(strategy)
        if result.failure is None:
            break
    else:
        raise AssertionError("no clean execution in 50 random schedules of a correct model")
    path = tmp_path_factory.mktemp("clean") / "clean.json"
    Schedule.from_execution(program, result, strategy=strategy.describe(), seed=seed, execution=0).save(path)
    return path


def test_replay_reproduces_the_failure(campaign: Campaign, first_failure: dict[str, Any], tmp_path: Path) -> None:
    schedule = campaign.schedule(first_failure)
    events = (campaign.dir(first_failure) / "events.jsonl").read_text().splitlines()
    proc = run_cli("replay", campaign.dir(first_failure) / "schedule.json", "--context", "5", cwd=tmp_path)
    assert proc.returncode == 1, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("REPRODUCED ") and first_failure["message"] in lines[-1]
    # The failure with the 5 events just before it, then the failure event itself, at its step.
    failing = [i for i, line in enumerate(lines) if line.split()[2:3] == ["failure"]]
    assert len(failing) == 1 and failing[0] == len(lines) - 2, proc.stdout
    step = schedule["failure"]["step"]
    assert lines[-2].split()[0] == str(step)
    before = [line for line in lines[-8:-2] if line.strip() != "..."]
    assert len(before) == 5 and all(int(line.split()[0]) <= step for line in before), proc.stdout
    # --log-level debug prints every event of the execution (the same ones events.jsonl holds).
    full = run_cli("replay", campaign.dir(first_failure) / "schedule.json", "--log-level", "debug", cwd=tmp_path)
    assert full.returncode == 1, explain(full)
    assert len(full.stdout.splitlines()) == len(events) + 1


def test_replay_show_and_timeline_mark_the_failing_step_and_each_cause(campaign: Campaign, tmp_path: Path) -> None:
    """A stale install names the steps that make it a race (snapshot, invalidate_begin, install, ...):
    replay prints each of those events marked with its role, even outside --context; show marks
    them in its table and lists them; the timeline labels them."""
    with_causes = [f for f in campaign.failures if campaign.schedule(f)["failure"]["evidence"].get("steps")]
    assert with_causes, "the campaign found no failure that names its cause steps"
    failure = with_causes[0]
    path = campaign.dir(failure) / "schedule.json"
    recorded = campaign.schedule(failure)["failure"]
    causes = recorded["evidence"]["steps"]
    assert causes["install"] == recorded["step"] and len(causes) >= 3, causes
    proc = run_cli("replay", path, "--context", "2", cwd=tmp_path)
    assert proc.returncode == 1, explain(proc)
    for role, step in causes.items():
        marked = [line for line in proc.stdout.splitlines() if line.endswith(f"<-- {role}") or f"<-- {role}," in line]
        assert len(marked) == 1 and marked[0].split()[0] == str(step), (role, step, proc.stdout)
    assert "..." in proc.stdout, "the left-out events between the causes are shown as ..."
    html = tmp_path / "t.html"
    show = run_cli("show", path, "--html", html, cwd=tmp_path)
    assert show.returncode == 0, explain(show)
    page = html.read_text()
    for role, step in causes.items():
        assert f"<-- {role}" in show.stdout, (role, show.stdout[-3000:])
        assert f"  step {step:>5}  {role}" in show.stdout
        assert f'class="cause-label" data-role="{role}" data-step="{step}">{role} (step {step})<' in page
    assert page.count('class="cause-row"') >= len(set(causes.values())) - 1
    assert f'data-step="{recorded["step"]}">FAILURE at failing step {recorded["step"]}' in page


def test_replay_of_every_failure_and_its_shrunk_schedule(campaign: Campaign, tmp_path: Path) -> None:
    for failure in campaign.failures:
        for name in ("schedule.json", "schedule.shrunk.json"):
            proc = run_cli("replay", campaign.dir(failure) / name, cwd=tmp_path)
            assert proc.returncode == 1, explain(proc)
            # The same signature; a shrunk schedule may fail it in another task or page.
            message = campaign.schedule(failure, name)["failure"]["message"]
            assert "REPRODUCED" in proc.stdout and message.split(" (")[0][:20] in proc.stdout


def test_replay_of_a_clean_schedule_exits_0(clean_schedule: Path, tmp_path: Path) -> None:
    proc = run_cli("replay", clean_schedule, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "no failure" in proc.stdout


def test_shrink_writes_the_shrunk_schedule(campaign: Campaign, first_failure: dict[str, Any], tmp_path: Path) -> None:
    original = campaign.schedule(first_failure)
    copy = tmp_path / "found.json"
    shutil.copy(campaign.dir(first_failure) / "schedule.json", copy)
    proc = run_cli("shrink", copy, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    shrunk_path = tmp_path / "found.shrunk.json"
    shrunk = json.loads(shrunk_path.read_text())
    assert shrunk["failure"]["signature"] == original["failure"]["signature"]
    assert (shrunk["preemptions"], shrunk["steps"]) <= (original["preemptions"], original["steps"])
    sizes = (
        f"{original['preemptions']} -> {shrunk['preemptions']} preemptions, "
        f"{original['steps']} -> {shrunk['steps']} steps"
    )
    assert proc.stdout.startswith(sizes) and str(shrunk_path.name) in proc.stdout, proc.stdout
    assert ("(1-minimal)" if shrunk["strategy"]["minimal"] else "not 1-minimal") in proc.stdout
    # The campaign's own shrunk schedule is the same one.
    assert shrunk["choices"] == campaign.schedule(first_failure, "schedule.shrunk.json")["choices"]
    out = tmp_path / "elsewhere" / "small.json"
    proc = run_cli("shrink", copy, "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert json.loads(out.read_text())["choices"] == shrunk["choices"]
    replayed = run_cli("replay", out, cwd=tmp_path)
    assert replayed.returncode == 1 and "REPRODUCED" in replayed.stdout, explain(replayed)


def test_shrink_of_a_clean_schedule_is_an_input_error(clean_schedule: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("shrink", clean_schedule, cwd=tmp_path), "no failure")


def test_show_prints_timeline_and_writes_html_and_trace(
    campaign: Campaign, first_failure: dict[str, Any], tmp_path: Path
) -> None:
    schedule = campaign.schedule(first_failure)
    html, trace = tmp_path / "out" / "timeline.html", tmp_path / "out" / "trace.json"
    proc = run_cli(
        "show", campaign.dir(first_failure) / "schedule.json", "--html", html, "--trace", trace, cwd=tmp_path
    )
    assert proc.returncode == 0, explain(proc)
    for task in schedule["tasks"]:
        assert task in proc.stdout
    assert "FAILURE" in proc.stdout and f"failure: {first_failure['kind']}" in proc.stdout
    # Its size and its shrunk schedule's, as the summary reports them; the shrunk one names both.
    shrunk = first_failure["shrunk"]
    assert (
        f"size: {schedule['preemptions']} preemptions, {schedule['steps']} steps; "
        f"shrunk: {shrunk['preemptions']} preemptions, {shrunk['steps']} steps"
    ) in proc.stdout
    small = run_cli("show", campaign.dir(first_failure) / "schedule.shrunk.json", cwd=tmp_path)
    assert small.returncode == 0, explain(small)
    assert (
        f"size: {shrunk['preemptions']} preemptions, {shrunk['steps']} steps, 1-minimal; "
        f"shrunk from {schedule['preemptions']} preemptions, {schedule['steps']} steps"
    ) in small.stdout
    page = html.read_text()
    assert 'id="failing-step"' in page and f"failing step {schedule['failure']['step']}" in page
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    doc = json.loads(trace.read_text())
    check_chrome_trace(doc, schedule["tasks"], schedule["failure"]["step"])


def test_show_of_a_clean_schedule(clean_schedule: Path, tmp_path: Path) -> None:
    proc = run_cli("show", clean_schedule, "--html", tmp_path / "t.html", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "no failure" in (tmp_path / "t.html").read_text()
