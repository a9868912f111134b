"""Benchmarks of race-hunting power: throughput, runs to first failure, scale, false positives."""

from __future__ import annotations

import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

from .. import uapi
from ..bugs import BUGS
from ..check import check_quiescent
from ..explore.campaign import Report
from ..explore.driver import explore
from ..explore.scenarios import REGISTRY, load_bundled
from ..runtime.executor import Executor
from ..runtime.strategies import RandomStrategy
from . import Tick
from .scheduler import best_bare_send

#: what `asyncvm stress` and explore() run when no strategy is given (a test keeps them in step)
DEFAULT_STRATEGY = "pct"
#: the throughput campaign: pre-fault vs punch hole, 2 vCPUs, 16 pages
THROUGHPUT = ("prefault_vs_punch_hole", {"vcpus": 2, "pages": 16})


class _Chunks:
    """A campaign's progress hook: times each chunk in CPU seconds of this process, and measures a
    bare send between chunks (kept out of the chunks' times).

    The first chunk also carries the campaign's set-up, so it is not timed.
    """

    def __init__(self, tick: Callable[[int], None]) -> None:
        self.tick = tick
        self.rates: list[tuple[float, float]] = []  # (executions, steps) per CPU second, per chunk
        self.bares: list[float] = []
        self.runs = self.steps = 0
        self.timed_runs = 0
        self.cpu = 0.0
        self.resumed: float | None = None

    def __call__(self, report: Report) -> None:
        now = time.process_time()
        runs, steps = report.runs - self.runs, report.steps - self.steps
        self.runs, self.steps = report.runs, report.steps
        if self.resumed is not None and runs and now > self.resumed:
            dt = now - self.resumed
            self.rates.append((runs / dt, steps / dt))
            self.timed_runs += runs
            self.cpu += dt
        self.tick(report.runs)
        self.bares.append(best_bare_send(clock=time.process_time))
        self.resumed = time.process_time()


def executions_per_second(quick: bool, tick: Tick) -> dict[str, Any]:
    """Executions per second on one core per strategy, and what one execution costs in bare
    coro.send() switches.

    Each strategy runs one campaign in chunks; between chunks this process measures a bare
    coro.send() switch. Both are timed in CPU seconds of this process (on an idle core the same as
    wall seconds), and both figures are the best of their samples, so other load on a shared
    machine changes neither much and ``sends_per_execution = 1e6 / (executions_per_second *
    bare_send_us)`` stays comparable across machines. The wall-clock rate of the whole campaign is
    reported beside them.
    """
    load_bundled()
    runs = 200 if quick else 1250
    scenario, params = THROUGHPUT
    # (row, strategy, race detector): the detector's cost is the last row against pct
    variants = (("random", "random", False), ("pct", "pct", False), ("pct+race_detector", "pct", True))
    bares: list[float] = []
    rows: dict[str, Any] = {}
    for i, (row, strategy, detect) in enumerate(variants):

        def done(n: int, i: int = i, row: str = row) -> None:
            tick(i * runs + n, len(variants) * runs, row)

        chunks = _Chunks(done)
        report = explore(
            scenario, strategy=strategy, runs=runs, seed=0, params=params, progress=chunks, detect_races=detect
        )
        bares += chunks.bares
        eps, sps = max(chunks.rates)
        rows[row] = {
            "runs": report.runs,
            "timed_chunks": len(chunks.rates),
            "executions_per_second": round(eps, 1),
            "mean_executions_per_cpu_second": round(chunks.timed_runs / chunks.cpu, 1),
            "wall_executions_per_second": round(report.runs / report.elapsed, 1),
            "steps_per_execution": round(report.steps / report.runs, 1),
            "scheduling_steps_per_second": round(sps),
        }
    bare_us = min(bares) * 1e6
    for row in rows.values():
        row["sends_per_execution"] = round(1e6 / (row["executions_per_second"] * bare_us))
        row["sends_per_step"] = round(1e6 / (row["scheduling_steps_per_second"] * bare_us), 1)
    return {
        "scenario": scenario,
        "params": params,
        "jobs": 1,
        "clock": "CPU seconds of this process (best chunk; best bare send)",
        "bare_send_us": round(bare_us, 4),
        "bare_send_samples": len(bares),
        "strategies": rows,
        "race_detector_slowdown": round(
            rows["pct"]["executions_per_second"] / rows["pct+race_detector"]["executions_per_second"], 2
        ),
        "target_sends_per_execution": 8000,
        "target_executions_per_second": 1000,
    }


#: wall seconds after which one live run (milliseconds when it ends) counts as hung
LIVE_HANG_SECONDS = 1.0


def live_runs_to_failure(
    scenario: str, bug: str, runs: int, deadline: float | None = None, profile: str = "6.18"
) -> tuple[int, bool]:
    """Run the scenario uncontrolled on trio (live mode) until an oracle or the scenario fails.

    Returns (runs made, whether the last one failed); stops after `runs` runs or at `deadline`
    (a time.perf_counter() value). Live mode draws no signals, so a run that spins forever (an
    invalidation that never ends) is a hang: cancelled after LIVE_HANG_SECONDS, it counts as
    found, as a hung task would be on Linux.
    """
    import anyio

    from ..kvm.kvm import Kvm

    spec = REGISTRY[scenario]
    for i in range(runs):
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            return i, False
        limit = LIVE_HANG_SECONDS if deadline is None else min(LIVE_HANG_SECONDS, deadline - now)
        kvm = Kvm(profile, bugs=[bug])

        async def one(kvm: Kvm = kvm, limit: float = limit) -> None:
            with anyio.fail_after(limit):
                await spec.fn(kvm, **spec.params)

        try:
            anyio.run(one, backend="trio")
            for vm in kvm.vms:
                check_quiescent(vm)
        except TimeoutError:
            return (i + 1, True) if limit == LIVE_HANG_SECONDS else (i, False)
        except Exception:  # noqa: BLE001 - any failure counts, as in a controlled run
            return i + 1, True
    return runs, False


def _median(found: list[tuple[float, int]], tries: int) -> tuple[float, float] | None:
    """The median (seconds, runs) over `tries`, counting the tries that found nothing as infinite."""
    if len(found) * 2 <= tries:
        return None
    by_seconds = sorted(s for s, _ in found) + [float("inf")] * (tries - len(found))
    by_runs = sorted(r for _, r in found) + [1 << 62] * (tries - len(found))
    return statistics.median(by_seconds), statistics.median(by_runs)


def _first_failure_row(found: list[tuple[float, int]], tries: int, runs: int, seconds: float) -> dict[str, Any]:
    """Medians over `tries` (`runs` runs in `seconds` in all), or how much found nothing."""
    med = _median(found, tries)
    seconds_to: str | float
    runs_to: str | float
    if med is None:
        missed = f"not found in {runs} runs / {seconds:.1f} s"
        seconds_to, runs_to = missed, missed
    else:
        seconds_to, runs_to = round(med[0], 4), med[1]
    return {
        "median_seconds_to_first_failure": seconds_to,
        "median_runs_to_first_failure": runs_to,
        "found": f"{len(found)}/{tries}",
        "runs": runs,
        "seconds": round(seconds, 2),
    }


def first_failure(quick: bool, tick: Tick) -> dict[str, Any]:
    """Per named bug: median wall seconds and runs to the first failure with the default strategy
    over 20 seeds (one process, as explore() runs it), next to trio's own scheduling of the same
    scenario (live mode, uncontrolled) tried as many times.

    Caps keep the whole bench short: a campaign stops after `max_runs` runs, and each side of a
    bug stops trying once it spent `seconds_per_bug`; a median over tries that mostly found
    nothing reads "not found in N runs / S s".
    """
    load_bundled()
    seeds = 3 if quick else 20
    max_runs = 100 if quick else 1000
    seconds_per_bug = 0.5 if quick else 5.0
    table: dict[str, Any] = {}
    for b, (name, bug) in enumerate(BUGS.items()):
        tick(b, len(BUGS), name)
        row: dict[str, Any] = {"scenario": bug.scenario}
        found: list[tuple[float, int]] = []
        tries = total_runs = 0
        began = time.perf_counter()
        for seed in range(seeds):
            if time.perf_counter() - began > seconds_per_bug:
                break
            t0 = time.perf_counter()
            rep = explore(
                bug.scenario,
                strategy=DEFAULT_STRATEGY,
                runs=max_runs,
                seed=seed,
                profile=bug.profile,
                bugs=[name],
                stop_on_first_failure=True,
            )
            tries += 1
            total_runs += rep.runs
            if rep.failures:
                found.append((time.perf_counter() - t0, rep.failures[0].first_run + 1))
        row[DEFAULT_STRATEGY] = _first_failure_row(found, tries, total_runs, time.perf_counter() - began)
        live: list[tuple[float, int]] = []
        tries = total_runs = 0
        began = time.perf_counter()
        deadline = began + seconds_per_bug
        while tries < seeds and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            n, failed = live_runs_to_failure(bug.scenario, name, max_runs, deadline, bug.profile)
            total_runs += n
            if not failed and n < max_runs and tries:
                break  # cut short by the deadline: not a try of its own
            tries += 1
            if failed:
                live.append((time.perf_counter() - t0, n))
        row["trio_uncontrolled"] = _first_failure_row(live, tries, total_runs, time.perf_counter() - began)
        table[name] = row
    tick(len(BUGS), len(BUGS), "")
    return {
        "strategy": DEFAULT_STRATEGY,
        "jobs": 1,
        "seeds": seeds,
        "max_runs": max_runs,
        "max_seconds_per_bug": seconds_per_bug,
        "bugs": table,
    }


async def _whole_guest(kvm: Any, gib: int, slots: int, vcpus: int) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    size = gib << 30
    per = size // slots
    for s in range(slots):
        hva = kvm.mm.mmap(per, page_size=1 << 30)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(s, 0, s * per, per, hva))
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    per_cpu = size // vcpus
    for i, v in enumerate(cpus):
        r = uapi.PreFaultMemory(i * per_cpu, per_cpu)
        while r.size:
            try:
                await v.pre_fault_memory(r)
            except uapi.KvmError as e:
                if e.errno != uapi.EINTR:
                    raise


def _scale_one(gib: int, repeats: int) -> dict[str, Any]:
    """The best of `repeats` pre-faults of a `gib` GiB guest: seconds, peak traced bytes, steps."""
    from ..kvm.kvm import Kvm

    best_t, best_mem, steps = float("inf"), 0, 0
    for _ in range(repeats):
        gc.collect()
        tracemalloc.start()
        strategy = RandomStrategy(0)
        strategy.new_execution(0)
        exe = Executor(strategy, data_probs={"signal": 0.0})
        t0 = time.perf_counter()
        result = exe.run(partial(_whole_guest, Kvm(), gib, 1, 2))
        dt = time.perf_counter() - t0
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if result.failure is not None:
            raise RuntimeError(f"scale run failed: {result.failure}")
        best_t, best_mem, steps = min(best_t, dt), peak, result.steps
    return {"seconds": round(best_t, 4), "peak_bytes": best_mem, "steps": steps}


def scale(quick: bool, tick: Tick) -> dict[str, Any]:
    """Pre-fault a whole guest (1 GiB host pages) at 1, 16 and 256 GiB: time and peak memory."""
    sizes = (1, 16, 256)
    rows = {}
    # What earlier benchmarks left in this process is frozen, so collecting costs the same here
    # as in a fresh process.
    gc.collect()
    gc.freeze()
    try:
        for i, gib in enumerate(sizes):
            tick(i, len(sizes), f"{gib} GiB")
            rows[f"{gib}GiB"] = _scale_one(gib, 1 if quick else 3)
    finally:
        gc.unfreeze()
    tick(len(sizes), len(sizes), "")
    first, last = rows[f"{sizes[0]}GiB"], rows[f"{sizes[-1]}GiB"]
    return {
        "memslots": 1,
        "vcpus": 2,
        "note": "time follows the number of 1 GiB mappings the kernel loop creates (1 vs 256); state does not",
        "backing": "1 GiB host pages (pre-fault maps 1G SPTEs)",
        "sizes": rows,
        "time_growth_1_to_256": round(last["seconds"] / first["seconds"], 2),
        "memory_growth_1_to_256": round(last["peak_bytes"] / max(1, first["peak_bytes"]), 2),
        "target_growth": 1.5,
    }


def false_positives(quick: bool, tick: Tick) -> dict[str, Any]:
    """Every shipped scenario, no bugs enabled, on every core: failures must be zero."""
    load_bundled()
    runs = 20 if quick else 250
    jobs = os.cpu_count() or 1
    names = sorted(n for n, spec in REGISTRY.items() if spec.module.startswith("asyncvm.scenarios."))
    out = {}
    for i, name in enumerate(names):
        tick(i, len(names), name)
        t0 = time.perf_counter()
        rep = explore(name, strategy="portfolio", runs=runs, seed=0, jobs=jobs)
        # A failure the scenario declares as the profile's known kernel behaviour (a real bug of
        # that kernel, e.g. 6.18's TDX state-ioctl races) is not a false positive: listed apart.
        out[name] = {
            "runs": rep.runs,
            "failures": sum(f.count for f in rep.findings),
            "signatures": [f.signature for f in rep.findings],
            "known": [f.signature for f in rep.failures if f.known],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    tick(len(names), len(names), "")
    return {
        "runs_per_scenario": runs,
        "strategy": "portfolio",
        "jobs": jobs,
        "executions": sum(r["runs"] for r in out.values()),
        "failures": sum(r["failures"] for r in out.values()),
        "scenarios": out,
    }
