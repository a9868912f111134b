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
    """One dict per event: step, task, op, obj and the event's own fields.

    The failure event stands at the step that found it (an oracle may fire before the failing
    task's cleanup runs), and a folio's page-cache events say how many pages it spans.
    """
    out: list[dict[str, Any]] = []
    folio_pages: dict[Any, Any] = {}
    for step, tid, kind, obj, fields in trace:
        task = task_names[tid] if 0 <= tid < len(task_names) else None
        if kind == "run":
            op, name, extra = describe_request(obj)
            out.append({"step": step, "task": task, "op": op, "obj": name, **extra})
        else:
            ev: dict[str, Any] = {"step": step, "task": task, "op": kind, "obj": obj}
            for k, v in (fields or {}).items():
                # A field named like an event key (the SEAMCALL's `op`) must not replace it.
                ev[f"{kind}_{k}" if k in ev else k] = _plain(v)
            if kind == "folio_alloc":
                folio_pages[ev.get("pfn")] = ev.get("npages", 1)
            elif kind in FOLIO_OPS and "npages" not in ev:
                ev["npages"] = folio_pages.get(ev.get("pfn"), 1)
            out.append(ev)
    return _failure_at_its_step(out)


#: page-cache events, by folio (file offset `index`, `npages` pages)
FOLIO_OPS = ("folio_add", "folio_truncate")
#: events that only say the scheduler ran a task; a cause step is better shown by another event
SCHEDULING_OPS = frozenset({"point", "wait", "yield", "cond_resched", "lock_acquire", "lock_release", "draw", "spawn"})
#: the event that shows a cause step best, by the role the failure gives that step
ROLE_OPS = {
    "install": ("spte",),
    "pfn_freed": ("folio_free",),
    "invalidate_begin": ("invalidate_begin",),
    "invalidate_end": ("invalidate_end",),
}


def _failure_at_its_step(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move the failure event after the last event of its step (it is recorded when the
    execution ends, after the failing task's cleanup)."""
    at = next((i for i, e in enumerate(events) if e["op"] == "failure"), None)
    if at is None or not isinstance(events[at].get("step"), int):
        return events
    failure = events.pop(at)
    step = failure["step"]
    where = len(events)
    while where > 0 and not (isinstance(events[where - 1].get("step"), int) and events[where - 1]["step"] <= step):
        where -= 1
    events.insert(where, failure)
    return events


def cause_steps(failure: Any | None) -> list[tuple[str, int]]:
    """(role, step) for each step the failure names as a cause (``evidence["steps"]``), in step order."""
    steps = (getattr(failure, "evidence", None) or {}).get("steps") if failure is not None else None
    if not isinstance(steps, dict):
        return []
    found = [(str(r), s) for r, s in steps.items() if type(s) is int]
    return sorted(found, key=lambda rs: (rs[1], rs[0]))


def marks(events: list[dict[str, Any]], failure: Any | None) -> dict[int, list[str]]:
    """Event index -> the labels to mark it with: each cause role on the event that best shows
    its step, and "failure" on the failure's own event."""
    out: dict[int, list[str]] = {}
    for role, step in cause_steps(failure):
        at = [i for i, e in enumerate(events) if e.get("step") == step and e["op"] != "failure"]
        if not at:
            continue
        wanted = ROLE_OPS.get(role, ())
        best = [i for i in at if events[i]["op"] in wanted and events[i].get("new") != "none"]
        best = best or [i for i in at if events[i]["op"] in wanted]
        best = best or [i for i in at if events[i]["op"] not in SCHEDULING_OPS]
        i = best[-1] if best else at[0]
        out.setdefault(i, []).append(role)
    for i, e in enumerate(events):
        if e["op"] == "failure":
            out.setdefault(i, []).append("failure")
    return out


def _hex(v: Any) -> str:
    return f"{v:#x}" if type(v) is int else str(v)


def _span(unit: str, start: Any, end: Any) -> str:
    if type(start) is int and type(end) is int and end == start + 1:
        return f"{unit}={start:#x}"
    return f"{unit}=[{_hex(start)},{_hex(end)})"


#: fields shown in hex in a rendered event (frame numbers, addresses, offsets)
HEX_FIELDS = frozenset({"gfn", "pfn", "gpa", "hva", "addr", "index", "start", "end"})
#: the unit of an event's start/end range
RANGE_UNIT = {"host_zap": "hva"}
#: page-table levels: pages one entry of that level maps (4K, 2M, 1G, 512G)
LEVEL_PAGES = {1: 1, 2: 512, 3: 512 * 512, 4: 512 * 512 * 512}


def event_fields(ev: dict[str, Any]) -> list[str]:
    """An event's own fields as ``key=value`` texts: a range operation names its range
    (``gfn=[0x6,0xa)``), never just its first gfn; frame numbers and addresses in hex."""
    rest = {k: v for k, v in ev.items() if k not in ("step", "task", "op", "obj")}
    out: list[str] = []
    op = ev["op"]
    if op == "failure":
        if "message" in rest:
            out.append(f"message={rest.pop('message')}")
        steps = rest.pop("steps", None)
        if isinstance(steps, dict):
            order = sorted(steps.items(), key=lambda kv: (type(kv[1]) is not int, kv[1] if type(kv[1]) is int else 0))
            out.append("steps=" + ",".join(f"{role}@{step}" for role, step in order))
    if "start" in rest and "end" in rest:
        out.append(_span(RANGE_UNIT.get(op, "gfn"), rest.pop("start"), rest.pop("end")))
    if type(rest.get("level")) is int and type(rest.get("gfn")) is int:
        base = rest.pop("gfn")
        out.append(_span("gfn", base, base + LEVEL_PAGES.get(rest["level"], 1)))
    if op in FOLIO_OPS and type(rest.get("index")) is int:
        index = rest.pop("index")
        npages = rest.pop("npages", 1)
        out.append(_span("index", index, index + (npages if type(npages) is int else 1)))
    out += [f"{k}={_hex(v) if k in HEX_FIELDS else v}" for k, v in rest.items()]
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return getattr(v, "name", None) or str(v)
