"""`asyncvm stress --suite FILE`: a TOML list of campaigns, one table, exit codes by expectation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncvm.explore.scenarios import load_bundled
from asyncvm.explore.suite import SuiteError, load_suite

from .conftest import BUG, SCENARIO, assert_one_line_error, explain, run_cli

CLEAN = f"""
[[campaign]]
name = "clean"
scenario = "{SCENARIO}"
params = {{ pages = 4 }}
runs = 20
"""
BUGGY = f"""
[[campaign]]
name = "buggy"
scenario = "{SCENARIO}"
params = {{ pages = 4 }}
bugs = ["{BUG}"]
runs = 40
stop_on_first_failure = true
"""


def suite_file(where: Path, text: str, name: str = "tiny.toml") -> Path:
    path = where / name
    path.write_text(text)
    return path


def run_suite(where: Path, path: Path, *extra: str) -> tuple[int, str, dict[str, object]]:
    proc = run_cli("stress", "--suite", path, "--jobs", "1", "--no-shrink", "--out", "logs", *extra, cwd=where)
    assert "Traceback" not in proc.stderr, explain(proc)
    summaries = list((where / "logs").glob("suite-*/suite.json"))
    assert len(summaries) == 1, explain(proc)
    return proc.returncode, proc.stdout, json.loads(summaries[0].read_text())


def test_expected_failure_found_and_clean_campaign_clean_exit_0(tmp_path: Path) -> None:
    path = suite_file(tmp_path, CLEAN + BUGGY + 'expect = "fail"\n')
    rc, out, summary = run_suite(tmp_path, path)
    assert rc == 0, out
    rows = {c["name"]: c for c in summary["campaigns"]}  # type: ignore[attr-defined]
    assert rows["clean"]["verdict"] == "ok" and rows["clean"]["runs"] == 20 and not rows["clean"]["signatures"]
    assert rows["buggy"]["verdict"] == "ok" and rows["buggy"]["signatures"]
    for name, row in rows.items():
        folder = Path(tmp_path, row["folder"])
        # Each campaign in its own folder under the suite's: <out>/suite-tiny-<time>/<name>/...
        assert folder.parent.parent.name == name and folder.parent.parent.parent.name.startswith("suite-tiny-")
        assert (folder / "summary.json").exists()
    for needle in ("campaign", "runs", "failures", "signatures", "artifact folder", "clean", "buggy", "ok"):
        assert needle in out, out


@pytest.mark.parametrize(
    ("text", "verdict"),
    [(CLEAN + BUGGY, "UNEXPECTED FAILURE"), (CLEAN + 'expect = "fail"\n', "FAILURE NOT FOUND")],
    ids=["unexpected_failure", "expected_failure_not_found"],
)
def test_a_missed_expectation_exits_1(text: str, verdict: str, tmp_path: Path) -> None:
    rc, out, summary = run_suite(tmp_path, suite_file(tmp_path, text))
    assert rc == 1, out
    assert verdict in out
    assert summary["ok"] is False


def test_seed_applies_to_every_campaign(tmp_path: Path) -> None:
    rc, _out, summary = run_suite(tmp_path, suite_file(tmp_path, CLEAN), "--seed", "7")
    assert rc == 0 and summary["seed"] == 7
    campaign = json.loads((Path(tmp_path, summary["campaigns"][0]["folder"]) / "campaign.json").read_text())  # type: ignore[index]
    assert campaign["spec"]["seed"] == 7


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[[campaign]\n", ["tiny.toml", "not valid TOML"]),
        (CLEAN + "rns = 3\n", ["tiny.toml", "campaign 1 (clean)", "unknown key 'rns'"]),
    ],
    ids=["bad_toml", "unknown_key"],
)
def test_bad_suite_file_is_one_line_exit_2(text: str, needles: list[str], tmp_path: Path) -> None:
    proc = run_cli("stress", "--suite", suite_file(tmp_path, text), "--out", "logs", cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["stress", SCENARIO, "--suite", "tiny.toml"], "not both"),
        (["stress", "--suite", "tiny.toml", "--runs", "5"], "--runs"),
        (["stress", "--suite", "tiny.toml", "--bug", BUG], "--bug"),
        (["stress", "--suite", "missing.toml"], "missing.toml: no such file"),
    ],
    ids=["with_scenario", "with_runs", "with_bug", "missing_file"],
)
def test_suite_command_line_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    suite_file(tmp_path, CLEAN)
    assert_one_line_error(run_cli(*args, "--out", "logs", cwd=tmp_path), needle)


# -- validation, in process: every key, one line naming file, campaign and key ------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("rns = 3", "campaign 2: unknown key 'rns'"),
        ('scenario = "no_such"', "campaign 2: scenario: unknown scenario 'no_such'"),
        ('strategy = "bogus"', "campaign 2: strategy: unknown strategy"),
        ('profile = "2.6"', "campaign 2: profile: unknown profile"),
        ('bugs = ["no_such_bug"]', "campaign 2: bugs: unknown bug 'no_such_bug'"),
        ('bugs = "drop_invalidate_retry"', "campaign 2: bugs: expected a list of bug names"),
        ("runs = 10\ntime = 5", "campaign 2: time: give runs or time, not both"),
        ("runs = 0", "campaign 2: runs: expected a positive integer"),
        ('runs = "many"', "campaign 2: runs: expected a positive integer"),
        ("runs = true", "campaign 2: runs: expected a positive integer"),
        # beyond what campaign.json is read back with: it ran (runs: for ever) and could not be resumed
        ("runs = 9223372036854775807", "campaign 2: runs: expected a positive integer up to 1,000,000,000,000"),
        ("max_steps = 9999999999999", "campaign 2: max_steps: expected a positive integer up to 1,000,000,000"),
        ("depth = 999999999999", "campaign 2: depth: expected an integer from 1 to 10000"),
        ("preemptions = 10001", "campaign 2: preemptions: expected an integer from 0 to 10000"),
        ("time = -1", "campaign 2: time: expected a positive number"),
        ("time = nan", "campaign 2: time: not a finite number"),  # once "campaign.1.time"
        ('expect = "maybe"', "campaign 2: expect:"),
        ("params = { bogus = 1 }", "campaign 2: params: scenario prefault_vs_punch_hole has no parameter bogus"),
        ('params = { pages = "eight" }', "campaign 2: params.pages: 'eight' is not a int"),
        ('name = "clean"', "campaign 2 (clean): name: 'clean' is also campaign 1's name"),
        ('name = "a/b"', "campaign 2 (a/b): name:"),
        ("stop_on_first_failure = 1", "campaign 2: stop_on_first_failure: expected true or false"),
    ],
)
def test_every_key_is_validated(extra: str, needle: str, tmp_path: Path) -> None:
    load_bundled()
    second = extra if extra.startswith("scenario") else f'scenario = "{SCENARIO}"\n{extra}'
    path = suite_file(tmp_path, f"{CLEAN}\n[[campaign]]\n{second}\n")
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "expected at least one campaign"),
        ('bogus = 1\n[[campaign]]\nscenario = "x"\n', "unknown key 'bogus'"),
        ("[defaults]\nrns = 1\n" + CLEAN, "[defaults]: unknown key 'rns'"),
        ('[defaults]\nscenario = "x"\n' + CLEAN, "[defaults]: scenario: cannot be a default"),
        ("[[campaign]]\nruns = 5\n", "campaign 1: scenario: missing"),
    ],
)
def test_suite_level_errors(text: str, needle: str, tmp_path: Path) -> None:
    load_bundled()
    with pytest.raises(SuiteError) as e:
        load_suite(suite_file(tmp_path, text))
    assert needle in str(e.value), str(e.value)


def test_defaults_apply_and_campaign_keys_win(tmp_path: Path) -> None:
    load_bundled()
    text = '[defaults]\nruns = 50\nstrategy = "random"\n' + CLEAN + BUGGY + 'expect = "fail"\n'
    suite = load_suite(suite_file(tmp_path, text))
    clean, buggy = suite.campaigns
    assert (clean.spec.runs, clean.spec.strategy, clean.expect) == (20, "random", "clean")
    assert (buggy.spec.bugs, buggy.expect, buggy.spec.stop_on_first_failure) == ([BUG], "fail", True)
    assert clean.spec.params["pages"] == 4


@pytest.mark.parametrize("name", ["smoke", "nightly", "coco"])
def test_shipped_suites_are_valid(name: str) -> None:
    load_bundled()
    suite = load_suite(Path(__file__).parents[2] / "stress" / f"{name}.toml")
    assert suite.campaigns
    assert any(c.expect == "fail" for c in suite.campaigns)
    for c in suite.campaigns:
        # Shipped scenarios are clean on the default profile: a campaign expected to fail injects a
        # bug or runs a kernel profile known to fail it; a clean one injects none.
        if c.expect == "fail":
            assert c.spec.bugs or c.spec.profile != "6.18", c.name
        else:
            assert not c.spec.bugs, c.name
