"""The trace JSON against the Chrome trace-event format, and the HTML timeline in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from numbers import Real
from pathlib import Path
from typing import Any

import pytest

from .conftest import Campaign

#: every phase the trace-event format defines
PHASES = set("BEXiICbneSTpFstfPNODMVvRc") | {"(", ")"}
METADATA = {"process_name", "process_labels", "process_sort_index", "thread_name", "thread_sort_index"}


def check_chrome_trace(doc: Any, tasks: list[str], failing_step: int | None) -> None:
    """Assert `doc` is a valid trace-event document with a track per task."""
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list) and doc["traceEvents"]
    if "displayTimeUnit" in doc:
        assert doc["displayTimeUnit"] in ("ms", "ns")
    thread_names: dict[int, str] = {}
    for ev in doc["traceEvents"]:
        assert isinstance(ev, dict), ev
        for key in ("name", "ph", "pid", "tid", "ts"):
            assert key in ev, (key, ev)
        assert isinstance(ev["name"], str) and ev["ph"] in PHASES, ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
        assert isinstance(ev["ts"], Real) and not isinstance(ev["ts"], bool) and ev["ts"] >= 0, ev
        if "args" in ev:
            assert isinstance(ev["args"], dict), ev
        if ev["ph"] == "X":
            assert isinstance(ev.get("dur"), Real) and not isinstance(ev["dur"], bool) and ev["dur"] >= 0, ev
        if ev["ph"] == "M":
            assert ev["name"] in METADATA, ev
            if ev["name"] == "thread_name":
                assert isinstance(ev["args"]["name"], str)
                thread_names[ev["tid"]] = ev["args"]["name"]
        if ev["ph"] in ("i", "I") and "s" in ev:
            assert ev["s"] in ("g", "p", "t"), ev
    assert sorted(thread_names.values()) == sorted(tasks)
    tids = set(thread_names)
    assert all(ev["tid"] in tids for ev in doc["traceEvents"] if ev["ph"] != "M")
    if failing_step is not None:
        failures = [ev for ev in doc["traceEvents"] if ev.get("cat") == "failure"]
        assert failures and all(ev["ts"] == failing_step for ev in failures), failures
        assert any(ev["ph"] == "i" and ev.get("s") == "g" for ev in failures), "no global failure marker"
    json.dumps(doc, allow_nan=False)


def test_trace_json_is_chrome_trace_event_format(campaign: Campaign) -> None:
    for failure in campaign.failures:
        d = campaign.dir(failure)
        # The trace and the timeline picture the shrunk schedule (the smallest one that fails).
        shrunk = campaign.schedule(failure, "schedule.shrunk.json")
        doc = json.loads((d / "trace.json").read_text())
        check_chrome_trace(doc, shrunk["tasks"], shrunk["failure"]["step"])
        assert any(ev["ph"] == "X" and ev.get("cat") == "lock" for ev in doc["traceEvents"])


# -- the timeline page in headless Chromium -------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.path.exists("/usr/bin/chromium"):
        found = "/usr/bin/chromium"
    if found is None:
        if os.environ.get("ASYNCVM_REQUIRE_CHROMIUM"):
            pytest.fail("ASYNCVM_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium is not installed (set ASYNCVM_REQUIRE_CHROMIUM to make this a failure)")
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(profile))
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


class _FindById(HTMLParser):
    """Collects the text inside the element with a given id."""

    def __init__(self, wanted: str) -> None:
        super().__init__()
        self.wanted = wanted
        self.depth = 0
        self.found = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("id") == self.wanted:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text.append(data)


def test_timeline_renders_in_headless_chromium(campaign: Campaign, tmp_path: Path) -> None:
    binary = chromium()
    failure = campaign.failures[0]
    page = campaign.dir(failure) / "timeline.html"
    step = campaign.schedule(failure, "schedule.shrunk.json")["failure"]["step"]
    url = page.resolve().as_uri()

    png = tmp_path / "timeline.png"
    shot = run_chromium(binary, tmp_path / "profile1", f"--screenshot={png}", url)
    assert png.is_file(), f"no screenshot (exit {shot.returncode})\n{shot.stderr[-2000:]}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    dom = run_chromium(binary, tmp_path / "profile2", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    finder = _FindById("failing-step")
    finder.feed(dom.stdout)
    assert finder.found, "no element with id=failing-step in the rendered page"
    text = " ".join("".join(finder.text).split())
    assert f"failing step {step}" in text, text
    assert failure["kind"] in text
    assert f"failing step {step}" in " ".join(dom.stdout.split())
    # Swimlanes: one per task, named in the rendered SVG.
    for task in campaign.schedule(failure, "schedule.shrunk.json")["tasks"]:
        assert f">{task}</text>" in dom.stdout


# -- the event log --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        ({"op": "invalidate_range_add", "start": 6, "end": 10}, "gfn=[0x6,0xa)"),
        ({"op": "set_memory_attributes", "start": 0, "end": 16, "attributes": 8}, "gfn=[0x0,0x10) attributes=8"),
        ({"op": "spte", "root": "root1", "level": 2, "gfn": 0x200, "old": "none", "new": "TABLE"}, "gfn=[0x200,0x400)"),
        ({"op": "spte", "root": "root1", "level": 1, "gfn": 6, "old": "none", "new": "none"}, "gfn=0x6 root=root1"),
        ({"op": "folio_truncate", "index": 6, "pfn": 0x100000, "npages": 512}, "index=[0x6,0x206) pfn=0x100000"),
        ({"op": "folio_add", "index": 6, "pfn": 0x100000}, "index=0x6 pfn=0x100000"),
        ({"op": "host_zap", "start": 0x7000, "end": 0x9000, "pages_freed": 2}, "hva=[0x7000,0x9000) pages_freed=2"),
        ({"op": "sept_remove", "gfn": 3, "pfn": 0x100003}, "gfn=0x3 pfn=0x100003"),
    ],
)
def test_range_operations_log_their_range(event: dict[str, Any], shown: str) -> None:
    from asyncvm.trace.log import format_event

    assert shown in format_event({"step": 1, "task": "t", "obj": "vm0", **event})


def _ops(scenario: str, executions: int = 40) -> tuple[set[str], list[str]]:
    """The event kinds a few random executions of `scenario` record, and their rendered lines."""
    from asyncvm.explore.engine import Program, scenario_params
    from asyncvm.explore.scenarios import get_scenario
    from asyncvm.runtime.strategies import make_strategy
    from asyncvm.trace.log import format_event

    fn = get_scenario(scenario).fn
    program = Program(fn, scenario_params(fn, {}))
    ops: set[str] = set()
    lines: list[str] = []
    for i in range(executions):
        strategy = make_strategy("random", 0)
        strategy.new_execution(i)
        events = program.run(strategy, record=True).events()
        ops |= {e["op"] for e in events}
        lines += [format_event(e) for e in events]
    return ops, lines


def test_the_event_log_has_spte_sept_rmp_and_page_cache_events() -> None:
    """SPTE changes, the TDX module's SEAMCALLs and S-EPT removals, SNP RMPUPDATEs, and folios
    entering and leaving the guest_memfd page cache are all in the log, under their own names."""
    tdx, tdx_lines = _ops("tdx_post_finalize_faults_vs_punch_hole")
    assert {"spte", "seamcall", "sept_remove", "folio_add", "folio_truncate", "invalidate_range_add"} <= tdx, tdx
    assert not any(op.startswith("TDH") for op in tdx), "a SEAMCALL's name replaced the event kind"
    assert any(" seamcall " in line and "seamcall_op=TDH.MEM.PAGE.AUG" in line for line in tdx_lines)
    snp, _ = _ops("snp_launch_update_vs_punch_hole", 10)
    assert {"rmpupdate", "folio_add", "folio_truncate", "spte"} <= snp, snp
