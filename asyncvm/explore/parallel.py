"""Running campaign chunks on worker processes or on a Dask cluster."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from .campaign import CHUNK, CampaignSpec, ChunkResult, chunks, run_chunk
from .scenarios import load_bundled, load_module


def _worker_init(module: str | None) -> None:
    load_bundled()
    if module:
        load_module(module)


def _run(spec_json: dict[str, Any], first: int, count: int) -> dict[str, Any]:
    spec = CampaignSpec(**spec_json)
    return run_chunk(spec, first, count).to_json()


def _chunk_size(spec: CampaignSpec, jobs: int) -> int:
    # Small enough to keep every worker busy and the ledger fresh, large enough to amortize IPC.
    return max(20, min(CHUNK, spec.runs // (jobs * 4) or 1))


def _todo(spec: CampaignSpec, size: int, skip: set[int] | None) -> Iterator[tuple[int, int]]:
    return (c for c in chunks(spec.first_run, spec.runs, size) if not skip or c[0] not in skip)


def run_local_pool(
    spec: CampaignSpec,
    jobs: int,
    *,
    time_budget: float | None = None,
    skip: set[int] | None = None,
    chunk: int | None = None,
) -> Iterator[ChunkResult]:
    """Yield chunk results as worker processes finish them (not necessarily in order)."""
    deadline = time.perf_counter() + time_budget if time_budget else None
    todo = _todo(spec, chunk or _chunk_size(spec, jobs), skip)
    payload = spec.to_json()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(spec.module,)) as pool:
        running: set[Future[dict[str, Any]]] = set()
        try:
            while True:
                while len(running) < jobs * 2:
                    if deadline is not None and time.perf_counter() > deadline:
                        break
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    running.add(pool.submit(_run, payload, nxt[0], nxt[1]))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield ChunkResult.from_json(fut.result())
        finally:
            for fut in running:
                fut.cancel()


def run_dask(
    spec: CampaignSpec,
    address: Any,
    *,
    time_budget: float | None = None,
    skip: set[int] | None = None,
    chunk: int | None = None,
) -> Iterator[ChunkResult]:
    """Yield chunk results from a Dask distributed scheduler at `address` (or a Client/cluster)."""
    try:
        from distributed import Client, as_completed
    except ImportError as e:
        raise RuntimeError("--dask needs the dask extra: pip install 'asyncvm[dask]'") from e
    client = address if isinstance(address, Client) else Client(address)
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        todo = _todo(spec, chunk or _chunk_size(spec, workers), skip)
        payload = spec.to_json()
        module = spec.module
        deadline = time.perf_counter() + time_budget if time_budget else None

        def task(first: int, count: int) -> dict[str, Any]:
            _worker_init(module)
            return _run(payload, first, count)

        window = workers * 2
        futures = [client.submit(task, f, n, pure=False) for f, n in itertools.islice(todo, window)]
        pending = as_completed(futures)
        for fut in pending:
            yield ChunkResult.from_json(fut.result())
            if deadline is not None and time.perf_counter() > deadline:
                for other in futures:
                    other.cancel()
                return
            nxt = next(todo, None)
            if nxt is not None:
                more = client.submit(task, nxt[0], nxt[1], pure=False)
                futures.append(more)
                pending.add(more)
    finally:
        if not isinstance(address, Client):
            client.close()
