"""`asyncvm fuzz`: generated programs replay and shrink like scenarios, written files re-run, the
fuzzer finds a named bug on its own, and the correct model stays clean under it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import asyncvm
from asyncvm.explore.engine import Program
from asyncvm.explore.scenarios import get_scenario
from asyncvm.fuzz import fuzz, generate
from asyncvm.fuzz.describe import VM_TYPES
from asyncvm.fuzz.hunt import hunt_bug
from asyncvm.fuzz.write import program_of, strip_program, write_program
from asyncvm.runtime.strategies import RandomStrategy

from ..cli.conftest import cli_env, explain, run_cli

BUG = "drop_invalidate_retry"
#: a fixed seed and bound within which fuzz (SW-protected VMs) finds BUG without its scenario
BUG_RUNS = 3000


def _events(result: asyncvm.runtime.ExecutionResult) -> list[str]:
    """The event log as text (events name the objects of their own execution)."""
    return [re.sub(r" at 0x[0-9a-f]+", "", repr(e)) for e in result.trace or []]


@pytest.fixture(scope="module")
def buggy() -> asyncvm.FoundFailure:
    report = asyncvm.explore(
        fuzz, params={"vm_type": "sw"}, bugs=[BUG], runs=BUG_RUNS, seed=0, stop_on_first_failure=True
    )
    assert report.failures, f"fuzz did not find {BUG} in {BUG_RUNS} programs"
    return report.failures[0]


@pytest.mark.parametrize("vm_type", list(VM_TYPES))
def test_a_generated_program_replays_identically(vm_type: str) -> None:
    program = Program(fuzz, {"vm_type": vm_type})
    for index in range(5):
        strategy = RandomStrategy(11)
        strategy.new_execution(index)
        first = program.run(strategy, record=True)
        again = program.rerun(first.choices, record=True)
        assert again.choices == first.choices
        assert _events(again) == _events(first)
        assert again.failure == first.failure


def test_the_program_is_read_back_from_its_stream(buggy: asyncvm.FoundFailure) -> None:
    program = program_of(buggy.schedule)
    draws = iter(c[0] for c in buggy.schedule.choices if isinstance(c, tuple))
    drawn = generate(lambda kind, n, p: next(draws), vm_type="sw")
    assert program.source() == drawn.source()
    assert len(strip_program(buggy.schedule, program)) == len(buggy.schedule.choices) - program.draws


def test_zero_draws_make_the_smallest_program() -> None:
    """Shrinking pushes draws to 0: the all-zero program has two actors of one call at most."""
    program = generate(lambda kind, n, p: 0)
    assert len(program.actors) == 2 and program.calls == 0


def test_a_failing_program_replays_and_shrinks(buggy: asyncvm.FoundFailure) -> None:
    again = asyncvm.replay(buggy.schedule, "fuzz")
    assert again.failure is not None and again.failure.signature == buggy.signature
    shrunk = asyncvm.shrink(buggy.schedule, "fuzz", max_attempts=300)
    assert shrunk.failure is not None and shrunk.failure.signature == buggy.signature
    assert program_of(shrunk).calls <= program_of(buggy.schedule).calls


def test_a_written_program_reruns_and_fails_the_same_way(buggy: asyncvm.FoundFailure, tmp_path: Path) -> None:
    path, schedule = write_program(buggy.schedule, tmp_path)
    assert schedule is not None
    text = path.read_text()
    assert "asyncvm.fuzz" not in text.replace("`asyncvm fuzz`", "")  # public API only
    name = path.stem
    result = asyncvm.replay(schedule, get_scenario(name).fn)
    assert result.failure is not None and result.failure.signature == buggy.signature
    # and from the command line, in a fresh process: replay its schedule, hunt it with stress
    proc = run_cli("replay", schedule, "--module", path, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 1 and f"REPRODUCED {buggy.kind}" in proc.stdout, explain(proc)
    proc = run_cli(
        "stress",
        path,
        "--runs",
        "400",
        "--seed",
        "1",
        "--jobs",
        "1",
        "--no-shrink",
        "-q",
        "--bug",
        BUG,
        "--out",
        tmp_path / "logs",
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 1 and buggy.signature in proc.stdout, explain(proc)


def test_fuzz_finds_a_named_bug_without_its_scenario(buggy: asyncvm.FoundFailure) -> None:
    # The same programs and schedules without the bug do not fail that way.
    program = Program(fuzz, {"vm_type": "sw"})
    clean = program.rerun(buggy.schedule.choices, strict=False)
    assert clean.failure is None or clean.failure.signature != buggy.signature
    assert buggy.first_run < BUG_RUNS


def test_a_hunt_stops_at_the_bugs_first_own_failure() -> None:
    # The budget only bounds a hunt that finds nothing: this one stops within its first chunk.
    row = hunt_bug(BUG, budget=60.0)
    assert row["found"] and row["signature"].startswith("stale_install"), row
    assert 1 <= row["runs_to_first"] <= row["runs"] < BUG_RUNS, row
    assert 0 < row["seconds_to_first"] <= row["seconds"] + 0.06 and row["seconds"] < 30, row


@pytest.mark.parametrize("vm_type", ["sw", "snp"])
def test_the_correct_model_is_clean_under_fuzz(vm_type: str) -> None:
    report = asyncvm.explore(fuzz, params={"vm_type": vm_type}, runs=400, seed=3, strategy="pct")
    assert report.runs == 400
    assert not report.failures, [str(f) for f in report.failures]


def test_a_host_invalidation_leaves_private_mappings_alone() -> None:
    """Found by fuzz: madvise(DONTNEED) of a TD's shared backing while close(guest_memfd) has
    cleared the slot's file and not yet zapped. The mmu_notifier zaps shared mappings only
    (KVM_FILTER_SHARED), so the private ones are not stale because of it."""
    report = asyncvm.explore(_close_vs_madvise, strategy="random", runs=300, seed=0)
    assert report.runs == 300 and not report.failures, [str(f) for f in report.failures]


async def _private_td(kvm: asyncvm.Kvm, pages: int) -> tuple[Any, Any, int, Any, int]:
    """The fuzz programs' TDX set-up: a TD whose slot 0 is `pages` PRIVATE guest_memfd pages (with
    a shared backing), an initialized vCPU 0 and a source image; (vm, guest_memfd, backing hva,
    vCPU, image)."""
    from asyncvm.fuzz import prelude as p

    vm = await kvm.create_vm(asyncvm.uapi.KVM_X86_TDX_VM)
    await vm.tdx_init_vm()
    g0 = await vm.create_guest_memfd(size=pages * p.PAGE)
    h0 = await kvm.mm.mmap(pages * p.PAGE)
    await p.set_slot(vm, 0, 0, pages, h0, g0)
    await p.set_attributes(vm, 0, pages, private=True)
    v0 = await vm.create_vcpu(0)
    src = await p.image(kvm, pages)
    await p.init_vcpu(v0)
    return vm, g0, h0, v0, src


async def _close_vs_madvise(kvm: asyncvm.Kvm) -> None:
    from asyncvm.fuzz import prelude as p

    vm, g0, h0, v0, src = await _private_td(kvm, 4)
    await p.init_mem_region(v0, src, 0, 4)
    await p.finalize(vm)
    async with asyncvm.TaskGroup() as tg:
        tg.spawn(p.close, g0, name="close")
        tg.spawn(p.madvise_dontneed, kvm, h0, 3, 1, name="madvise")


def test_the_fuzz_command_writes_programs_and_keeps_a_corpus(tmp_path: Path) -> None:
    args = ("fuzz", "--vm-type", "sw", "--bug", BUG, "--programs", "60", "--jobs", "1", "-q", "--out", "logs")
    proc = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 1, explain(proc)
    programs = sorted((tmp_path / "logs" / "fuzz").glob("*/*/fuzz_*.py"))
    assert programs, explain(proc)
    assert f"asyncvm stress {programs[0].relative_to(tmp_path)}" in proc.stdout, explain(proc)
    corpus = tmp_path / "logs" / "fuzz" / "corpus"
    assert sorted(p.name for p in corpus.glob("fuzz_*.py")) == sorted({p.name for p in programs})
    # The next campaign replays the corpus first: the bug is still in, so its programs still fail.
    proc = run_cli(*args, cwd=tmp_path, env=cli_env())
    assert f"{len(programs)} programs still fail, 0 no longer do" in proc.stdout, explain(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--vm-type", "sev"), "unknown VM type 'sev'"),
        (("--programs", "0"), "--programs must be positive"),
        (("--bug", "no_such_bug"), "unknown bug 'no_such_bug'"),
    ],
)
def test_bad_fuzz_input_is_one_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    proc = run_cli("fuzz", *args, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, explain(proc)


def test_a_written_program_keeps_the_fuzz_data_odds(tmp_path: Path) -> None:
    """The fuzz scenario draws RMPUPDATE failures; the written file must make the same draws."""
    from asyncvm.explore.schedule import Schedule

    program = Program(fuzz, {"vm_type": "snp"})
    for index in range(200):
        strategy = RandomStrategy(5)
        strategy.new_execution(index)
        result = program.run(strategy, record=True)
        if any(e[2] == "draw" and e[3] == "rmpupdate_error" for e in result.trace or []):
            break
    else:
        pytest.fail("no SNP program drew an RMPUPDATE failure")
    schedule = Schedule.from_execution(program, result, strategy={"name": "random"}, seed=5, execution=index)
    path, written = write_program(schedule, tmp_path)
    assert written is not None and "rmpupdate_error" in path.read_text()


def test_munmaps_of_parts_of_one_file_mapping_detach_it_once() -> None:
    """Found by fuzz (gmem kind): munmaps of the parts of one guest_memfd mapping each took the
    VMA as theirs to free once mmap_lock was dropped (ValueError in the model, PCT run 10 of this
    campaign). Which munmap detaches the VMA is decided under mmap_lock (mm/vma.c)."""
    report = asyncvm.explore(_munmaps_of_parts, strategy="pct", runs=500, seed=0)
    assert report.runs == 500 and not report.failures, [str(f) for f in report.failures]


async def _munmaps_of_parts(kvm: asyncvm.Kvm) -> None:
    from asyncvm.fuzz import prelude as p

    vm = await kvm.create_vm(asyncvm.uapi.KVM_X86_DEFAULT_VM)
    g0 = await vm.create_guest_memfd(size=8 * p.PAGE, flags=p.MMAP_SHARED)
    h0 = await kvm.mm.mmap(8 * p.PAGE, fd=g0, shared=True)
    await p.set_slot(vm, 0, 0, 8, h0, g0)

    async def low() -> None:
        await p.munmap(kvm, h0, 0, 3)
        await p.munmap(kvm, h0, 3, 1)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(p.munmap, kvm, h0, 4, 4, name="munmap_high")
        tg.spawn(low, name="munmap_low")
        tg.spawn(p.call, p.host_read(kvm, h0, 4, 1), name="host_read")


def test_a_private_install_during_a_host_invalidation_is_not_stale() -> None:
    """Found by fuzz (TDX, 7.0 profile): KVM_TDX_INIT_MEM_REGION maps the private page (6.19:
    kvm_tdp_mmu_map_private_pfn(), no sequence check) while MADV_DONTNEED of the slot's shared
    backing is invalidating the same gfn; that invalidation is of shared mappings only."""
    report = asyncvm.explore(_populate_vs_madvise, strategy="pct", runs=1500, seed=0, profile="7.0")
    assert report.runs == 1500 and not report.failures, [str(f) for f in report.failures]


async def _populate_vs_madvise(kvm: asyncvm.Kvm) -> None:
    from asyncvm.fuzz import prelude as p

    _vm, g0, h0, v0, src = await _private_td(kvm, 2)
    async with asyncvm.TaskGroup() as tg:
        tg.spawn(p.call, p.init_mem_region(v0, src, 0, 1), name="init_mem_region")
        tg.spawn(p.call, p.madvise_dontneed(kvm, h0, 0, 1), name="madvise")
        tg.spawn(p.call, p.allocate(g0, 0, 2), name="allocate")
