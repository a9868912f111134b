"""`asyncvm compare`: one scenario, one campaign per profile, the same seed and budget, one table.

Each profile's campaign goes through `run_campaign` (the campaign driver, ledger and artifacts of
`asyncvm stress`) into ``OUT/compare-<scenario>-<UTC time>/<profile>/``, so every signature keeps
its replayable, shrunk schedule. Execution i depends only on (seed, i), so the profiles are put
through the same schedules as far as their code paths agree.

Seconds to the first failure come from the campaign's ledger: each chunk line carries the seconds
the campaign had run when that chunk was merged, and the first failing execution's share of its
chunk is interpolated (artifact writing and shrinking are not counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .campaign import CampaignSpec, ChunkResult, Report
from .engine import DEFAULT_MAX_STEPS, scenario_params
from .runner import Ledger, run_campaign, slug, stamped_dir
from .scenarios import ScenarioSpec
from .schedule import write_atomic

FORMATS = ("table", "markdown", "json")


class CompareError(ValueError):
    """A comparison that cannot be run as asked, in one line."""


@dataclass
class Row:
    """What one profile's campaign found."""

    profile: str
    kind: str
    runs: int = 0
    failures: int = 0
    #: signature -> what fired: the oracle (kind) and, for the errno oracle, the errno
    fired: dict[str, str] = field(default_factory=dict)
    first_failure_run: int | None = None
    first_failure_s: float | None = None
    #: signature -> its artifact folder
    artifacts: dict[str, str] = field(default_factory=dict)
    #: signature -> the known kernel (or design) behaviour it is, with the change that explains it
    known: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None
    elapsed: float = 0.0

    @property
    def signatures(self) -> list[str]:
        return list(self.fired)

    def to_json(self) -> dict[str, Any]:
        """The row as `--format json` prints it: exactly the documented keys."""
        return {
            "profile": self.profile,
            "runs": self.runs,
            "failures": self.failures,
            "signatures": self.signatures,
            "first_failure_run": self.first_failure_run,
            "first_failure_s": None if self.first_failure_s is None else round(self.first_failure_s, 3),
            "artifacts": dict(self.artifacts),
        }

    def to_record(self) -> dict[str, Any]:
        """The row as ``compare.json`` keeps it: the printed keys and what fired, what is known, where."""
        return {
            **self.to_json(),
            "kind": self.kind,
            "fired": dict(self.fired),
            "known": dict(self.known),
            "folder": None if self.folder is None else str(self.folder),
        }


def check_profiles(scenario: ScenarioSpec, names: Iterable[str]) -> list[str]:
    """The profiles to compare: known, at least two, distinct, and among those the scenario
    declares meaningful (if it declares any)."""
    from ..profile import PROFILES
    from .scenarios import closest

    wanted = [n.strip() for n in names if n.strip()]
    if len(wanted) < 2:
        raise CompareError(f"compare needs at least two profiles, got {', '.join(wanted) or 'none'}")
    seen: set[str] = set()
    for name in wanted:
        if name not in PROFILES:
            raise CompareError(
                f"unknown profile {name!r}{closest(name, PROFILES)} (see `asyncvm profiles`: {', '.join(PROFILES)})"
            )
        if name in seen:
            raise CompareError(f"profile {name!r} is given twice")
        seen.add(name)
    meaningful = scenario.profiles
    if meaningful:
        outside = [n for n in wanted if n not in meaningful]
        if outside:
            raise CompareError(
                f"scenario {scenario.name} is not meaningful under profile {', '.join(outside)}; "
                f"it declares: {', '.join(meaningful)}"
            )
    return wanted


def compare(
    scenario: ScenarioSpec,
    profiles: Iterable[str],
    *,
    out: Path,
    runs: int = 1000,
    seed: int = 0,
    strategy: str = "pct",
    params: Mapping[str, Any] | None = None,
    bugs: Iterable[str] = (),
    depth: int = 3,
    preemptions: int = 2,
    max_steps: int = DEFAULT_MAX_STEPS,
    time_budget: float | None = None,
    jobs: int = 1,
    do_shrink: bool = True,
    on_profile: Callable[[int, str], None] | None = None,
) -> tuple[list[Row], Path]:
    """Run `scenario` once per profile with the same seed and budget; returns the rows and the
    comparison folder (which also gets ``compare.json``)."""
    from ..profile import PROFILES

    names = check_profiles(scenario, profiles)
    bound = scenario_params(scenario.fn, params)
    folder = stamped_dir(out, f"compare-{scenario.name}")
    rows: list[Row] = []
    for n, name in enumerate(names, 1):
        if on_profile is not None:
            on_profile(n, name)
        spec = CampaignSpec(
            scenario=scenario.name,
            module=scenario.source,
            params=dict(bound),
            profile=name,
            bugs=list(bugs),
            max_steps=max_steps,
            strategy=strategy,
            seed=seed,
            depth=depth,
            preemptions=preemptions,
            runs=runs,
        )
        report, where = run_campaign(spec, out=folder / name, jobs=jobs, time_budget=time_budget, do_shrink=do_shrink)
        rows.append(_row(PROFILES[name].kind, name, report, where))
    summary = {
        "scenario": scenario.name,
        "params": bound,
        "seed": seed,
        "strategy": strategy,
        "runs": runs,
        "time": time_budget,
        "bugs": list(bugs),
        "profiles": [r.to_record() for r in rows],
    }
    write_atomic(folder / "compare.json", json.dumps(summary, indent=1))
    return rows, folder


def _row(kind: str, name: str, report: Report, where: Path) -> Row:
    row = Row(name, kind, report.runs, report.failing_runs, folder=where, elapsed=report.elapsed)
    for f in report.failures:
        errno = f.failure.evidence.get("errno") if isinstance(f.failure.evidence, dict) else None
        row.fired[f.signature] = f"{f.kind} {errno}" if errno else f.kind
        row.artifacts[f.signature] = str(where / slug(f.signature))
        if f.known:
            row.known[f.signature] = f.known
    if report.failures:
        row.first_failure_run = min(f.first_run for f in report.failures)
        row.first_failure_s = seconds_to(where / "ledger.jsonl", row.first_failure_run)
    return row


def seconds_to(ledger: Path, execution: int) -> float | None:
    """When execution `execution` had run, by the ledger: the seconds before its chunk was merged
    plus its share of that chunk's seconds."""
    before = 0.0
    for line in Ledger.read(ledger):
        if not isinstance(line, dict) or line.get("type") != "chunk":
            continue
        try:
            chunk = ChunkResult.from_json(line["chunk"])
            elapsed = float(line.get("elapsed", 0.0))
        except (KeyError, TypeError, ValueError):
            return None
        if chunk.first <= execution < chunk.first + max(chunk.count, 1):
            share = (execution - chunk.first + 1) / max(chunk.runs, 1)
            return before + (elapsed - before) * min(1.0, share)
        before = max(before, elapsed)
    return None


# -- output ---------------------------------------------------------------------------------------

COLUMNS = ("profile", "runs", "failing", "signatures", "fired", "first failure", "artifacts")


def _rel(path: str | Path, base: Path | None) -> str:
    """`path` relative to the comparison folder `base` (artifact paths are long)."""
    if base is None:
        return str(path)
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def _cells(row: Row, base: Path | None = None) -> list[str]:
    first = "-"
    if row.first_failure_run is not None:
        secs = "" if row.first_failure_s is None else f", {row.first_failure_s:.2f} s"
        first = f"run {row.first_failure_run}{secs}"
    fired = "; ".join(row.signatures) or "clean"
    if row.known:
        fired += " (known)" if len(row.known) == len(row.fired) else f" ({len(row.known)} known)"
    artifacts = " ".join(_rel(row.artifacts[s], base) for s in row.signatures) or "-"
    if row.folder is not None and row.signatures:
        # one campaign folder per row, then each signature's folder in it
        artifacts = f"{_rel(row.folder, base)}/: " + " ".join(Path(row.artifacts[s]).name for s in row.signatures)
    kind = "" if row.kind == "kernel" else f" ({row.kind})"
    return [row.profile + kind, str(row.runs), str(row.failures), str(len(row.fired)), fired, first, artifacts]


def render_markdown(rows: list[Row], base: Path | None = None) -> str:
    """One GitHub table; artifact folders relative to the comparison folder `base`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = _cells(row, base)
        if row.folder is not None and row.signatures:
            names = [f"`{Path(row.artifacts[s]).name}`" for s in row.signatures]
            cells[-1] = "<br>".join([f"`{_rel(row.folder, base)}/`", *names])
        cells[4] = "<br>".join(f"`{s}`" for s in row.signatures) or "clean"
        if row.known:
            cells[4] += "<br>(known)" if len(row.known) == len(row.fired) else f"<br>({len(row.known)} known)"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = known_notes(rows)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def known_notes(rows: list[Row]) -> list[str]:
    """One line per distinct known behaviour the rows hit: which profile, and why (with the fix)."""
    seen: dict[tuple[str, str], None] = {}
    for row in rows:
        for text in row.known.values():
            seen[(row.profile, text)] = None
    return [f"{profile}: {text}" for profile, text in seen]


def render_json(rows: list[Row]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=1) + "\n"


def table(scenario: str, rows: list[Row], folder: Path) -> Any:
    from rich.table import Table

    t = Table(title=f"{scenario}: {len(rows)} profiles, same seed and budget; artifacts under {folder}")
    for c in COLUMNS:
        t.add_column(c, justify="right" if c in ("runs", "failing", "signatures") else "left", overflow="fold")
    for row in rows:
        cells = _cells(row, folder)
        style = "green" if not row.fired else "bold red"
        cells[4] = f"[{style}]{cells[4]}[/]"
        t.add_row(*cells)
    return t


def print_rows(scenario: str, rows: list[Row], folder: Path, fmt: str) -> None:
    """Print the comparison in `fmt` (table, markdown or json) on stdout."""
    import os
    import sys

    if fmt == "json":
        sys.stdout.write(render_json(rows))
    elif fmt == "markdown":
        sys.stdout.write(render_markdown(rows, folder))
    else:
        from rich.console import Console

        wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 1000
        console = Console(width=wide)
        console.print(table(scenario, rows, folder))
        for note in known_notes(rows):
            console.print(note, markup=False, highlight=False)
    sys.stdout.flush()
