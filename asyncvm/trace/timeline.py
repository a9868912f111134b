"""A self-contained HTML timeline of one execution: swimlanes per task, lock holds as bars, the
accesses that conflict with the failing one marked, the failing step highlighted and each step the
failure names as a cause (snapshot, invalidate_begin, pfn_freed, install, ...) marked with its role.
No network: everything (SVG, CSS) is inline."""

from __future__ import annotations

import html
from typing import Any

from .events import cause_steps, event_fields, marks
from .log import format_event

LANE = 34
STEP_W = 10
LEFT = 150
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac"]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _conflicts(events: list[dict[str, Any]], failure: Any | None) -> set[int]:
    """Indices of events touching what the failure is about (its gfn or pfn, or its object)."""
    if failure is None:
        return set()
    ev = failure.evidence or {}
    keys = {(k, ev[k]) for k in ("gfn", "pfn", "gpa") if k in ev}
    lock = ev.get("lock")
    out = set()
    for i, e in enumerate(events):
        if any(e.get(k) == v for k, v in keys) or (lock and e.get("obj") == lock):
            out.add(i)
    return out


def timeline_html(
    events: list[dict[str, Any]],
    task_names: list[str],
    failure: Any | None,
    title: str,
) -> str:
    """Render the page."""
    steps = max((int(e.get("step") or 0) for e in events), default=0) + 2
    width = LEFT + steps * STEP_W + 130  # room for the "failing step N" label past the last step
    causes = cause_steps(failure)
    labels = marks(events, failure)
    lanes_end = LANE * (len(task_names) + 1) + 40
    height = lanes_end + 16 * len(causes)
    lane = {name: i for i, name in enumerate(task_names)}
    colors: dict[str, str] = {}
    conflicts = _conflicts(events, failure)
    svg: list[str] = []
    for name, i in lane.items():
        y = 20 + i * LANE
        svg.append(f'<rect x="0" y="{y}" width="{width}" height="{LANE - 2}" class="lane{i % 2}"/>')
        svg.append(f'<text x="8" y="{y + LANE // 2 + 4}" class="task">{_esc(name)}</text>')
    for s in range(0, steps, 10):
        x = LEFT + s * STEP_W
        svg.append(f'<line x1="{x}" y1="14" x2="{x}" y2="{height - 16}" class="grid"/>')
        svg.append(f'<text x="{x + 2}" y="12" class="tick">{s}</text>')
    holds: dict[tuple[str, str, str], int] = {}

    def bar(task: str, obj: str, mode: str, start: int, end: int) -> None:
        color = colors.setdefault(obj, PALETTE[len(colors) % len(PALETTE)])
        y = 20 + lane.get(task, 0) * LANE + 4
        x = LEFT + start * STEP_W
        w = max(STEP_W, (end - start) * STEP_W)
        label = f"{obj} ({mode}) held steps {start}-{end}"
        svg.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="10" rx="2" fill="{color}" class="hold">'
            f"<title>{_esc(label)}</title></rect>"
        )

    for i, e in enumerate(events):
        step = int(e.get("step") or 0)
        task = e.get("task") or (task_names[0] if task_names else "")
        op, obj = e["op"], str(e.get("obj") or "")
        if op == "lock_acquire":
            holds[(task, obj, str(e.get("mode")))] = step
            continue
        if op == "lock_release":
            bar(task, obj, str(e.get("mode")), holds.pop((task, obj, str(e.get("mode"))), step), step)
            continue
        if op in ("yield", "cond_resched"):
            continue
        x = LEFT + step * STEP_W + STEP_W // 2
        y = 20 + lane.get(task, 0) * LANE + 22
        cls = "conflict" if i in conflicts else ("wait" if op == "wait" else "op")
        roles = labels.get(i, ())
        if roles:
            cls = "cause-ev"
        svg.append(
            f'<circle cx="{x}" cy="{y}" r="{5 if roles else 3.5}" class="{cls}">'
            f"<title>{_esc(format_event(e, roles))}</title></circle>"
        )
    for (task, obj, mode), start in holds.items():
        bar(task, obj, mode, start, steps)
    for k, (role, step) in enumerate(causes):
        x = LEFT + step * STEP_W + STEP_W // 2
        y = lanes_end + 12 + 16 * k
        svg.append(f'<line x1="{x}" y1="14" x2="{x}" y2="{y}" class="cause"/>')
        svg.append(
            f'<text x="{x + 4}" y="{y}" class="cause-label" data-role="{_esc(role)}" data-step="{step}">'
            f"{_esc(role)} (step {step})</text>"
        )
    if failure is not None:
        x = LEFT + failure.step * STEP_W + STEP_W // 2
        svg.append(f'<line x1="{x}" y1="14" x2="{x}" y2="{lanes_end - 10}" class="failing"/>')
        svg.append(f'<text x="{x + 4}" y="{lanes_end - 12}" class="failing-label">failing step {failure.step}</text>')
    legend = "".join(f'<span class="swatch" style="background:{c}"></span>{_esc(obj)} ' for obj, c in colors.items())
    rows = []
    for i, e in enumerate(events):
        step = int(e.get("step") or 0)
        is_fail = failure is not None and step == failure.step and e["op"] == "failure"
        roles = [r for r in labels.get(i, ()) if r != "failure"]
        cls = "fail-row" if is_fail else ("cause-row" if roles else ("conflict-row" if i in conflicts else ""))
        rows.append(
            f'<tr class="{cls}"><td>{step}</td><td>{_esc(e.get("task") or "")}</td><td>{_esc(e["op"])}</td>'
            f"<td>{_esc(e.get('obj') or '')}</td><td>{_esc(' '.join(event_fields(e)))}</td>"
            f'<td class="role">{_esc(", ".join(roles))}</td></tr>'
        )
    cause_list = "".join(
        f'<li class="cause-item" data-role="{_esc(role)}" data-step="{step}"><b>{_esc(role)}</b>: step {step}</li>'
        for role, step in causes
    )
    verdict = (
        f'<div id="failing-step" class="verdict" data-step="{failure.step}">FAILURE at failing step '
        f"{failure.step} in task {_esc(failure.task or '-')}: {_esc(failure.kind)} &mdash; "
        f"{_esc(failure.message)}</div>"
        if failure is not None
        else '<div class="verdict ok">no failure</div>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 18px; }}
.verdict {{ background: #fde2e2; border-left: 4px solid #d62728; padding: 8px; margin: 8px 0; }}
.verdict.ok {{ background: #e2f5e2; border-color: #2ca02c; }}
.scroll {{ overflow-x: auto; border: 1px solid #ddd; }}
.lane0 {{ fill: #fafafa; }} .lane1 {{ fill: #f0f0f0; }}
.task {{ font: 12px monospace; fill: #333; }} .tick {{ font: 9px monospace; fill: #999; }}
.grid {{ stroke: #e4e4e4; }} .op {{ fill: #555; }} .wait {{ fill: #aaa; }}
.conflict {{ fill: #d62728; stroke: #000; stroke-width: 1; }}
.failing {{ stroke: #d62728; stroke-width: 2; stroke-dasharray: 4 2; }}
.failing-label {{ font: bold 12px sans-serif; fill: #d62728; }}
.hold {{ opacity: 0.8; }} .swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; }}
table {{ border-collapse: collapse; font: 12px monospace; margin-top: 12px; }}
td {{ border-bottom: 1px solid #eee; padding: 2px 8px; vertical-align: top; }}
.fail-row {{ background: #fbb; font-weight: bold; }} .conflict-row {{ background: #fee; }}
.cause {{ stroke: #7b2cbf; stroke-width: 1.5; stroke-dasharray: 2 2; }}
.cause-label {{ font: bold 11px sans-serif; fill: #7b2cbf; }}
.cause-ev {{ fill: #7b2cbf; stroke: #000; stroke-width: 1; }}
.cause-row {{ background: #efe3fb; font-weight: bold; }} .role {{ color: #7b2cbf; }}
</style></head><body>
<h1>{_esc(title)}</h1>
{verdict}
{f'<div id="causes">the steps that make it a race: <ul>{cause_list}</ul></div>' if causes else ""}
<div>lock holds: {legend}</div>
<div class="scroll"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(svg)}</svg></div>
<table><tr><th>step</th><th>task</th><th>op</th><th>object</th><th>fields</th><th>cause</th></tr>{"".join(rows)}</table>
</body></html>
"""
