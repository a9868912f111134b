"""Benchmarks of race-hunting power: throughput, runs to first failure, scale, false positives."""

from __future__ import annotations

import gc
import os
import statistics
import time
import tracemalloc
from functools import partial
from typing import Any

from .. import uapi
from ..bugs import BUGS
from ..check import check_quiescent
from ..explore.driver import explore
from ..explore.scenarios import REGISTRY, load_bundled
from ..runtime.executor import Executor
from ..runtime.strategies import RandomStrategy

STRATEGIES = ("pct", "pos", "random", "portfolio")


def executions_per_second(quick: bool = False) -> dict[str, Any]:
    """Executions per second on one core: pre-fault vs punch hole, 2 vCPUs, 16 pages."""
    load_bundled()
    runs = 300 if quick else 2000
    out: dict[str, Any] = {"scenario": "prefault_vs_punch_hole", "params": {"vcpus": 2, "pages": 16}, "target": 1000}
    for strategy in ("random", "pct"):
        t0 = time.perf_counter()
        report = explore("prefault_vs_punch_hole", strategy=strategy, runs=runs, seed=0, params=out["params"])
        dt = time.perf_counter() - t0
        out[strategy] = {
            "runs": report.runs,
            "executions_per_second": round(report.runs / dt, 1),
            "steps_per_execution": round(report.steps / report.runs, 1),
            "scheduling_steps_per_second": round(report.steps / dt),
        }
    return out


def live_runs_to_failure(scenario: str, bug: str, runs: int) -> int | None:
    """Run the scenario uncontrolled on trio (live mode) until an oracle or the scenario fails."""
    import anyio

    from ..kvm.kvm import Kvm

    spec = REGISTRY[scenario]
    for i in range(runs):
        kvm = Kvm(bugs=[bug])
        try:
            anyio.run(partial(spec.fn, kvm, **spec.params), backend="trio")
            for vm in kvm.vms:
                check_quiescent(vm)
        except Exception:  # noqa: BLE001 - any failure counts, as in a controlled run
            return i
    return None


def runs_to_first_failure(quick: bool = False) -> dict[str, Any]:
    """Median runs to the first failure per named bug and strategy, next to trio's own scheduling."""
    load_bundled()
    seeds = 5 if quick else 20
    limit = 300 if quick else 2000
    table: dict[str, Any] = {}
    for name, bug in BUGS.items():
        row: dict[str, Any] = {"scenario": bug.scenario}
        for strategy in STRATEGIES:
            firsts = []
            for seed in range(seeds):
                rep = explore(
                    bug.scenario, strategy=strategy, runs=limit, seed=seed, bugs=[name], stop_on_first_failure=True
                )
                firsts.append(rep.failures[0].first_run + 1 if rep.failures else None)
            found = [f for f in firsts if f is not None]
            row[strategy] = {
                "median_runs": statistics.median(found) if len(found) * 2 > len(firsts) else f">{limit}",
                "found_in_seeds": f"{len(found)}/{len(firsts)}",
            }
        live = live_runs_to_failure(bug.scenario, name, limit)
        row["trio_uncontrolled"] = {"runs_to_failure": live + 1 if live is not None else f">{limit}"}
        table[name] = row
    return {"seeds": seeds, "max_runs": limit, "bugs": table}


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


def scale(quick: bool = False) -> dict[str, Any]:
    """Pre-fault a whole guest (1 GiB host pages) at 1, 16 and 256 GiB: time and peak memory."""
    sizes = (1, 16, 256)
    rows = {}
    for gib in sizes:
        best_t, best_mem, steps = float("inf"), 0, 0
        for _ in range(2 if quick else 3):
            gc.collect()
            tracemalloc.start()
            strategy = RandomStrategy(0)
            strategy.new_execution(0)
            exe = Executor(strategy, data_probs={"signal": 0.0})
            t0 = time.perf_counter()
            from ..kvm.kvm import Kvm

            result = exe.run(partial(_whole_guest, Kvm(), gib, 1, 2))
            dt = time.perf_counter() - t0
            _cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            if result.failure is not None:
                raise RuntimeError(f"scale run failed: {result.failure}")
            best_t, best_mem, steps = min(best_t, dt), peak, result.steps
        rows[f"{gib}GiB"] = {"seconds": round(best_t, 4), "peak_bytes": best_mem, "steps": steps}
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


def false_positives(quick: bool = False) -> dict[str, Any]:
    """Every shipped scenario, no bugs enabled: failures must be zero."""
    load_bundled()
    runs = 300 if quick else 10_000
    jobs = os.cpu_count() or 1
    out = {}
    for name in sorted(REGISTRY):
        if REGISTRY[name].module.split(".")[0] != "stress":
            continue
        t0 = time.perf_counter()
        rep = explore(name, strategy="portfolio", runs=runs, seed=0, jobs=jobs)
        out[name] = {
            "runs": rep.runs,
            "failures": rep.failing_runs,
            "signatures": rep.signatures,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return {"runs_per_scenario": runs, "strategy": "portfolio", "scenarios": out}
