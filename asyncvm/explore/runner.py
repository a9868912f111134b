"""A campaign on disk: the folder, the ledger that survives a kill, failure artifacts, resume.

Layout of a campaign folder::

    campaign.json            what was asked (spec, chunk size, asyncvm version)
    ledger.jsonl             one line per merged chunk, per new failure and, at the end, per
                             failure's final artifacts (see _run_into); each flushed and fsynced
    summary.json             written at the end
    <signature>/             one folder per distinct failure signature:
        schedule.json, schedule.shrunk.json, events.jsonl, trace.json, timeline.html

A killed campaign keeps every failure it found; ``--resume`` re-merges the ledger's chunks and runs
only the chunks it does not have, up to the campaign's runs and time budget, which resuming may
extend. An interrupted campaign (Ctrl-C) still writes ``summary.json``, of what it ran so far.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..runtime.failures import ToolError
from .campaign import CampaignSpec, ChunkResult, FoundFailure, Report
from .driver import CHUNK, Campaign
from .engine import replay
from .files import FileError, read_campaign, read_ledger, seal
from .schedule import Schedule, ScheduleError, write_atomic
from .shrink import DEFAULT_ATTEMPTS, shrink

#: The shrink attempts spent on a failure when it is found; once the campaign ends, its smallest
#: witness gets the whole DEFAULT_ATTEMPTS.
FOUND_ATTEMPTS = 100


def slug(signature: str) -> str:
    """A folder name for a failure signature: readable, filesystem-safe, unique."""
    base = re.sub(r"[^A-Za-z0-9_.,-]+", "_", signature).strip("_")[:60]
    return f"{base}-{hashlib.sha1(signature.encode()).hexdigest()[:8]}"


def write_failure_artifacts(
    folder: Path, found: FoundFailure, fn: Any, *, do_shrink: bool = True, max_attempts: int = DEFAULT_ATTEMPTS
) -> Path:
    """schedule(.shrunk).json, events.jsonl, trace.json and timeline.html for one failure
    (its smallest witness so far, and that shrunk within `max_attempts`: `found.shrunk`)."""
    from ..trace.chrome import chrome_trace
    from ..trace.log import render_jsonl
    from ..trace.timeline import timeline_html

    folder.mkdir(parents=True, exist_ok=True)
    found.schedule.save(folder / "schedule.json")
    shown = found.schedule
    if do_shrink:
        try:
            shown = found.shrunk = shrink(found.schedule, fn, max_attempts=max_attempts)
            shown.save(folder / "schedule.shrunk.json")
        except ToolError:  # shrinking is best effort: the found schedule still stands
            shown = found.schedule
    original = replay(found.schedule, fn, force=True)
    write_atomic(folder / "events.jsonl", render_jsonl(original.events()))
    pictured = replay(shown, fn, force=True) if shown is not found.schedule else original
    events = pictured.events()
    trace = chrome_trace(events, pictured.task_names, pictured.failure)
    write_atomic(folder / "trace.json", json.dumps(trace))
    title = f"{found.schedule.scenario}: {found.signature}"
    write_atomic(folder / "timeline.html", timeline_html(events, pictured.task_names, pictured.failure, title))
    return folder


class Ledger:
    """Append-only JSON lines, each flushed to disk before the next chunk starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _drop_partial_line(path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, obj: dict[str, Any]) -> None:
        # Each record carries its checksum: an edited or damaged record is refused on resume.
        self._f.write(json.dumps(seal(obj), separators=(",", ":")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The ledger's records, each checked against its checksum and schema (`files.read_ledger`);
        a last line a kill cut short is left out."""
        return read_ledger(path)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line a kill left unfinished, so appending after it cannot glue two records."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
    except FileNotFoundError:
        pass


def stamped_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix>-<UTC time>`` (``-2``, ``-3``, ... if that one exists)."""
    base = parent / f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True)
    return folder


def new_campaign_dir(out: Path, spec: CampaignSpec) -> Path:
    """``OUT/<scenario>/<strategy>-seed<seed>-<UTC time>/``."""
    return stamped_dir(out / spec.scenario, f"{spec.strategy}-seed{spec.seed}")


def load_campaign(folder: Path) -> tuple[CampaignSpec, dict[str, Any]]:
    """A campaign folder's spec and campaign.json, validated (`files.CampaignModel`): one-line
    `FileError` naming the field for anything a campaign could not have written."""
    meta_path = folder / "campaign.json"
    if not meta_path.exists() and not meta_path.is_symlink():
        raise ScheduleError(f"{folder}: not a campaign folder (no campaign.json)")
    try:
        model = read_campaign(meta_path)
    except FileError as e:
        raise ScheduleError(str(e)) from None
    meta = model.model_dump()
    spec = CampaignSpec(**meta["spec"])
    return spec, meta


class CampaignInterrupted(KeyboardInterrupt):
    """Ctrl-C during a campaign: `report` is what it ran so far (also in the folder's summary.json)."""

    def __init__(self, report: Report, folder: Path) -> None:
        super().__init__(str(folder))
        self.report = report
        self.folder = folder


def run_campaign(
    spec: CampaignSpec,
    *,
    out: Path,
    jobs: int = 1,
    dask: Any = None,
    time_budget: float | None = None,
    do_shrink: bool = True,
    resume: Path | None = None,
    on_progress: Callable[[Report, int], None] | None = None,
    on_failure: Callable[[FoundFailure, Path], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> tuple[Report, Path]:
    """Run (or resume) a campaign into a folder; returns the report and the folder.

    `dask` is a scheduler address, a ``distributed.Client`` or a cluster object; chunks then run
    there. Whatever runs them, the same spec finds the same failures.

    Resuming (`resume`: the campaign's folder) runs what the ledger does not have yet, up to
    ``spec.runs`` and `time_budget` (the campaign's whole budget, counting the time it already
    ran): the spec must be the folder's own, but for its runs, which may grow. Ctrl-C writes the
    summary of what ran so far and raises `CampaignInterrupted`.
    """
    chunk_size: int | None = None
    done_lines: list[dict[str, Any]] = []
    used = 0.0
    session_budget = time_budget
    if resume is not None:
        stored, meta = load_campaign(resume)
        _check_resumable(resume, stored, spec)
        chunk_size = int(meta.get("chunk", CHUNK))
        do_shrink = bool(meta.get("shrink", do_shrink))  # as the campaign started
        done_lines = Ledger.read(resume / "ledger.jsonl")
        ran, used = ran_so_far(done_lines)
        if spec.runs < ran:
            raise ToolError(f"{resume}: the campaign already ran {ran} executions; it cannot stop at {spec.runs}")
        if time_budget is not None:
            # What is left of the budget; none left: the deadline passes before anything starts.
            session_budget = max(time_budget - used, 1e-9)
        # Temporary files of artifacts a kill interrupted (write_atomic names them .NAME.*.tmp).
        for tmp in resume.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
    # The campaign connects to Dask first: an unreachable scheduler must not leave an empty
    # campaign folder behind.
    with Campaign(spec, jobs=jobs, dask=dask, time_budget=session_budget, chunk=chunk_size) as campaign:
        folder = resume if resume is not None else new_campaign_dir(out, spec)
        meta = {"asyncvm": __version__, "chunk": campaign.chunk, "jobs": jobs, "shrink": do_shrink}
        write_atomic(
            folder / "campaign.json", json.dumps({**meta, "time": time_budget, "spec": spec.to_json()}, indent=1)
        )
        t0 = time.perf_counter()
        try:
            report = _run_into(campaign, folder, done_lines, do_shrink, used, on_progress, on_failure, on_start)
        except KeyboardInterrupt:
            if campaign.report is None:
                raise
            campaign.report.elapsed = time.perf_counter() - t0
            _write_summary(folder, campaign.report, interrupted=True)
            raise CampaignInterrupted(campaign.report, folder) from None
    _write_summary(folder, report)
    return report, folder


def ran_so_far(lines: list[dict[str, Any]]) -> tuple[int, float]:
    """(executions, seconds) a campaign's ledger lines record."""
    chunks = [line for line in lines if isinstance(line, dict) and line.get("type") == "chunk"]
    runs = sum(int(line["chunk"].get("runs", 0)) for line in chunks if isinstance(line.get("chunk"), dict))
    return runs, max((float(line.get("elapsed", 0.0)) for line in chunks), default=0.0)


def _check_resumable(folder: Path, stored: CampaignSpec, spec: CampaignSpec) -> None:
    """Only a campaign's runs may change when it is resumed."""
    differ = [k for k, v in spec.to_json().items() if k != "runs" and stored.to_json().get(k) != v]
    if differ:
        given = ", ".join(f"{k}={getattr(spec, k)!r} (the campaign has {getattr(stored, k)!r})" for k in differ)
        raise ToolError(f"{folder}: a resumed campaign keeps its options; got {given}")


def _write_summary(folder: Path, report: Report, *, interrupted: bool = False) -> None:
    summary = report.to_json()
    summary["folder"] = str(folder)
    summary["failures"] = [dict(f, dir=slug(f["signature"])) for f in summary["failures"]]
    if interrupted:
        summary["interrupted"] = True
    write_atomic(folder / "summary.json", json.dumps(summary, indent=1))


def _run_into(
    campaign: Campaign,
    folder: Path,
    done_lines: list[dict[str, Any]],
    do_shrink: bool,
    used: float,
    on_progress: Callable[[Report, int], None] | None,
    on_failure: Callable[[FoundFailure, Path], None] | None,
    on_start: Callable[[Path], None] | None,
) -> Report:
    """The campaign with its ledger (each chunk, with the seconds the campaign has run by then,
    each failure) and each failure's artifacts; `used`: seconds earlier sessions ran."""
    fn = campaign.program.scenario
    t0 = time.perf_counter()
    ledger = Ledger(folder / "ledger.jsonl")
    if on_start is not None:
        on_start(folder)
    written: set[str] = set()
    # What each signature's artifacts on disk show: (witness execution, final). A failure line is
    # appended once the artifacts of a new signature are written (shrunk in FOUND_ATTEMPTS), so a
    # failure without one (the kill came while writing them) gets them written again. When the
    # campaign ends, each signature's artifacts are rewritten for its smallest witness, shrunk in
    # full, and a witness line says so: a resumed campaign that ends the same way skips that.
    on_disk: dict[str, tuple[int, bool]] = {}
    for line in done_lines:
        if isinstance(line, dict) and line.get("type") in ("failure", "witness"):
            witness = int(line.get("witness", line.get("run")) or 0)
            on_disk[str(line.get("signature"))] = (witness, line["type"] == "witness" or not do_shrink)

    def found_one(found: FoundFailure) -> None:
        target = folder / slug(found.signature)
        if found.signature not in written:
            written.add(found.signature)
            if found.signature not in on_disk:
                write_failure_artifacts(target, found, fn, do_shrink=do_shrink, max_attempts=FOUND_ATTEMPTS)
                on_disk[found.signature] = (found.schedule.execution, not do_shrink)
                ledger.append(
                    {
                        "type": "failure",
                        "signature": found.signature,
                        "kind": found.kind,
                        "run": found.first_run,
                        "witness": found.schedule.execution,
                        "message": found.message,
                        "dir": target.name,
                    }
                )
            if on_failure is not None:
                on_failure(found, target)

    def settle(found: FoundFailure) -> None:
        """At the end: the artifacts show the campaign's smallest witness, shrunk in full."""
        target = folder / slug(found.signature)
        if on_disk.get(found.signature) != (found.schedule.execution, True):
            write_failure_artifacts(target, found, fn, do_shrink=do_shrink)
            on_disk[found.signature] = (found.schedule.execution, True)
            ledger.append(
                {
                    "type": "witness",
                    "signature": found.signature,
                    "witness": found.schedule.execution,
                    "preemptions": found.schedule.preemptions,
                    "steps": found.schedule.steps,
                    "dir": target.name,
                }
            )
        elif found.shrunk is None and do_shrink and (target / "schedule.shrunk.json").is_file():
            try:  # written by the session this one resumes
                found.shrunk = Schedule.load(target / "schedule.shrunk.json")
            except ScheduleError:
                pass

    try:
        report = campaign.run(
            done=_ledger_chunks(done_lines, ledger.path, campaign),
            on_chunk=lambda chunk: ledger.append(
                {"type": "chunk", "chunk": chunk.to_json(), "elapsed": round(used + time.perf_counter() - t0, 3)}
            ),
            on_failure=found_one,
            progress=on_progress,
        )
        for found in report.failures:
            settle(found)
        return report
    except BrokenProcessPool as e:
        raise ToolError(
            f"a worker process died ({e}); the campaign so far is in {folder}: continue it with --resume {folder}"
        ) from None
    finally:
        ledger.close()


def _ledger_chunks(lines: list[dict[str, Any]], path: Path, campaign: Campaign) -> list[ChunkResult]:
    """The ledger's chunks (records already checked by `files.read_ledger`), each checked against
    the campaign's grid: inside its executions, no larger than its chunk size, no two overlapping."""
    spec = campaign.spec
    out: list[ChunkResult] = []
    covered: list[tuple[int, int, int]] = []
    for n, line in enumerate(lines, 1):
        if line.get("type") != "chunk":
            continue
        try:
            chunk = ChunkResult.from_json(line["chunk"])
        except (KeyError, TypeError, ValueError) as e:
            raise ScheduleError(f"{path}: malformed chunk record on line {n} ({e!r})") from None
        limit = spec.runs if spec.strategy == "dfs" else campaign.chunk
        if chunk.first < spec.first_run or chunk.count > limit:
            raise ScheduleError(
                f"{path}: line {n}: chunk [{chunk.first}, {chunk.first + chunk.count}) is not one of this "
                f"campaign's chunks (from execution {spec.first_run}, at most {limit} executions each)"
            )
        covered.append((chunk.first, chunk.first + chunk.count, n))
        out.append(chunk)
    covered.sort()
    for (_, end, _), (first, _, n) in itertools.pairwise(covered):
        if first < end:
            raise ScheduleError(f"{path}: line {n}: chunk starting at execution {first} overlaps an earlier one")
    return out
