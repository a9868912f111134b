"""Running campaign chunks on worker processes or on a Dask cluster."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from ..runtime.failures import ToolError
from .campaign import CHUNK, CampaignSpec, ChunkResult, chunks, run_chunk
from .scenarios import load_bundled, load_module

#: seconds to wait for a Dask scheduler before giving up with a one-line error
#: (ASYNCVM_DASK_CONNECT_TIMEOUT overrides it)
DASK_CONNECT_TIMEOUT = 10.0


def _connect_timeout() -> float:
    try:
        return float(os.environ.get("ASYNCVM_DASK_CONNECT_TIMEOUT", DASK_CONNECT_TIMEOUT))
    except ValueError:
        return DASK_CONNECT_TIMEOUT


def _worker_init(module: str | None) -> None:
    load_bundled()
    if module:
        load_module(module)


def _pool_worker_init(module: str | None, parent: int) -> None:
    # Ctrl-C is the campaign process's to handle: it stops the workers itself (see run_local_pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(module)
    _watch_parent(parent)


def _watch_parent(parent: int) -> None:
    """Exit this worker when the campaign process is gone (e.g. killed with SIGKILL).

    A pool worker otherwise outlives a killed parent: it holds both ends of its call queue, so it
    never sees end-of-file and would sit idle (or finish a chunk nobody reads) forever.
    """

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="asyncvm-parent-watch", daemon=True).start()


#: One controlled execution at a time per process: the executor is process-global (runtime.traps),
#: so a Dask worker with several threads, or an in-process cluster (processes=False) sharing the
#: campaign's own process, must not run two executions at once. Held around every chunk here and
#: around the campaign's merge (which replays new failures) in runner.py.
EXECUTION_LOCK = threading.RLock()


def _run(spec_json: dict[str, Any], first: int, count: int) -> dict[str, Any]:
    spec = CampaignSpec(**spec_json)
    with EXECUTION_LOCK:
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
    # fork: workers inherit the registered scenarios and need no __main__ guard in user scripts
    ctx = get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_worker_init, initargs=(spec.module, os.getpid()))
    running: set[Future[dict[str, Any]]] = set()
    finished = False
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
                finished = True
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield ChunkResult.from_json(fut.result())
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _abandon(pool, running)


def _abandon(pool: ProcessPoolExecutor, running: set[Future[dict[str, Any]]]) -> None:
    """Stop at once (Ctrl-C, a stopped campaign, an error): chunks in flight are thrown away.

    Nothing is lost: a chunk counts only once it is in the ledger, and --resume reruns the rest.
    """
    for fut in running:
        fut.cancel()
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    for proc in workers:
        proc.join(timeout=5)


def connect_dask(address: Any) -> Any:
    """A distributed Client for `address` (a scheduler address, a Client or a cluster object).

    An unreachable scheduler or a missing ``distributed`` package is a one-line ToolError.
    """
    try:
        from distributed import Client
    except ImportError:
        raise ToolError("--dask needs the dask extra: pip install 'asyncvm[dask]'") from None
    if isinstance(address, Client):
        return address
    try:
        return Client(address, timeout=_connect_timeout())
    except (OSError, TimeoutError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ToolError(f"cannot connect to the Dask scheduler at {address}: {detail}") from None


def run_dask(
    spec: CampaignSpec,
    address: Any,
    *,
    time_budget: float | None = None,
    skip: set[int] | None = None,
    chunk: int | None = None,
) -> Iterator[ChunkResult]:
    """Yield chunk results from a Dask distributed scheduler at `address` (or a Client/cluster)."""
    from distributed import as_completed

    client = connect_dask(address)
    outstanding: set[Any] = set()
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
        outstanding = {client.submit(task, f, n, pure=False) for f, n in itertools.islice(todo, window)}
        pending = as_completed(list(outstanding))
        for fut in pending:
            outstanding.discard(fut)
            result = fut.result()
            fut.release()  # the cluster need not keep a chunk once it is merged here
            yield ChunkResult.from_json(result)
            if deadline is not None and time.perf_counter() > deadline:
                return
            nxt = next(todo, None)
            if nxt is not None:
                more = client.submit(task, nxt[0], nxt[1], pure=False)
                outstanding.add(more)
                pending.add(more)
    finally:
        for other in outstanding:
            other.cancel()
        if client is not address:
            client.close()
