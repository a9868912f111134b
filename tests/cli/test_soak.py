"""``asyncvm soak`` (issue 16): the uAPI fuzzing and the replay audit pass on the model as it is,
and each kind of finding they exist for is counted and makes the command exit non-zero."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import asyncvm
from asyncvm import uapi
from asyncvm.cli import app
from asyncvm.explore import soak
from asyncvm.explore.engine import Program
from asyncvm.kvm import guest_memfd, vm

from .conftest import explain, run_cli


def test_a_tiny_soak_passes(tmp_path: Path) -> None:
    proc = run_cli("soak", "--calls", "150", "--replays", "4", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout
    assert "internal exceptions: 0" in out and "divergences: 0" in out, explain(proc)
    assert "unlisted errnos: 0" in out and "oracle failures: 0" in out, explain(proc)
    made = int(out.split("calls made: ")[1].split()[0])
    assert made >= 150
    assert "replays: 4 in this process, 4 in a fresh process" in out
    assert "vm.set_user_memory_region2" in out  # the per-call tally


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    for args in (["--calls", "-1"], ["--profile", "9.99"]):
        proc = run_cli("soak", *args, cwd=tmp_path)
        assert proc.returncode == 2, explain(proc)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, explain(proc)


def _soak(*args: str) -> Any:
    return CliRunner().invoke(app, ["soak", "--replays", "0", "--profile", "6.18", *args])


def test_an_injected_model_exception_is_counted_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: vm.Vm, attrs: uapi.MemoryAttributes) -> None:
        raise KeyError("injected")  # what a model bug looks like from outside

    monkeypatch.setattr(vm.Vm, "set_memory_attributes", broken)
    result = _soak("--calls", "400", "--seed", "1")
    assert result.exit_code == 1, result.output
    count = int(result.output.split("internal exceptions: ")[1].split()[0])
    assert count > 0, result.output
    assert "KeyError: vm.set_memory_attributes: 'injected'" in result.output
    assert "calls of the first finding's example:" in result.output


def test_an_exception_in_a_task_the_model_spawned_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release of a closed guest_memfd runs after the call returned (task work): an exception
    there ends the execution, and the soak reports it as an internal exception too."""

    async def broken_release(file: guest_memfd.GuestMemfd) -> None:
        raise RuntimeError("injected in kvm_gmem_release")

    monkeypatch.setattr(guest_memfd, "kvm_gmem_release", broken_release)
    stats = soak.run_fuzz(300, 2, profiles=("6.18",))
    assert any("injected in kvm_gmem_release" in f.message for f in stats.internal), [f.line() for f in stats.oracle]


def test_the_oracles_watch_the_fuzzed_calls() -> None:
    """Under the design profile that lets a TD pre-fault before FINALIZE (a proposal the TDX oracle
    exists to reject), a fuzzed sequence that pre-faults a TD being built makes it fire."""
    stats = soak.run_fuzz(3000, 5, profiles=("prefault-before-finalize",))
    oracles = [f for f in stats.oracle if f.kind.startswith("oracle")]
    assert oracles and all("tdx_premapped" in f.message for f in oracles), [f.line() for f in stats.oracle]
    assert soak.SoakReport(stats, soak.ReplayStats()).failed


def test_an_errno_the_spec_does_not_list_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(soak.ALLOWED, "kvm.create_vm", frozenset())
    stats = soak.run_fuzz(200, 4, profiles=("6.18",))
    assert stats.unlisted and all(f.call == "kvm.create_vm" for f in stats.unlisted)
    assert soak.SoakReport(stats, soak.ReplayStats()).failed


def test_a_wrong_python_type_that_is_accepted_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uapi, "check_struct", lambda value, cls, call: value)
    stats = soak.run_fuzz(600, 5, profiles=("6.18",))
    assert any(f.kind in ("no TypeError", "AttributeError", "TypeError") for f in stats.internal), stats.outcomes


_counter = itertools.count()


@asyncvm.scenario(name="soak_test_nondeterministic")
async def _nondeterministic(kvm: asyncvm.Kvm) -> None:
    """How many tasks it spawns depends on how often it ran before: no schedule can replay it."""
    vm = await kvm.create_vm()
    async with asyncvm.TaskGroup() as tg:
        for i in range(2 if next(_counter) % 3 == 0 else 1):
            tg.spawn(vm.create_vcpu, i, name=f"create_vcpu{i}")


def test_the_replay_audit_counts_a_divergence() -> None:
    stats = soak.audit_replays(2, 0, subprocess_check=False, programs=[Program(_nondeterministic)])
    assert stats.replays == 2
    assert len(stats.divergences) == 2, stats.divergences


def test_the_replay_audit_of_bundled_scenarios_is_clean_in_a_fresh_process() -> None:
    stats = soak.audit_replays(3, 11)
    assert (stats.replays, stats.subprocess_replays, stats.divergences) == (3, 3, [])
