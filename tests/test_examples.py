"""The embedding examples run unchanged on asyncio and trio (live mode), oracles included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import asyncio_vmm  # noqa: E402
import tdx_launcher  # noqa: E402
import trio_vmm  # noqa: E402

BACKENDS = ["asyncio", "trio"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_asyncio_vmm_boots_and_sees_zeros_after_the_punch(backend: str) -> None:
    before, after = anyio.run(asyncio_vmm.boot, backend=backend)
    assert before == b"hello, guest"
    assert after == bytes(12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trio_vmm_race_leaves_a_coherent_vm(backend: str) -> None:
    seq = anyio.run(trio_vmm.race, backend=backend)
    assert seq >= 1  # the punch hole's invalidation ended


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tdx_launcher_measures_the_image_it_loaded(backend: str) -> None:
    lines = anyio.run(tdx_launcher.launch, 3, 0.125, 0.25, backend=backend)
    assert lines[-1].endswith("reference measurement: True")
    assert [line.split(":")[0] for line in lines[1:4]] == ["vcpu0", "vcpu1", "vcpu2"]
    for i, line in enumerate(lines[1:4]):
        assert line.endswith(f"reads back b'vcpu{i}'")


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_prints_the_same_last_lines_on_both_backends(example: str) -> None:
    out = {}
    for backend in BACKENDS:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / example), "--backend", backend],
            capture_output=True,
            text=True,
            cwd=EXAMPLES,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[backend] = proc.stdout.splitlines()[-3:]
    assert out["asyncio"], "the example printed nothing"
    assert out["asyncio"] == out["trio"]


def test_a_default_campaign_finds_the_launchers_vmm_bug() -> None:
    import asyncvm

    report = asyncvm.explore("tdx_launcher", params={"finalize_early": 1}, runs=200)
    assert report.failures
    # FINALIZE overtook the last section's INIT_MEM_REGION: the TD was no longer being built.
    assert any("TD is not being built" in f.message for f in report.failures), [f.message for f in report.failures]


@pytest.mark.parametrize("strategy", ["pct", "random"])
def test_the_launcher_is_clean_without_its_bug(strategy: str) -> None:
    import asyncvm

    report = asyncvm.explore("tdx_launcher", strategy=strategy, runs=400, seed=1)
    assert not report.failures, [f.message for f in report.failures]


def test_the_readme_embedding_core_runs_and_measures_its_firmware(tmp_path: Path) -> None:
    import re

    from asyncvm.scenarios.tdx_launcher import Section, expected_mrtd

    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("### Embedding: an async VMM", 1)[1].split("\n### ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no Python block in the README's embedding section"
    (tmp_path / "launch.py").write_text(found.group(1))
    proc = subprocess.run([sys.executable, "launch.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split()
    assert lines[0::2] == ["asyncio", "trio"]
    firmware = bytes(range(256)) * (64 * 4096 // 256)
    assert lines[1] == lines[3] == expected_mrtd([Section("fw", 0, firmware)]).hex()
