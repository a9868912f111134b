"""Chrome trace-event JSON (Perfetto, chrome://tracing): a track per task, lock holds as
durations, operations and model events as instants. One step of the schedule is one microsecond."""

from __future__ import annotations

from typing import Any


def chrome_trace(events: list[dict[str, Any]], task_names: list[str], failure: Any | None) -> dict[str, Any]:
    """Build the trace-event document for one execution."""
    tid_of = {name: i for i, name in enumerate(task_names)}
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "ts": 0, "args": {"name": "asyncvm execution"}}
    ]
    for name, tid in tid_of.items():
        out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "ts": 0, "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "ts": 0, "args": {"sort_index": tid}})
    open_holds: dict[tuple[int, str, str], int] = {}
    last_step = 0
    for ev in events:
        step = int(ev.get("step") or 0)
        last_step = max(last_step, step)
        tid = tid_of.get(ev.get("task") or "", 0)
        op = ev["op"]
        obj = str(ev.get("obj") or "")
        args = {k: v for k, v in ev.items() if k not in ("step", "task", "op", "obj")}
        if op == "lock_acquire":
            open_holds[(tid, obj, str(ev.get("mode")))] = step
        elif op == "lock_release":
            start = open_holds.pop((tid, obj, str(ev.get("mode"))), step)
            out.append(_hold(obj, ev.get("mode"), tid, start, step))
        else:
            name = f"{op} {obj}".strip()
            out.append({"name": name, "cat": op, "ph": "i", "s": "t", "pid": 1, "tid": tid, "ts": step, "args": args})
    for (tid, obj, mode), start in open_holds.items():
        out.append(_hold(obj, mode, tid, start, last_step + 1))
    if failure is not None:
        out.append(
            {
                "name": f"FAILURE: {failure.kind}",
                "cat": "failure",
                "ph": "i",
                "s": "g",
                "pid": 1,
                "tid": 0,
                "ts": failure.step,
                "args": {"message": failure.message, "signature": failure.signature},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"time_unit": "one schedule step per µs"}}


def _hold(obj: str, mode: Any, tid: int, start: int, end: int) -> dict[str, Any]:
    return {
        "name": f"{obj} ({mode})" if mode not in (None, "None") else obj,
        "cat": "lock",
        "ph": "X",
        "pid": 1,
        "tid": tid,
        "ts": start,
        "dur": max(1, end - start),
    }
