"""Benchmark: does a campaign use every core? One campaign, run by the campaign driver on one
process, on two worker processes (`asyncvm stress --jobs 2`) and on a 2-worker Dask LocalCluster.

The campaign is CPU-bound, so on an idle 2-core machine --jobs 2 should run 1.8-2x the executions
per second of --jobs 1; the load average before and after says how idle the machine was.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from ..explore.campaign import CampaignSpec, Report
from ..explore.runner import run_campaign
from ..explore.scenarios import load_bundled
from . import Tick
from .race import DEFAULT_STRATEGY, THROUGHPUT


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have exited (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _row(report: Report) -> dict[str, Any]:
    return {
        "runs": report.runs,
        "steps": report.steps,
        "seconds": round(report.elapsed, 2),
        "executions_per_second": round(report.runs_per_second, 1),
    }


def jobs_scaling(quick: bool, tick: Tick) -> dict[str, Any]:
    """Executions/s of one campaign (run_campaign, as `asyncvm stress` runs it) per executor.

    --jobs 1 and --jobs 2 are measured twice, in the order 1, 2, 2, 1, and the better of each pair
    counts, so other load on the machine that comes or goes during the bench hits both alike. The
    CPU seconds of each (this process and its workers) tell the cost of going parallel apart
    from the load: equal CPU seconds per execution means the workers did no extra work, and
    `cores_used` (CPU seconds over wall seconds) says how much of the machine the campaign got:
    under Linux's autogroup scheduling a busy machine gives one session about the same share
    however many workers it runs.
    """
    load_bundled()
    runs = 100 if quick else 600
    scenario, params = THROUGHPUT
    spec = CampaignSpec(scenario=scenario, params=dict(params), strategy=DEFAULT_STRATEGY, seed=0, runs=runs)
    out: dict[str, Any] = {
        "scenario": scenario,
        "params": params,
        "strategy": DEFAULT_STRATEGY,
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "load_average_before": _load(),
    }
    order = (1, 2, 2, 1)
    total = (len(order) + 1) * runs
    samples: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="asyncvm-bench-") as tmp:
        # The worker pools fork: run them before the Dask cluster starts its threads.
        for n, jobs in enumerate(order):

            def progress(report: Report, _runs: int, n: int = n, jobs: int = jobs) -> None:
                tick(n * runs + report.runs, total, f"--jobs {jobs}")

            cpu = _cpu_seconds()
            report, _folder = run_campaign(spec, out=Path(tmp), jobs=jobs, do_shrink=False, on_progress=progress)
            cpu = _cpu_seconds() - cpu
            # cores_used: how much of the machine the campaign got (1 per worker when idle)
            samples[jobs].append(
                _row(report) | {"cpu_seconds": round(cpu, 2), "cores_used": round(cpu / report.elapsed, 2)}
            )
        for jobs, rows in samples.items():
            best = max(rows, key=lambda r: r["executions_per_second"])
            out[f"jobs{jobs}"] = best | {"samples_executions_per_second": [r["executions_per_second"] for r in rows]}
        out["speedup_jobs2_vs_jobs1"] = round(
            out["jobs2"]["executions_per_second"] / out["jobs1"]["executions_per_second"], 2
        )
        out["target_speedup"] = 1.8
        out["cpu_seconds_per_execution_jobs2_vs_jobs1"] = round(
            out["jobs2"]["cpu_seconds"] / max(0.01, out["jobs1"]["cpu_seconds"]), 2
        )
        out["dask"] = _dask(spec, Path(tmp), lambda done: tick(len(order) * runs + done, total, "dask"))
    if "executions_per_second" in out["dask"]:
        out["dask"]["speedup_vs_jobs1"] = round(
            out["dask"]["executions_per_second"] / out["jobs1"]["executions_per_second"], 2
        )
    out["load_average_after"] = _load()
    tick(total, total, "")
    return out


def _dask(spec: CampaignSpec, out: Path, tick: Any) -> dict[str, Any]:
    """The campaign on a LocalCluster of 2 worker processes (1 thread each), timed once they are up."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return {"skipped": "distributed is not installed (pip install 'asyncvm[dask]')"}
    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(load_bundled)  # each worker imports the model before the clock starts
        started = time.perf_counter() - t0
        report, _folder = run_campaign(
            spec, out=out, dask=client, do_shrink=False, on_progress=lambda r, _n: tick(r.runs)
        )
    return {"workers": 2, "threads_per_worker": 1, "cluster_start_seconds": round(started, 2), **_row(report)}
