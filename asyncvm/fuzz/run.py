"""`asyncvm fuzz`: programs x schedules through the campaign driver, a corpus, program files.

A fuzz campaign is a campaign of the `fuzz` scenario: execution i draws its program and its
schedule from (seed, i), so the usual folder, ledger, resume, jobs and Dask all apply. Each
failure's folder gets, next to the schedules, the program as a standalone file with its own
schedule (write.py). The corpus (a folder kept across campaigns) collects those files; a campaign
first replays the corpus and says which of its programs still fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..explore.campaign import CampaignSpec, FoundFailure, Report
from ..explore.engine import replay
from ..explore.runner import run_campaign, slug
from ..explore.scenarios import UnknownScenario, get_scenario, load_module
from ..explore.schedule import Schedule, ScheduleError
from ..runtime.failures import ReplayDivergence, ToolError
from .describe import VM_TYPES
from .write import write_program

UNBOUNDED = 10**12


@dataclass
class CorpusResult:
    """What replaying the corpus found: program files that still fail, that no longer do, and
    that could not be replayed (another profile or bug set, another asyncvm)."""

    failing: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def check_vm_type(vm_type: str) -> None:
    if vm_type != "any" and vm_type not in VM_TYPES:
        raise ValueError(f"unknown VM type {vm_type!r} (choose one of: {', '.join(VM_TYPES)}, any)")


def fuzz_spec(
    *,
    vm_type: str = "any",
    profile: str = "6.18",
    bugs: list[str] | None = None,
    strategy: str = "pct",
    seed: int = 0,
    programs: int | None = None,
    timed: bool = False,
    stop_on_first_failure: bool = False,
) -> CampaignSpec:
    check_vm_type(vm_type)
    return CampaignSpec(
        scenario="fuzz",
        params={"vm_type": vm_type},
        profile=profile,
        bugs=list(bugs or []),
        strategy=strategy,
        seed=seed,
        runs=programs if programs is not None else (UNBOUNDED if timed else 1000),
        stop_on_first_failure=stop_on_first_failure,
    )


def replay_corpus(corpus: Path, profile: str, bugs: list[str]) -> CorpusResult:
    """Replay each program file of the corpus recorded with this profile and these bugs."""
    out = CorpusResult()
    for sched_path in sorted(corpus.glob("*.schedule.json")):
        program = sched_path.with_name(sched_path.name.removesuffix(".schedule.json") + ".py")
        try:
            schedule = Schedule.load(sched_path)
            if schedule.profile != profile or sorted(schedule.bugs) != sorted(bugs) or not program.is_file():
                out.skipped.append(program.name)
                continue
            load_module(str(program))
            result = replay(schedule, get_scenario(schedule.scenario).fn)
        except (ScheduleError, UnknownScenario, ReplayDivergence, ToolError):
            out.skipped.append(program.name)
            continue
        if result.failure is not None and result.failure.signature == schedule.signature:
            out.failing.append(program.name)
        else:
            out.fixed.append(program.name)
    return out


def write_failure_program(found: FoundFailure, target: Path, corpus: Path | None) -> Path | None:
    """The failure's program file (from its shrunk schedule when there is one) in `target`, and a
    copy in the corpus; None when the program cannot be written on its own."""
    schedule = found.shrunk or found.schedule
    for old in [*target.glob("fuzz_*.py"), *target.glob("fuzz_*.schedule.json")]:
        old.unlink()  # the program of an earlier witness of this signature
    try:
        path, sched = write_program(schedule, target)
    except (ToolError, UnknownScenario, ScheduleError):
        if schedule is found.schedule:
            return None
        try:
            path, sched = write_program(found.schedule, target)
        except (ToolError, UnknownScenario, ScheduleError):
            return None
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, corpus / path.name)
        if sched is not None:
            shutil.copy2(sched, corpus / sched.name)
    return path


def run_fuzz(
    spec: CampaignSpec,
    *,
    out: Path,
    jobs: int = 1,
    dask: Any = None,
    time_budget: float | None = None,
    do_shrink: bool = True,
    corpus: Path | None = None,
    on_start: Callable[[Path], None] | None = None,
    on_progress: Callable[[Report, int], None] | None = None,
) -> tuple[Report, Path, dict[str, str]]:
    """Run the fuzz campaign; returns its report, its folder and each signature's program file."""
    programs: dict[str, str] = {}

    def found_one(found: FoundFailure, target: Path) -> None:
        path = write_failure_program(found, target, None)
        if path is not None:
            programs[found.signature] = str(path)

    report, folder = run_campaign(
        spec,
        out=out,
        jobs=jobs,
        dask=dask,
        time_budget=time_budget,
        do_shrink=do_shrink,
        on_failure=found_one,
        on_progress=on_progress,
        on_start=on_start,
    )
    # At the end each signature's artifacts show its smallest witness, shrunk in full: so does
    # its program file.
    lines = []
    for found in report.failures:
        target = folder / slug(found.signature)
        path = write_failure_program(found, target, corpus)
        if path is not None:
            programs[found.signature] = str(path)
        lines.append(
            {
                "signature": found.signature,
                "first_run": found.first_run,
                "count": found.count,
                "program": programs.get(found.signature),
            }
        )
    (folder / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return report, folder, programs
