"""Campaign suites: a TOML file lists campaigns; each runs through `run_campaign` into its own folder.

A suite file (``stress/smoke.toml``)::

    description = "what this suite is for"     # optional
    [defaults]                                 # optional: campaign keys every campaign starts from
    runs = 200

    [[campaign]]
    name = "punch_hole_retry_dropped"          # optional; default: the scenario, +bug for each bug
    scenario = "prefault_vs_punch_hole"        # required: a registered scenario
    strategy = "pct"                           # random, pct, idpct, pos, dfs, portfolio (default pct)
    profile = "6.18"                           # kernel profile (default 6.18)
    bugs = ["drop_invalidate_retry"]           # named bugs to inject (default none)
    params = { pages = 8 }                     # scenario parameters (typed like their defaults)
    runs = 200                                 # or time = 30 (seconds), not both; default runs = 1000
    expect = "fail"                            # "clean" (the default) or "fail"

plus ``depth``, ``preemptions``, ``max_steps``, ``stop_on_first_failure`` and ``shrink`` (false: keep
the failing schedule as found, e.g. where shrinking takes longer than the search) as on the command
line.

A comparison (``asyncvm compare`` as a suite kind) runs one scenario under several profiles with the
same budget and expects an outcome per profile; it becomes one campaign per profile, named
``<name>@<profile>``::

    [[compare]]
    name = "tdx_state_ioctls"                  # optional; default: the scenario
    scenario = "tdx_init_vcpu_vs_punch_hole"
    profiles = ["6.18", "7.0"]                 # at least two, each one the scenario declares
    expect = { "6.18" = "fail", "7.0" = "clean" }   # or one string for all; default "clean"
    runs = 300                                 # and any other campaign key but profile
A campaign meets its expectation when it is clean and expected clean, or found at least one failure
and was expected to fail. The seed, the worker count and the output folder belong to the run, not
to the file (``asyncvm stress --suite FILE --seed N --jobs N --out DIR``).

Every problem in a file is one line naming the file, the campaign and the key (`SuiteError`), found
before any campaign runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.failures import ToolError
from .campaign import CampaignSpec
from .engine import DEFAULT_MAX_STEPS, scenario_params
from .files import MAX_DEPTH, MAX_RUNS, MAX_STEPS_LIMIT, FileError, read_toml
from .runner import run_campaign, stamped_dir
from .scenarios import UnknownScenario, get_scenario, param_mismatch
from .schedule import write_atomic

#: the campaign keys a suite file may set, with what each must be
CAMPAIGN_KEYS = {
    "name": "a name of letters, digits and _ . + @ -",
    "scenario": "a registered scenario",
    "strategy": "a strategy name",
    "profile": "a kernel profile",
    "bugs": "a list of bug names",
    "params": "a table of scenario parameters",
    "runs": f"a positive integer up to {MAX_RUNS:,}",
    "time": "a positive number of seconds",
    "expect": '"clean" or "fail"',
    "depth": f"an integer from 1 to {MAX_DEPTH}",
    "preemptions": f"an integer from 0 to {MAX_DEPTH}",
    "max_steps": f"a positive integer up to {MAX_STEPS_LIMIT:,}",
    "stop_on_first_failure": "true or false",
    "shrink": "true or false",
}
TOP_KEYS = ("description", "defaults", "campaign", "compare")
EXPECTATIONS = ("clean", "fail")
DEFAULT_RUNS = 1000
UNBOUNDED = 10**12
_NAME = re.compile(r"[A-Za-z0-9_.+@-]+")


class SuiteError(ValueError):
    """A suite file problem, in one line."""


@dataclass
class SuiteCampaign:
    """One validated campaign of a suite (the spec's seed is filled in when the suite runs)."""

    name: str
    spec: CampaignSpec
    expect: str = "clean"
    time: float | None = None
    #: None: as the command line says (--shrink/--no-shrink)
    shrink: bool | None = None


@dataclass
class Suite:
    path: Path
    campaigns: list[SuiteCampaign]
    description: str = ""


@dataclass
class Outcome:
    """What one campaign of a suite did, and whether that was what the suite expected."""

    campaign: SuiteCampaign
    runs: int = 0
    failing_runs: int = 0
    signatures: list[str] = field(default_factory=list)
    folder: Path | None = None
    error: str | None = None

    @property
    def met(self) -> bool:
        if self.error is not None:
            return False
        return bool(self.signatures) == (self.campaign.expect == "fail")

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        if self.met:
            return "ok"
        return "UNEXPECTED FAILURE" if self.signatures else "FAILURE NOT FOUND"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.campaign.name,
            "scenario": self.campaign.spec.scenario,
            "expect": self.campaign.expect,
            "runs": self.runs,
            "failing_runs": self.failing_runs,
            "signatures": self.signatures,
            "folder": str(self.folder) if self.folder else None,
            "verdict": self.verdict,
            "error": self.error,
        }


# -- reading and validating a suite file ----------------------------------------------------------


def load_suite(path: Path) -> Suite:
    """Read and validate a suite file; its scenarios must be registered already (entry points, or
    ``--module`` imports, which workers then import too)."""
    try:
        data = read_toml(path)
    except FileError as e:
        # a table of an array names its campaign as every other suite error does: from 1
        where = re.sub(r"\b(campaign|compare)\.(\d+)\.", lambda m: f"{m[1]} {int(m[2]) + 1}: ", str(e))
        raise SuiteError(_one_line(where)) from None
    for key in data:
        if key not in TOP_KEYS:
            raise SuiteError(f"{path}: unknown key {key!r} (a suite has: {', '.join(TOP_KEYS)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SuiteError(f"{path}: description: expected a string")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SuiteError(f"{path}: defaults: expected a table ([defaults])")
    for key, value in defaults.items():
        if key in ("name", "scenario"):
            raise SuiteError(f"{path}: [defaults]: {key}: cannot be a default (set it in each campaign)")
        _check_key(f"{path}: [defaults]", key, value)
    tables = data.get("campaign", [])
    compares = data.get("compare", [])
    for kind, given in (("campaign", tables), ("compare", compares)):
        if not isinstance(given, list) or not all(isinstance(t, dict) for t in given):
            raise SuiteError(f"{path}: {kind}: expected [[{kind}]] tables")
    if not tables and not compares:
        raise SuiteError(f"{path}: expected at least one campaign ([[campaign]] or [[compare]] tables)")
    expanded: list[tuple[str, SuiteCampaign]] = []
    for n, table in enumerate(tables, 1):
        where = f"{path}: campaign {n}"
        if isinstance(table.get("name"), str):
            where += f" ({table['name']})"
        expanded.append((where, _campaign(where, {**defaults, **table})))
    for n, table in enumerate(compares, 1):
        where = f"{path}: compare {n}"
        if isinstance(table.get("name"), str):
            where += f" ({table['name']})"
        expanded += [(where, c) for c in _compare(where, defaults, table)]
    campaigns: list[SuiteCampaign] = []
    names: dict[str, int] = {}
    for n, (where, campaign) in enumerate(expanded, 1):
        if campaign.name in names:
            raise SuiteError(
                f"{where}: name: {campaign.name!r} is also campaign {names[campaign.name]}'s name; "
                "give each campaign its own name"
            )
        names[campaign.name] = n
        campaigns.append(campaign)
    return Suite(path, campaigns, description)


def _compare(where: str, defaults: dict[str, Any], table: dict[str, Any]) -> list[SuiteCampaign]:
    """A [[compare]] table: one campaign per profile, the same keys otherwise."""
    from .compare import CompareError, check_profiles

    if "profile" in table:
        raise SuiteError(f"{where}: profile: a comparison names its profiles (profiles = [...])")
    profiles = table.get("profiles")
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise SuiteError(f"{where}: profiles: expected a list of at least two profile names, got {profiles!r}")
    if "scenario" not in table or not isinstance(table["scenario"], str):
        raise SuiteError(f"{where}: scenario: missing (every comparison names its scenario)")
    try:
        check_profiles(get_scenario(table["scenario"]), profiles)
    except UnknownScenario as e:
        raise SuiteError(_one_line(f"{where}: scenario: {e}")) from None
    except CompareError as e:
        raise SuiteError(_one_line(f"{where}: profiles: {e}")) from None
    expect = table.get("expect", "clean")
    if isinstance(expect, str):
        expect = dict.fromkeys(profiles, expect)
    if not isinstance(expect, dict) or set(expect) - set(profiles):
        raise SuiteError(
            f'{where}: expect: expected "clean", "fail" or a table of them by profile ({", ".join(profiles)}), '
            f"got {expect!r}"
        )
    name = table.get("name", table["scenario"])
    base = {k: v for k, v in table.items() if k not in ("profiles", "expect", "name")}
    out = []
    for profile in profiles:
        one = {**defaults, **base, "profile": profile, "expect": expect.get(profile, "clean")}
        one["name"] = f"{name}@{profile}"
        out.append(_campaign(f"{where} [{profile}]", one))
    return out


def _campaign(where: str, table: dict[str, Any]) -> SuiteCampaign:
    for key, value in table.items():
        _check_key(where, key, value)
    if "scenario" not in table:
        raise SuiteError(f"{where}: scenario: missing (every campaign names its scenario)")
    if "runs" in table and "time" in table:
        raise SuiteError(f"{where}: time: give runs or time, not both")
    try:
        registered = get_scenario(table["scenario"])
    except UnknownScenario as e:
        raise SuiteError(_one_line(f"{where}: scenario: {e}")) from None
    given = table.get("params", {})
    for key, value in given.items():
        if key in registered.params:
            why = param_mismatch(value, registered.params[key])
            if why is not None:
                raise SuiteError(f"{where}: params.{key}: {why}")
    try:
        params = scenario_params(registered.fn, given)
    except ValueError as e:
        raise SuiteError(_one_line(f"{where}: params: {e}")) from None
    bugs = list(table.get("bugs", []))
    name = table.get("name") or "+".join([registered.name, *bugs])
    time_budget = float(table["time"]) if "time" in table else None
    spec = CampaignSpec(
        scenario=registered.name,
        # Workers import the --module that registered the scenario, if one did.
        module=registered.source,
        params=params,
        profile=table.get("profile", "6.18"),
        bugs=bugs,
        max_steps=table.get("max_steps", DEFAULT_MAX_STEPS),
        strategy=table.get("strategy", "pct"),
        depth=table.get("depth", 3),
        preemptions=table.get("preemptions", 2),
        runs=table.get("runs", UNBOUNDED if time_budget else DEFAULT_RUNS),
        stop_on_first_failure=table.get("stop_on_first_failure", False),
    )
    return SuiteCampaign(name, spec, table.get("expect", "clean"), time_budget, table.get("shrink"))


def _check_key(where: str, key: str, value: Any) -> None:
    """One key of a campaign: known, of the right type, naming something that exists."""
    from ..bugs import BUGS, unknown_bug
    from ..profile import PROFILES
    from ..runtime.strategies import STRATEGIES

    if key not in CAMPAIGN_KEYS:
        raise SuiteError(f"{where}: unknown key {key!r} (a campaign has: {', '.join(CAMPAIGN_KEYS)})")

    def bad(why: str = "") -> SuiteError:
        return SuiteError(f"{where}: {key}: {why or f'expected {CAMPAIGN_KEYS[key]}'}, got {value!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if key in ("name", "scenario", "strategy", "profile", "expect") and not isinstance(value, str):
        raise bad()
    if key == "name" and not _NAME.fullmatch(value):
        raise bad()
    if key == "strategy" and value not in STRATEGIES:
        raise bad(f"unknown strategy; choose one of: {', '.join(STRATEGIES)}")
    if key == "profile" and value not in PROFILES:
        raise bad(f"unknown profile; choose one of: {', '.join(PROFILES)}")
    if key == "expect" and value not in EXPECTATIONS:
        raise bad()
    if key == "bugs":
        if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
            raise bad()
        for b in value:
            if b not in BUGS:
                raise SuiteError(f"{where}: bugs: {unknown_bug(b)}")
    if key == "params" and not isinstance(value, dict):
        raise bad()
    # the limits campaign.json is read back with (files.SpecModel): every campaign can be resumed
    if key == "runs" and not (is_int(value) and 0 < value <= MAX_RUNS):
        raise bad()
    if key == "max_steps" and not (is_int(value) and 0 < value <= MAX_STEPS_LIMIT):
        raise bad()
    if key == "depth" and not (is_int(value) and 1 <= value <= MAX_DEPTH):
        raise bad()
    if key == "preemptions" and not (is_int(value) and 0 <= value <= MAX_DEPTH):
        raise bad()
    if key == "time" and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ):
        raise bad()
    if key in ("stop_on_first_failure", "shrink") and not isinstance(value, bool):
        raise bad()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- running a suite ------------------------------------------------------------------------------


def new_suite_dir(out: Path, suite: Suite) -> Path:
    """``OUT/suite-<file stem>-<UTC time>/``: each campaign gets ``<its name>/`` inside."""
    return stamped_dir(out, f"suite-{suite.path.stem}")


def run_suite(
    suite: Suite,
    *,
    out: Path,
    seed: int = 0,
    jobs: int = 1,
    dask: Any = None,
    do_shrink: bool = True,
    on_campaign: Callable[[int, SuiteCampaign], None] | None = None,
) -> tuple[list[Outcome], Path]:
    """Run the suite's campaigns one after another, each into ``<suite folder>/<name>/``.

    A campaign that cannot run (a worker died, the disk is full) is an outcome with an error; the
    rest still run. Returns the outcomes and the suite folder (which also gets ``suite.json``).
    """
    folder = new_suite_dir(out, suite)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    for n, campaign in enumerate(suite.campaigns, 1):
        campaign.spec.seed = seed
        if on_campaign is not None:
            on_campaign(n, campaign)
        outcome = Outcome(campaign)
        try:
            report, outcome.folder = run_campaign(
                campaign.spec,
                out=folder / campaign.name,
                jobs=jobs,
                dask=dask,
                time_budget=campaign.time,
                do_shrink=do_shrink if campaign.shrink is None else campaign.shrink,
            )
        except (ToolError, UnknownScenario, ValueError) as e:
            outcome.error = _one_line(str(e))
        except BrokenProcessPool as e:
            outcome.error = _one_line(f"a worker process died ({e})")
        except OSError as e:
            outcome.error = _one_line(f"cannot write the campaign: {e}")
        else:
            outcome.runs, outcome.failing_runs = report.runs, report.failing_runs
            outcome.signatures = list(report.signatures)
        outcomes.append(outcome)
    summary = {
        "suite": str(suite.path),
        "seed": seed,
        "jobs": jobs,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "ok": all(o.met for o in outcomes),
        "campaigns": [o.to_json() for o in outcomes],
    }
    write_atomic(folder / "suite.json", json.dumps(summary, indent=1))
    return outcomes, folder


def exit_code(outcomes: list[Outcome]) -> int:
    """2 if a campaign could not run, else 1 if one missed its expectation, else 0."""
    if any(o.error is not None for o in outcomes):
        return 2
    return 0 if all(o.met for o in outcomes) else 1


def suite_table(suite: Suite, outcomes: list[Outcome], folder: Path) -> Any:
    """The one table a suite prints: campaign, runs, failures, distinct signatures, folder, verdict."""
    from rich.table import Table

    met = sum(o.met for o in outcomes)
    table = Table(title=f"{suite.path}: {met}/{len(outcomes)} campaigns as expected ({folder})")
    table.add_column("campaign")
    table.add_column("expect")
    table.add_column("runs", justify="right")
    table.add_column("failures", justify="right")
    table.add_column("signatures", justify="right")
    table.add_column("result")
    table.add_column("artifact folder", overflow="fold")
    for o in outcomes:
        style = "green" if o.met else "bold red"
        table.add_row(
            o.campaign.name,
            o.campaign.expect,
            str(o.runs),
            str(o.failing_runs),
            str(len(o.signatures)),
            f"[{style}]{o.verdict}[/]",
            str(o.folder) if o.folder else (o.error or ""),
        )
    return table


def run_suite_file(
    path: Path,
    *,
    out: Path,
    seed: int = 0,
    jobs: int = 1,
    dask: Any = None,
    do_shrink: bool = True,
    quiet: bool = False,
) -> int:
    """``asyncvm stress --suite FILE``: validate, run, print the table; returns the exit code.

    A bad file raises `SuiteError` (one line) before anything runs. Progress goes to stderr, one line
    per campaign; the table goes to stdout.
    """
    from rich.console import Console

    suite = load_suite(path)

    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def started(n: int, c: SuiteCampaign) -> None:
        budget = f"{c.time:g} s" if c.time else f"{c.spec.runs} runs"
        bugs = f", bugs {', '.join(c.spec.bugs)}" if c.spec.bugs else ""
        note(
            f"asyncvm: [{n}/{len(suite.campaigns)}] {c.name}: {c.spec.scenario}, {c.spec.strategy}, "
            f"profile {c.spec.profile}{bugs}, {budget}, expect {c.expect}"
        )

    outcomes, folder = run_suite(
        suite, out=out, seed=seed, jobs=jobs, dask=dask, do_shrink=do_shrink, on_campaign=None if quiet else started
    )
    for o in outcomes:
        if o.error is not None:
            note(f"asyncvm: error: campaign {o.campaign.name}: {o.error}")
    # Not a terminal (CI logs): as wide as the rows are, so that a folder stays on one line.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 1000
    Console(width=wide).print(suite_table(suite, outcomes, folder))
    return exit_code(outcomes)
