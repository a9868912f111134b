"""Issue 16's reproducers: schedule files, scenario parameters, --time and internal errors.

Each input here once gave a traceback, a hang or a wrong answer; each must now be one line on
stderr and exit 2 (or, for asyncvm's own bugs, exit 3 naming a crash report).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCENARIO, assert_one_line_error, cli_cmd, cli_env, explain, run_cli

BUG = "drop_invalidate_retry"


@pytest.fixture(scope="module")
def good_schedule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A failing schedule of the bundled scenario (a short in-process exploration)."""
    import asyncvm

    report = asyncvm.explore(SCENARIO, runs=200, seed=1, bugs=[BUG], params={"pages": 8}, stop_on_first_failure=True)
    assert report.failures, report.summary()
    path = tmp_path_factory.mktemp("schedules") / "schedule.json"
    report.failures[0].schedule.save(path)
    return path


def _variant(good: Path, where: Path, case: str) -> tuple[Path, str]:
    """The bad schedule file for `case` and a substring its error line must contain."""
    text = good.read_text()
    data: dict[str, Any] = json.loads(text)
    if case == "deep_nesting":
        depth = 200_000
        text = text.replace('"choices": [', '"choices": [' + "[" * depth + "]" * depth + ",", 1)
        needle = "nested deeper"
    elif case in ("seed_1e999", "max_steps_1e999"):
        key = case.removesuffix("_1e999")
        text = json.dumps({**data, key: 12345}).replace(": 12345", ": 1e999")
        needle = key
    elif case == "unknown_profile":
        text, needle = json.dumps({**data, "profile": "9.9"}), "unknown profile '9.9'"
    elif case == "unknown_bug":
        text, needle = json.dumps({**data, "bugs": ["no_such_bug"]}), "unknown bug 'no_such_bug'"
    elif case == "bugs_as_a_string":
        text, needle = json.dumps({**data, "bugs": BUG}), "bugs"
    else:
        raise AssertionError(case)
    path = where / f"{case}.json"
    path.write_text(text)
    return path, needle


SCHEDULE_CASES = ["deep_nesting", "seed_1e999", "max_steps_1e999", "unknown_profile", "unknown_bug", "bugs_as_a_string"]


@pytest.mark.parametrize("command", ["replay", "show", "shrink"])
@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_bad_schedule_is_one_line(command: str, case: str, good_schedule: Path, tmp_path: Path) -> None:
    bad, needle = _variant(good_schedule, tmp_path, case)
    proc = run_cli(command, bad, cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, str(bad), needle)
    assert not list(tmp_path.glob("*.shrunk.json"))


def test_replay_force_with_an_undeclared_parameter(good_schedule: Path, tmp_path: Path) -> None:
    data = json.loads(good_schedule.read_text())
    data["scenario"]["params"]["bogus"] = 1
    bad = tmp_path / "undeclared.json"
    bad.write_text(json.dumps(data))
    assert_one_line_error(run_cli("replay", "--force", bad, cwd=tmp_path), "bogus")


def test_a_schedule_with_an_out_of_range_parameter(good_schedule: Path, tmp_path: Path) -> None:
    data = json.loads(good_schedule.read_text())
    data["scenario"]["params"]["pages"] = 0
    bad = tmp_path / "pages0.json"
    bad.write_text(json.dumps(data))
    assert_one_line_error(run_cli("replay", "--force", bad, cwd=tmp_path), "pages")


# -- scenario parameters: checked against their declarations before any run -------------------------


@pytest.mark.parametrize("param", ["pages=0", "pages=-1", "vcpus=5000"])
def test_out_of_range_parameter_is_a_usage_error_before_any_run(param: str, tmp_path: Path) -> None:
    proc = run_cli("stress", SCENARIO, "-p", param, "--runs", "20", "--jobs", "1", "--out", "logs", cwd=tmp_path)
    assert_one_line_error(proc, param.split("=")[0])
    assert not (tmp_path / "logs").exists(), "nothing ran"


SETUP_FAILS = """
import asyncvm


@asyncvm.scenario(name="setup_fails", params={"vm_type": 12345})
async def setup_fails(kvm, vm_type=12345):
    await kvm.create_vm(vm_type)   # EINVAL: no such VM type

    async def nothing():
        pass

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(nothing, name="a")
        tg.spawn(nothing, name="b")
"""


def test_an_exception_in_the_scenarios_set_up_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "setup_fails.py").write_text(SETUP_FAILS)
    proc = run_cli(
        "stress",
        "setup_fails",
        "--module",
        "setup_fails.py",
        "--runs",
        "20",
        "--jobs",
        "1",
        "--out",
        "logs",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "set-up", "EINVAL")


# -- --time: a budget that never ends is refused ---------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize(
    "command",
    [
        ("stress", SCENARIO, "--jobs", "1", "--out", "logs"),
        ("compare", "tdx_init_vcpu_vs_punch_hole", "--profiles", "6.18,7.0", "--out", "logs"),
        ("fuzz", "--out", "logs"),
        ("shrink", "schedule.json"),
    ],
    ids=lambda c: c[0],
)
def test_time_must_be_finite(command: tuple[str, ...], value: str, tmp_path: Path) -> None:
    proc = run_cli(*command, "--time", value, cwd=tmp_path, timeout=60)
    assert_one_line_error(proc, "--time")


# -- internal errors: exit 3, one line, a crash report ---------------------------------------------


class _Broken(dict[str, Any]):
    def items(self) -> Any:
        raise RuntimeError("boom from inside asyncvm")


def test_an_internal_error_exits_3_with_a_crash_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    import asyncvm.bugs
    from asyncvm import cli

    monkeypatch.setattr(asyncvm.bugs, "BUGS", _Broken(asyncvm.bugs.BUGS))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bugs"])
    assert exit_info.value.code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("asyncvm: internal error: RuntimeError: boom"), err
    report = Path(err[0].split("crash report: ", 1)[1].rstrip(")"))
    assert report.parent == tmp_path
    text = report.read_text()
    assert "Traceback" in text and "boom from inside asyncvm" in text and "asyncvm bugs" in text


# -- artifacts honour the umask --------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_artifacts_honour_the_umask(mask: int, tmp_path: Path) -> None:
    proc = subprocess.run(
        cli_cmd(
            "stress",
            SCENARIO,
            "--bug",
            BUG,
            "-p",
            "pages=8",
            "--seed",
            "1",
            "--runs",
            "60",
            "--jobs",
            "1",
            "--stop-on-first-failure",
            "--out",
            "logs",
        ),
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(mask),
    )
    assert proc.returncode == 1, explain(proc)
    files = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    assert any(p.name == "schedule.json" for p in files) and any(p.name == "campaign.json" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"


# -- suite files: the same limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[defaults]\nruns = " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper"),
        ('[[campaign]]\nscenario = "prefault_vs_punch_hole"\ntime = nan\n', "time"),
        ('[[campaign]]\nscenario = "prefault_vs_punch_hole"\nparams = { pages = 0 }\n', "pages"),
        ('description = "' + "x" * (2 << 20) + '"\n', "larger than"),
    ],
    ids=["deep_nesting", "time_nan", "param_out_of_range", "too_large"],
)
def test_bad_suite_file_is_one_line(text: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(text)
    proc = run_cli("stress", "--suite", "bad.toml", "--out", "logs", cwd=tmp_path)
    assert_one_line_error(proc, "bad.toml", needle)
    assert not (tmp_path / "logs").exists()


def test_api_replay_force_with_an_undeclared_parameter_is_a_schedule_error(good_schedule: Path) -> None:
    import asyncvm

    schedule = asyncvm.Schedule.load(good_schedule)
    schedule.params["bogus"] = 1
    with pytest.raises(asyncvm.ScheduleError, match="bogus"):
        asyncvm.replay(schedule, SCENARIO, force=True)


# -- explore(): a wrong argument is one clear exception before anything runs -----------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"runs": -1}, ValueError, "runs"),
        ({"runs": "3"}, ValueError, "runs"),
        ({"seed": None}, ValueError, "seed"),
        ({"seed": 2**70}, ValueError, "seed"),  # a schedule.json could not be read back
        ({"depth": "x"}, ValueError, "depth"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"strategy": None}, ValueError, "strategy"),
        ({"profile": None}, ValueError, "profile"),
        ({"jobs": 2**40}, ValueError, "jobs"),
        ({"jobs": -1}, ValueError, "jobs"),
        ({"bugs": None}, TypeError, "bugs"),
        ({"bugs": [1]}, TypeError, "bugs"),
        ({"params": [1]}, TypeError, "params"),
        ({"data_probs": {"x": 5}}, ValueError, "data_probs"),
        ({"time_budget": "x"}, ValueError, "time_budget"),
        ({"progress": 5}, TypeError, "progress"),
        ({"scenario": None}, TypeError, "scenario"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_api_explore_refuses_a_wrong_argument(kwargs: dict[str, Any], error: type[Exception], needle: str) -> None:
    import asyncvm

    args = {"scenario": SCENARIO, "runs": 2, **kwargs}
    with pytest.raises(error, match=needle) as info:
        asyncvm.explore(args.pop("scenario"), **args)
    assert "\n" not in str(info.value)


# -- options a campaign could start with but not be replayed or resumed with -----------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("stress", SCENARIO, "--jobs", "99999999999999"), "--jobs"),  # once an OverflowError, exit 3
        (("stress", SCENARIO, "--seed", str(2**70)), "--seed"),  # its schedule.json was unreadable
        (("stress", SCENARIO, "--depth", "99999999999"), "--depth"),  # its campaign.json was unreadable
        (("stress", SCENARIO, "--max-steps", str(10**12)), "--max-steps"),
        (("stress", SCENARIO, "--strategy", ""), "unknown strategy ''"),  # once silently pct
        (("stress", SCENARIO, "--profile", ""), "unknown profile ''"),  # once silently 6.18
        (("stress", "--suite", "suite.toml", "--jobs", "5000"), "--jobs"),
        (("compare", SCENARIO, "--profiles", "6.18", "--jobs", "5000"), "--jobs"),
        (("compare", SCENARIO, "--profiles", "6.18", "--seed", str(2**70)), "--seed"),
        (("fuzz", "--seed", str(-(2**70))), "--seed"),
    ],
    ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, tuple) else "",
)
def test_out_of_range_option_is_refused_before_any_run(args: tuple[str, ...], needle: str, tmp_path: Path) -> None:
    proc = run_cli(*args, "--out", "logs", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "logs").exists(), "nothing ran"


@pytest.mark.parametrize("code", ["5", "0", "'bye'"])
def test_a_module_that_calls_sys_exit_at_import_is_one_line(code: str, tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text(f"import sys\nsys.exit({code})\n")
    for args in (("scenarios", "-m", "exits.py"), ("stress", "exits.py", "--runs", "3", "--out", "logs")):
        assert_one_line_error(run_cli(*args, cwd=tmp_path), "exits.py", f"sys.exit({code})")


# -- bench: its environment variables are checked before any benchmark runs --------------------------


@pytest.mark.parametrize(
    ("variable", "value", "only"),
    [
        ("ASYNCVM_FUZZ_BUDGET", "abc", "fuzz"),  # once a ValueError deep in the benchmark, exit 3
        ("ASYNCVM_FUZZ_BUDGET", "nan", "fuzz"),  # once exit 3 as well
        ("ASYNCVM_FUZZ_BUDGET", "-1", "fuzz"),  # once silently no budget at all
        ("ASYNCVM_BENCH_STRATEGY_RUNS", "abc", "strategy_comparison"),
        ("ASYNCVM_BENCH_STRATEGY_RUNS", "-5", "strategy_comparison"),
    ],
)
def test_a_bad_bench_environment_variable_is_one_line(variable: str, value: str, only: str, tmp_path: Path) -> None:
    proc = run_cli("bench", "--only", only, "--quick", cwd=tmp_path, env={**cli_env(), variable: value}, timeout=60)
    assert_one_line_error(proc, variable)


@pytest.mark.parametrize("only", ["", ","])
def test_bench_only_with_no_name_is_refused(only: str, tmp_path: Path) -> None:
    # it once ran nothing and exited 0
    assert_one_line_error(run_cli("bench", "--only", only, cwd=tmp_path, timeout=60), "--only")


def test_fuzz_out_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    proc = run_cli("fuzz", "--programs", "2", "--jobs", "1", "--out", "afile", "-q", cwd=tmp_path)
    assert_one_line_error(proc, "cannot write the campaign", "Not a directory")  # once an internal error, exit 3


# -- output paths that are devices: written to, never replaced -----------------------------------------


@pytest.mark.parametrize(("command", "flag"), [("show", "--html"), ("show", "--trace"), ("shrink", "-o")])
def test_an_output_path_that_is_a_device_is_written_not_replaced(
    command: str, flag: str, good_schedule: Path, tmp_path: Path
) -> None:
    """As root, the rename of write_atomic once replaced /dev/null or /dev/full by a regular file."""
    proc = run_cli(command, good_schedule, flag, "/dev/null", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, explain(proc)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if Path("/dev/full").exists():
        proc = run_cli(command, good_schedule, flag, "/dev/full", cwd=tmp_path, timeout=120)
        assert_one_line_error(proc, "cannot write /dev/full")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


NOT_JSON_DEFAULT = """
import asyncvm


@asyncvm.scenario(name="not_json_default", params={"n": object()})
async def not_json_default(kvm, n=None):
    pass
"""


@pytest.mark.parametrize(
    "args",
    [
        ("stress", "not_json_default", "--runs", "3", "--jobs", "1"),
        ("compare", "not_json_default", "--profiles", "6.18,7.0", "--runs", "3"),
    ],
    ids=lambda a: a[0],
)
def test_a_parameter_default_that_is_not_json_is_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    """It was an internal error (exit 3) writing campaign.json, after the first campaign ran."""
    (tmp_path / "not_json.py").write_text(NOT_JSON_DEFAULT)
    proc = run_cli(*args, "-m", "not_json.py", "--out", "logs", cwd=tmp_path)
    assert_one_line_error(proc, "parameter n=", "not a JSON value")


@pytest.mark.parametrize("api", ["replay", "shrink"])
@pytest.mark.parametrize("scenario", [None, 5, b"prefault_vs_punch_hole"])
def test_api_replay_and_shrink_refuse_a_scenario_that_is_not_one(good_schedule: Path, api: str, scenario: Any) -> None:
    import asyncvm

    with pytest.raises(TypeError, match="scenario") as info:
        getattr(asyncvm, api)(good_schedule, scenario)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("soak", "--profile", ""), "--profile"),  # once silently every kernel profile
        (("stress", "fuzz", "-p", "actors=999999999", "--runs", "1"), "actors"),  # once ran for ever
        (("stress", "fuzz", "-p", "calls=0", "--runs", "1"), "calls"),
        (("stress", "fuzz", "-p", "vm_type=vax", "--runs", "1"), "vm_type"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_a_name_or_size_nothing_has_is_refused(args: tuple[str, ...], needle: str, tmp_path: Path) -> None:
    proc = run_cli(*args, cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize("given", ["-1", "0", "nan", "inf", "soon"])
def test_a_dask_connect_timeout_that_is_no_duration_falls_back_to_the_default(
    given: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncvm.explore import executors

    monkeypatch.setenv("ASYNCVM_DASK_CONNECT_TIMEOUT", given)
    assert executors._connect_timeout() == executors.DASK_CONNECT_TIMEOUT


def test_a_module_cannot_take_a_bundled_scenarios_name(tmp_path: Path) -> None:
    """It would silently replace the bundled scenario (and what its schedules replay)."""
    (tmp_path / "shadow.py").write_text(
        "import asyncvm\n\n@asyncvm.scenario(name='prefault_vs_punch_hole')\nasync def mine(kvm):\n    pass\n"
    )
    proc = run_cli("stress", SCENARIO, "-m", str(tmp_path / "shadow.py"), "--runs", "1", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "taken by the bundled scenario")
