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
    assert not (tmp_path / ".hypothesis").exists()  # nothing left in the user's folder


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
    """Under the design profile that lets a TD pre-fault before FINALIZE, a fuzzed sequence that
    pre-faults a TD being built makes the TDX oracle fire; the profile declares that outcome, so
    the soak lists it as known rather than as a finding."""
    stats = soak.run_fuzz(3000, 5, profiles=("prefault-before-finalize",))
    assert stats.known and all("tdx_premapped" in f.message for f in stats.known), [f.line() for f in stats.known]
    assert not stats.oracle and not soak.SoakReport(stats, soak.ReplayStats()).failed


def test_a_session_ends_at_an_oracle_failure() -> None:
    """The session is one controlled execution with the oracles attached: re-populating a TD page
    with the populate -EEXIST check removed (a named bug) ends it with the double-add finding."""
    s = soak.Session(1, "6.18", {"signal": 0.0}, bugs=("populate_skips_uptodate_check",))
    kvm, page = s.kvm, uapi.PAGE_SIZE

    async def mmap() -> int:
        return int(kvm.mm.mmap(8 * page))

    vm = s.call(lambda: kvm.create_vm(uapi.KVM_X86_TDX_VM)).value
    hva = s.call(mmap).value
    gmem = s.call(lambda: vm.create_guest_memfd(size=8 * page)).value
    s.call(lambda: vm.tdx_init_vm())
    region = uapi.UserspaceMemoryRegion2(1, uapi.KVM_MEM_GUEST_MEMFD, 0, 8 * page, hva, 0, gmem)
    s.call(lambda: vm.set_user_memory_region2(region))
    s.call(lambda: vm.set_memory_attributes(uapi.MemoryAttributes(0, 8 * page, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)))
    vcpu = s.call(lambda: vm.create_vcpu(0)).value
    s.call(lambda: vcpu.tdx_init_vcpu())
    assert s.call(lambda: vcpu.tdx_init_mem_region(uapi.TdxInitMemRegion(hva, 0, 2))).exc is None
    out = s.call(lambda: vcpu.tdx_init_mem_region(uapi.TdxInitMemRegion(hva, 0, 2)))
    assert out.ended is not None and out.ended.failure is not None
    assert out.ended.failure.kind == "tdx_double_add" and not s.alive
    assert soak._known_behaviour("6.18", out.ended.failure) is None
    s.finish()


def test_a_profiles_known_kernel_behaviour_is_not_a_finding() -> None:
    """6.10 re-populating a TD page PAGE.ADDs it twice (no populate -EEXIST before 6.11): the bundled
    TDX overlap scenario declares it; the soak (which found it) reports it as known, on 6.10 only."""
    from asyncvm.runtime.failures import Failure

    double_add = Failure("tdx_double_add", "tdx_double_add", "TDH.MEM.PAGE.ADD of gfn 0x2 ...", 1, "main", {})
    known = soak._known_behaviour("6.10", double_add)
    assert known is not None and "6.11" in known
    assert soak._known_behaviour("6.18", double_add) is None
    stats = soak.SoakStats(known=[soak.Finding("known tdx_double_add", "vcpu.tdx_init_mem_region", "x", known)])
    assert not soak.SoakReport(stats, soak.ReplayStats()).failed


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
