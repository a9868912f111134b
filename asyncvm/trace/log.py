"""Event logs through structlog: JSON lines for files, aligned text for the terminal."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

from .events import event_fields, marks


def _logger(out: TextIO, renderer: Any) -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[renderer],
        context_class=dict,
        cache_logger_on_first_use=False,
    )


def write_jsonl(events: Iterable[dict[str, Any]], out: TextIO) -> None:
    """One JSON object per event (step, task, op, obj, and the event's fields)."""
    log = _logger(out, structlog.processors.JSONRenderer(sort_keys=False))
    for ev in events:
        fields = dict(ev)
        op = fields.pop("op")
        log.msg(op, **fields)


def render_jsonl(events: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    write_jsonl(events, buf)
    return buf.getvalue()


def format_event(ev: dict[str, Any], labels: Iterable[str] = ()) -> str:
    """A one-line, human-aligned rendering: step, task, op, object, fields, and the labels that
    mark the event (``<-- snapshot``: the failure names its step as a cause)."""
    tail = " ".join(event_fields(ev))
    task = ev.get("task") or "-"
    obj = ev.get("obj") or ""
    line = f"{ev.get('step', ''):>6} {task!s:<14} {ev['op']:<20} {obj!s:<28} {tail}".rstrip()
    labels = [label for label in labels if label != "failure"]
    return f"{line}  <-- {', '.join(labels)}" if labels else line


def print_events(
    events: list[dict[str, Any]], out: TextIO, failure: Any | None = None, context: int | None = None
) -> None:
    """Print the events, each cause step of `failure` marked by its role.

    With `context`, only the `context` events before the failure, the failure, and the events of
    its cause steps (``...`` where events are left out); without a failure, the last `context`.
    """
    labels = marks(events, failure)
    shown: list[int] = list(range(len(events)))
    if context is not None:
        end = next((i for i, e in enumerate(events) if e["op"] == "failure"), None)
        if end is None:
            shown = shown[max(0, len(events) - context) :]
        else:
            shown = sorted(set(range(max(0, end - context), end + 1)) | {i for i in labels if i <= end})
    last = -1
    for i in shown:
        if i != last + 1:
            out.write(f"{'...':>6}\n")
        out.write(format_event(events[i], labels.get(i, ())) + "\n")
        last = i
