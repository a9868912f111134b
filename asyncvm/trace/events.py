"""Turn an execution's raw trace tuples into plain event dicts (JSON-ready, comparable)."""

from __future__ import annotations

from typing import Any


def describe_request(req: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(operation, object, fields) for what a task was about to do when it was scheduled."""
    if req is None:
        return "yield", None, {}
    if repr(req) == "YIELDING":
        return "cond_resched", None, {}
    if type(req) is tuple:
        obj, arg = req
        fields: dict[str, Any] = {}
        if isinstance(arg, (str, int, float)):
            fields["arg"] = arg
        return "wait", getattr(obj, "name", repr(obj)), {"what": obj.describe(arg), **fields}
    return "point", getattr(req, "name", repr(req)), {}


def render(trace: list[tuple[Any, ...]], task_names: list[str]) -> list[dict[str, Any]]:
    """One dict per event: step, task, op, obj and the event's own fields."""
    out: list[dict[str, Any]] = []
    for step, tid, kind, obj, fields in trace:
        task = task_names[tid] if 0 <= tid < len(task_names) else None
        if kind == "run":
            op, name, extra = describe_request(obj)
            out.append({"step": step, "task": task, "op": op, "obj": name, **extra})
        else:
            ev: dict[str, Any] = {"step": step, "task": task, "op": kind, "obj": obj}
            for k, v in (fields or {}).items():
                ev[k] = _plain(v)
            out.append(ev)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return getattr(v, "name", None) or str(v)
