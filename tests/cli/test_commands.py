"""`--help` of every command, `asyncvm scenarios`, and scenarios registered from a user module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import assert_one_line_error, cli_env, explain, folder_of, run_cli

COMMANDS = ["stress", "replay", "shrink", "show", "scenarios", "bugs", "bench"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None, tmp_path: Path) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "Usage" in proc.stdout and "Traceback" not in proc.stderr
    if command is None:
        for c in COMMANDS:
            assert c in proc.stdout
    if command == "stress":
        for option in (
            "--runs",
            "--time",
            "--strategy",
            "--seed",
            "--jobs",
            "--dask",
            "--profile",
            "--bug",
            "--stop-on-first-failure",
            "--out",
            "--no-shrink",
            "--resume",
            "--module",
        ):
            assert option in proc.stdout, option


@pytest.mark.parametrize("command", [None, *(c for c in COMMANDS if c != "bench")])
def test_help_fits_80_columns(command: str | None, tmp_path: Path) -> None:
    """Every line within 80 columns, every option named in full, no type labels on flags."""
    import typer

    from asyncvm.cli import app

    env = cli_env()
    env["COLUMNS"] = "80"
    proc = run_cli(*([command] if command else []), "--help", cwd=tmp_path, env=env)
    assert proc.returncode == 0, explain(proc)
    for line in proc.stdout.splitlines():
        assert len(line) <= 80, line
        assert "…" not in line and "<bool>" not in line, line
        if not line.startswith("Usage:") and line.split()[:1] != ["bench"]:
            assert not line.rstrip().endswith("..."), line  # a command's description cut short
    group = typer.main.get_command(app)
    cmd = group.commands[command] if command else group  # type: ignore[attr-defined]
    for param in cmd.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert f" {name}" in proc.stdout or f"{name}," in proc.stdout, (name, proc.stdout)


def test_stress_help_names_the_bugs_and_bugs_lists_them(tmp_path: Path) -> None:
    from asyncvm.bugs import BUGS

    text = run_cli("stress", "--help", cwd=tmp_path).stdout
    assert "asyncvm bugs" in " ".join(text.split())  # the bug list wraps wherever it ends
    listed = run_cli("bugs", cwd=tmp_path)
    assert listed.returncode == 0, explain(listed)
    lines = listed.stdout.splitlines()
    assert len(lines) == len(BUGS)
    for name, bug in BUGS.items():
        assert name in " ".join(text.split())
        line = next(line for line in lines if line.split()[0] == name)
        assert f"{bug.scenario}: {bug.changes}" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["stress", "prefault_vs_punchhole"], "did you mean 'prefault_vs_punch_hole'"),
        (
            ["stress", "prefault_vs_punch_hole", "--bug", "drop_invalidate_retyr"],
            "did you mean 'drop_invalidate_retry'",
        ),
        (["stress", "prefault_vs_punch_hole", "--strategy", "pcd"], "did you mean 'pct'"),
    ],
)
def test_unknown_names_suggest_the_closest(args: list[str], needle: str, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(*args, "--out", "logs", cwd=tmp_path), needle)


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("asyncvm")
    if not script.exists():
        found = shutil.which("asyncvm")
        if found is None:
            pytest.skip("the asyncvm console script is not installed")
        script = Path(found)
    proc = subprocess.run([str(script), "scenarios"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "prefault_vs_punch_hole" in proc.stdout
    bad = subprocess.run(
        [str(script), "stress", "no_such"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_scenarios_lists_bundled_with_whole_descriptions_and_params(tmp_path: Path) -> None:
    from asyncvm.explore.scenarios import REGISTRY, load_bundled

    load_bundled()
    bundled = {name: spec for name, spec in REGISTRY.items() if spec.module.startswith("asyncvm.scenarios.")}
    assert "prefault_vs_punch_hole" in bundled
    env = cli_env()
    env["COLUMNS"] = "80"
    proc = run_cli("scenarios", cwd=tmp_path, env=env)
    assert proc.returncode == 0, explain(proc)
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    lines = proc.stdout.splitlines()
    flat = " ".join(proc.stdout.split())
    for name, spec in bundled.items():
        head = next((line for line in lines if line.split()[:1] == [name]), None)
        assert head is not None, f"{name} not listed\n{proc.stdout}"
        for key, value in spec.params.items():
            assert f"{key}={value!r}" in head, head
        # The whole description (every paragraph of the docstring), not just its first line.
        assert len(spec.description.split("\n\n")) > 1, name
        assert " ".join(spec.description.split()) in flat, name


USER_MODULE = '''
"""A user's own scenarios, registered from any importable module (asyncvm --module my_races)."""

import asyncvm
from asyncvm.runtime import point


@asyncvm.scenario(name="user_lost_update", params={"tasks": 2})
async def user_lost_update(kvm, tasks=2):
    """Tasks increment a shared counter without a lock: a lost update."""
    box = {"n": 0}

    async def inc():
        seen = box["n"]
        await point(None)
        box["n"] = seen + 1

    async with asyncvm.TaskGroup() as tg:
        for i in range(tasks):
            tg.spawn(inc, name=f"inc{i}")
    assert box["n"] == tasks, f"lost update: counter is {box['n']}, expected {tasks}"
'''


@pytest.fixture
def user_module(tmp_path: Path) -> Path:
    pkg = tmp_path / "userpath"
    pkg.mkdir()
    (pkg / "my_races.py").write_text(textwrap.dedent(USER_MODULE))
    return pkg


def test_module_registers_user_scenario(tmp_path: Path, user_module: Path) -> None:
    env = cli_env(user_module)
    listed = run_cli("scenarios", "--module", "my_races", cwd=tmp_path, env=env)
    assert listed.returncode == 0, explain(listed)
    assert "Tasks increment a shared counter without a lock" in listed.stdout
    assert "tasks=2" in listed.stdout
    # Without --module the name is unknown.
    assert "user_lost_update" not in run_cli("scenarios", cwd=tmp_path, env=env).stdout

    # A campaign on two worker processes: the workers import the user module too.
    proc = run_cli(
        "stress",
        "user_lost_update",
        "--module",
        "my_races",
        "--runs",
        "200",
        "--jobs",
        "2",
        "--seed",
        "3",
        "--param",
        "tasks=2",
        "--out",
        "logs",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1, explain(proc)
    folder = folder_of(proc, tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["runs"] == 200 and summary["failures"], summary
    schedule = folder / summary["failures"][0]["dir"] / "schedule.json"
    data = json.loads(schedule.read_text())
    # The file records the module that registered its scenario, as data.
    assert data["scenario"] == {"name": "user_lost_update", "params": {"tasks": 2}, "module": "my_races"}
    # The replay command the campaign prints works as printed.
    printed = next(line for line in proc.stdout.splitlines() if "replay: " in line).split("replay: ", 1)[1]
    assert printed.endswith(" --module my_races"), printed
    replayed = run_cli(*printed.split()[1:], cwd=tmp_path, env=env)
    assert replayed.returncode == 1, explain(replayed)
    assert "REPRODUCED" in replayed.stdout and "lost update" in replayed.stdout
    # Without --module, replay imports nothing: it says which --module the file needs.
    assert_one_line_error(
        run_cli("replay", schedule, cwd=tmp_path, env=env), "unknown scenario 'user_lost_update'", "--module my_races"
    )


@pytest.mark.parametrize("how", ["name", "relative_path", "absolute_path"])
def test_module_by_name_from_the_current_directory_or_by_path(how: str, tmp_path: Path) -> None:
    """No PYTHONPATH needed: a module name is importable from the current directory, and a .py
    path works too; either is what the schedule records and what replay asks for."""
    (tmp_path / "my_races.py").write_text(textwrap.dedent(USER_MODULE))
    given = {"name": "my_races", "relative_path": "./my_races.py", "absolute_path": str(tmp_path / "my_races.py")}[how]
    recorded = "my_races" if how == "name" else str(tmp_path / "my_races.py")
    env = cli_env()
    env.pop("PYTHONPATH", None)
    listed = run_cli("scenarios", "--module", given, cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "user_lost_update" in listed.stdout, explain(listed)
    proc = run_cli(
        "stress", "user_lost_update", "--module", given, "--runs", "30", "--jobs", "2", "--out", "logs",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, explain(proc)
    printed = next(line for line in proc.stdout.splitlines() if "replay: " in line).split("replay: ", 1)[1]
    assert printed.endswith(f" --module {recorded}"), printed
    schedule = Path(printed.split()[2])
    if not schedule.is_absolute():
        schedule = tmp_path / schedule
    assert json.loads(schedule.read_text())["scenario"]["module"] == recorded
    replayed = run_cli(*printed.split()[1:], cwd=tmp_path, env=env)
    assert replayed.returncode == 1 and "REPRODUCED" in replayed.stdout, explain(replayed)
    assert_one_line_error(run_cli("replay", schedule, cwd=tmp_path, env=env), f"--module {recorded}")


def test_a_missing_module_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("scenarios", "--module", "./nope.py", cwd=tmp_path), "nope.py", "no such file")


def test_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "broken_mod.py").write_text("raise RuntimeError('broken on purpose')\n")
    proc = run_cli("scenarios", "--module", "broken_mod", cwd=tmp_path, env=cli_env(pkg))
    assert_one_line_error(proc, "broken_mod", "broken on purpose")
