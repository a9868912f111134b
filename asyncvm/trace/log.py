"""Event logs through structlog: JSON lines for files, aligned text for the terminal."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, TextIO

import structlog


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


def format_event(ev: dict[str, Any]) -> str:
    """A one-line, human-aligned rendering: step, task, op, object, fields."""
    rest = {k: v for k, v in ev.items() if k not in ("step", "task", "op", "obj")}
    tail = " ".join(f"{k}={v}" for k, v in rest.items())
    task = ev.get("task") or "-"
    obj = ev.get("obj") or ""
    return f"{ev.get('step', ''):>6} {task!s:<14} {ev['op']:<20} {obj!s:<28} {tail}".rstrip()


def print_events(events: Iterable[dict[str, Any]], out: TextIO) -> None:
    for ev in events:
        out.write(format_event(ev) + "\n")
