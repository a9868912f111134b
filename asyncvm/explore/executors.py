"""Executors: run a campaign's chunks in this process, on worker processes or on a Dask cluster.

Each takes the chunks to run, as ``(first, count)`` pairs, and a deadline, and yields each chunk's
result as it is finished (not necessarily in order). None starts a chunk after the deadline, and
the parallel ones drop the chunks still running at the deadline: the campaign driver
(`driver.Campaign`) sizes chunks so that the deadline holds within about one chunk's duration.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from ..runtime.failures import ToolError
from .campaign import CampaignSpec, ChunkResult, run_chunk
from .engine import ScenarioFn
from .scenarios import load_bundled, load_module

#: chunks to run: (first execution, number of executions)
Todo = Iterable[tuple[int, int]]

#: seconds to wait for a Dask scheduler before giving up with a one-line error
#: (ASYNCVM_DASK_CONNECT_TIMEOUT overrides it)
DASK_CONNECT_TIMEOUT = 10.0


def _connect_timeout() -> float:
    """ASYNCVM_DASK_CONNECT_TIMEOUT if it is a positive number of seconds, else the default."""
    try:
        given = float(os.environ.get("ASYNCVM_DASK_CONNECT_TIMEOUT", DASK_CONNECT_TIMEOUT))
    except ValueError:
        return DASK_CONNECT_TIMEOUT
    return given if math.isfinite(given) and given > 0 else DASK_CONNECT_TIMEOUT


def _worker_init(module: str | None) -> None:
    load_bundled()
    if module:
        load_module(module)


def _pool_worker_init(module: str | None, parent: int) -> None:
    # Ctrl-C is the campaign process's to handle: it stops the workers itself (see run_pool).
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


#: Held around the campaign's merge in the driver, which reads the report other callbacks see.
#: Executions themselves need no lock: the executor is context-local (runtime.traps), so a Dask
#: worker's threads, or an in-process cluster sharing the campaign's own process, run chunks side
#: by side.
EXECUTION_LOCK = threading.RLock()


def _run(spec_json: dict[str, Any], first: int, count: int) -> dict[str, Any]:
    spec = CampaignSpec(**spec_json)
    return run_chunk(spec, first, count).to_json()


def _left(deadline: float | None) -> float | None:
    """Seconds until the deadline (0 once it passed), or None without one."""
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


def run_here(
    spec: CampaignSpec, todo: Todo, deadline: float | None, fn: ScenarioFn | None = None
) -> Iterator[ChunkResult]:
    """Run the chunks one after another in this process (`fn` need not be registered)."""
    for first, count in todo:
        if _left(deadline) == 0:
            return
        yield run_chunk(spec, first, count, fn)


def run_pool(spec: CampaignSpec, todo: Todo, deadline: float | None, jobs: int) -> Iterator[ChunkResult]:
    """Run the chunks on `jobs` worker processes; yield each result as a worker finishes it."""
    todo = iter(todo)
    payload = spec.to_json()
    # fork: workers inherit the registered scenarios and need no __main__ guard in user scripts
    ctx = get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_worker_init, initargs=(spec.module, os.getpid()))
    running: set[Future[dict[str, Any]]] = set()
    finished = False
    try:
        while True:
            while len(running) < jobs * 2 and _left(deadline) != 0:
                nxt = next(todo, None)
                if nxt is None:
                    break
                running.add(pool.submit(_run, payload, nxt[0], nxt[1]))
            if not running:
                finished = True
                return
            done, running = wait(running, timeout=_left(deadline), return_when=FIRST_COMPLETED)
            for fut in done:
                yield ChunkResult.from_json(fut.result())
            if _left(deadline) == 0:
                return  # the chunks still running are dropped (see _abandon)
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _abandon(pool, running)


def _abandon(pool: ProcessPoolExecutor, running: set[Future[dict[str, Any]]]) -> None:
    """Stop at once (Ctrl-C, the deadline, a stopped campaign, an error): chunks in flight are thrown away.

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


def dask_slots(client: Any) -> int:
    """How many chunks the cluster runs at once (its worker threads)."""
    return max(1, sum(client.nthreads().values()))


def run_dask(spec: CampaignSpec, todo: Todo, deadline: float | None, client: Any) -> Iterator[ChunkResult]:
    """Run the chunks on a connected Dask `client`; yield each result as the cluster finishes it."""
    from distributed import as_completed

    todo = iter(todo)
    payload = spec.to_json()
    module = spec.module

    def task(first: int, count: int) -> dict[str, Any]:
        _worker_init(module)
        return _run(payload, first, count)

    outstanding: set[Any] = set()
    try:
        window = dask_slots(client) * 2
        for first, count in todo:
            outstanding.add(client.submit(task, first, count, pure=False))
            if len(outstanding) >= window:
                break
        pending = as_completed(list(outstanding), timeout=_left(deadline))
        while True:
            try:
                fut = next(pending)
            except StopIteration:
                return
            except TimeoutError:
                return  # the deadline: the chunks still running are dropped
            outstanding.discard(fut)
            result = fut.result()
            fut.release()  # the cluster need not keep a chunk once it is merged here
            yield ChunkResult.from_json(result)
            nxt = next(todo, None) if _left(deadline) != 0 else None
            if nxt is not None:
                more = client.submit(task, nxt[0], nxt[1], pure=False)
                outstanding.add(more)
                pending.add(more)
    finally:
        for other in outstanding:
            other.cancel()
