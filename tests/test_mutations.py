"""Hunting power as a regression test: kernel-style bugs re-injected into the model (a mutation
test) must each be found by a short PCT campaign of a bundled scenario, by the oracle that names it.

Each mutation edits the source of one model function (`mutate`); if the model is refactored so an
edit no longer applies, the test fails saying so instead of silently testing the correct model.
"""

from __future__ import annotations
import __future__

import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

import asyncvm
from asyncvm.kvm import attributes, guest_memfd, invalidate, vcpu
from asyncvm.kvm.vm import Vm
from asyncvm.x86.mmu import fault
from asyncvm.x86.tdx import tdx


def mutate(
    monkeypatch: pytest.MonkeyPatch, func: Callable[..., Any], old: str, new: str, *more: tuple[str, str]
) -> None:
    """Replace `func` (a model function, or a method looked up on its class) by its own source with
    `old` -> `new` (and each further (old, new) pair) applied exactly once, compiled under the model
    file's name and line numbers (failure sites still name the model) in a copy of its module's globals.

    Patching the defining module's attribute alone would miss most callers: the model imports
    functions by name (``from .invalidate import kvm_mmu_invalidate_end``) and keeps some in ops
    tables (``remove_external_spte=tdx.tdx_sept_remove_private_spte``). So every attribute that `is`
    the original is replaced: of every module, and of every class or object an asyncvm module holds.
    """
    assert not hasattr(func, "__wrapped__"), f"{func.__qualname__} is decorated: mutate the function it wraps"
    lines, first = inspect.getsourcelines(func)
    src = textwrap.dedent("".join(lines))
    for o, n in ((old, new), *more):
        count = src.count(o)
        assert count == 1, f"{func.__qualname__}: {o!r} occurs {count} times, not once: update the mutation"
        src = src.replace(o, n)
    namespace = dict(func.__globals__)
    flags = __future__.annotations.compiler_flag
    exec(compile("\n" * (first - 1) + src, inspect.getfile(func), "exec", flags=flags, dont_inherit=True), namespace)
    mutant = namespace[func.__name__]

    def holders() -> Iterator[Any]:
        for module in list(sys.modules.values()):
            yield module
            if getattr(module, "__name__", "").startswith("asyncvm."):  # its classes and ops tables
                yield from (
                    v for v in list(vars(module).values()) if hasattr(v, "__dict__") and not isinstance(v, ModuleType)
                )

    patched = 0
    for holder in holders():
        for attr, value in list(getattr(holder, "__dict__", {}).items()):
            if value is func:
                monkeypatch.setattr(holder, attr, mutant)
                patched += 1
    assert patched, f"{func.__qualname__} is referenced nowhere it could be replaced"


@dataclass(frozen=True)
class Mutation:
    """`edits` applied to `func`; a PCT campaign of `runs` runs of `scenario` reports `kind`."""

    func: Callable[..., Any]
    edits: list[tuple[str, str]]
    scenario: str
    runs: int
    kind: str
    profile: str = "6.18"
    #: stop at the first failure; False where another finding comes first (the kind must be among them)
    stop: bool = True


#: name -> mutation; each comment says the kernel mistake it mirrors and the run (seed 0) that finds it
MUTATIONS: dict[str, Mutation] = {
    # kvm_mmu_invalidate_end() not bumping mmu_invalidate_seq: a fault's older snapshot still passes (run 14)
    "end_no_seq_bump": Mutation(
        invalidate.kvm_mmu_invalidate_end,
        [("    kvm.mmu_invalidate_seq += 1\n", "")],
        "prefault_vs_punch_hole",
        50,
        "stale_install",
    ),
    # kvm_gmem_punch_hole() truncating before kvm_gmem_invalidate_begin(): folios freed under SPTEs (run 1)
    "punch_truncate_before_begin": Mutation(
        guest_memfd.kvm_gmem_punch_hole,
        [
            (
                "        await kvm_gmem_invalidate_begin(inode, start, end)\n"
                "        await truncate_inode_pages_range(inode, vm, start, end)\n",
                "        await truncate_inode_pages_range(inode, vm, start, end)\n"
                "        await kvm_gmem_invalidate_begin(inode, start, end)\n",
            )
        ],
        "prefault_vs_punch_hole",
        50,
        "mapped_freed_pfn",
    ),
    # KVM_SET_MEMORY_ATTRIBUTES without kvm_pre_set_memory_attributes(): old-kind mappings survive (run 0)
    "attr_no_zap": Mutation(
        attributes._handle_gfn_range,
        [("flush |= await vm.ops.pre_set_memory_attributes(vm, rng)\n", "pass\n")],
        "fault_vs_attribute_flip",
        50,
        "attribute_mismatch",
    ),
    # memslot DELETE/MOVE without kvm_arch_flush_shadow_memslot(): the freed slot stays mapped (run 0)
    "memslot_delete_no_flush": Mutation(
        Vm._set_memslot,
        [("await self.ops.flush_shadow_memslot(self, old)\n", "pass\n")],
        "prefault_vs_memslot_delete",
        50,
        "stale_spte",
    ),
    # mmu_notifier invalidate_range_start() recording the range but not unmapping it (run 0)
    "mn_start_no_unmap": Mutation(
        invalidate.KvmMmuNotifier.invalidate_range_start,
        [
            (
                "flush |= await kvm_mmu_unmap_gfn_range(kvm, GfnRange(gstart, gend, slot, KVM_FILTER_SHARED, "
                "may_block))",
                "kvm_mmu_invalidate_range_add(kvm, gstart, gend)",
            )
        ],
        "prefault_vs_munmap",
        50,
        "mapped_freed_pfn",
    ),
    # tdx_sept_remove_private_spte() skipping tdx_track() once the TD is RUNNABLE (run 1)
    "tdx_remove_no_track": Mutation(
        tdx.tdx_sept_remove_private_spte,
        [
            (
                "    if kvm_tdx.state == TD_STATE_RUNNABLE:\n        err = await tdh_do_no_vcpus(",
                "    if False:\n        err = await tdh_do_no_vcpus(",
            )
        ],
        "tdx_post_finalize_faults_vs_punch_hole",
        50,
        "kvm_bug",
    ),
    # kvm_gmem_populate() without its PRIVATE-attribute check: LAUNCH_UPDATE of a shared gfn (run 1)
    "populate_no_private_check": Mutation(
        guest_memfd._populate_one,
        [
            (
                "        if not kvm_range_has_memory_attributes(vm, gfn, gfn + 1, private, private):\n",
                "        if False:\n",
            )
        ],
        "snp_launch_update_vs_conversion",
        50,
        "populate_shared",
    ),
    # KVM_PRE_FAULT_MEMORY dropping kvm->srcu before the walk: a deleted memslot used after its free
    # (run 125; a hang, the same bug seen from the retry loop, comes first at run 63)
    "prefault_srcu_early_unlock": Mutation(
        vcpu.kvm_vcpu_pre_fault_memory,
        [
            (
                "    idx = await vm.srcu.read_lock()\n",
                "    idx = await vm.srcu.read_lock()\n    await vm.srcu.read_unlock(idx)\n",
            ),
            ("    finally:\n        await vm.srcu.read_unlock(idx)\n", "    finally:\n        pass\n"),
        ],
        "prefault_vs_memslot_delete",
        400,
        "memslot_uaf",
        stop=False,
    ),
    # kvm_mmu_finish_page_fault() without kvm_release_faultin_page(): each fault leaks a reference (run 0)
    "fault_leaks_page_ref": Mutation(
        fault.kvm_mmu_finish_page_fault,
        [("    _release(vcpu, fault)\n", "    fault.folio = None\n")],
        "fault_vs_zap_all",
        50,
        "folio_leak",
    ),
    # kvm_gmem_release() not zapping the VM's mappings before the file's folios are freed (run 1)
    "gmem_release_no_invalidate": Mutation(
        guest_memfd.kvm_gmem_release,
        [
            (
                "        await __kvm_gmem_invalidate_begin(file, 0, 1 << 62, kvm_gmem_get_invalidate_filter(inode))\n"
                "        await __kvm_gmem_invalidate_end(file, 0, 1 << 62)\n",
                "        pass\n",
            )
        ],
        "gmem_release_vs_memslot_delete",
        50,
        "mapped_freed_pfn",
    ),
    # kvm_gmem_get_pfn() unlocking the folio before zeroing and preparing it: two first faults (run 1)
    "get_pfn_unlock_before_prepare": Mutation(
        guest_memfd.kvm_gmem_get_pfn,
        [
            ("        prof = vm.profile\n", "        await folio_unlock(folio)\n        prof = vm.profile\n"),
            ("                    await folio_unlock(folio)\n                    vm.kvm", "                    vm.kvm"),
            ("                await folio_unlock(folio)\n                vm.kvm", "                vm.kvm"),
            ("        await folio_unlock(folio)\n        traps.emit", "        traps.emit"),
        ],
        "snp_faults_race",
        50,
        "errno",
    ),
    # is_page_fault_stale() without mmu_invalidate_retry_gfn() under mmu_lock (run 4)
    "stale_check_unlocked_only": Mutation(
        fault.is_page_fault_stale,
        [
            (
                "    return fault.slot is not None and mmu_invalidate_retry_gfn(vcpu.vm, fault.mmu_seq, fault.gfn)\n",
                "    return False\n",
            )
        ],
        "fault_vs_attribute_flip",
        50,
        "stale_install",
    ),
    # kvm_gmem_get_folio() not re-checking folio->mapping after folio_lock(): a truncated folio (run 1)
    "get_folio_no_mapping_recheck": Mutation(
        guest_memfd.kvm_gmem_get_folio,
        [("        if inode.folios.get(index) is folio:\n", "        if True:\n")],
        "gmem_host_write_vs_prefault_vs_punch_hole",
        50,
        "gmem_host_freed",
    ),
    # kvm_mmu_invalidate_begin() not raising mmu_invalidate_in_progress (run 0)
    "begin_no_in_progress_inc": Mutation(
        invalidate.kvm_mmu_invalidate_begin,
        [
            (
                "    kvm.mmu_invalidate_in_progress += 1\n    if kvm.mmu_invalidate_in_progress == 1:\n",
                "    if kvm.mmu_invalidate_in_progress == 0:\n",
            )
        ],
        "prefault_vs_punch_hole",
        50,
        "invalidate_balance",
    ),
    # kvm_gmem_release() taking invalidate_lock before slots_lock, against the documented order (run 0)
    "release_lock_inversion": Mutation(
        guest_memfd.kvm_gmem_release,
        [
            (
                "    await vm.slots_lock.lock()\n    await inode.invalidate_lock.down_write()\n",
                "    await inode.invalidate_lock.down_write()\n    await vm.slots_lock.lock()\n",
            )
        ],
        "gmem_release_vs_memslot_delete",
        50,
        "lockdep",
    ),
}


def apply(monkeypatch: pytest.MonkeyPatch, m: Mutation) -> None:
    mutate(monkeypatch, m.func, *m.edits[0], *m.edits[1:])


def test_every_mutation_still_applies() -> None:
    """Each edit's old text occurs exactly once in today's model: a refactor that moves the code
    fails here, naming the mutation to update, instead of campaigns that test the correct model."""
    for name, m in MUTATIONS.items():
        with pytest.MonkeyPatch.context() as monkeypatch:
            try:
                apply(monkeypatch, m)
            except AssertionError as e:
                raise AssertionError(f"mutation {name}: {e}") from None


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_campaign_finds_the_mutation(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = MUTATIONS[name]
    apply(monkeypatch, m)
    report = asyncvm.explore(m.scenario, runs=m.runs, seed=0, stop_on_first_failure=m.stop, profile=m.profile)
    kinds = [f.failure.kind for f in report.failures]
    assert m.kind in kinds, f"{name}: {m.scenario} did not find it as {m.kind} in {m.runs} runs: {report.summary()}"


def test_the_correct_model_runs_each_campaign_clean() -> None:
    """What the campaigns find is the mutation's doing: unmutated, each runs in full and finds nothing."""
    for scenario, runs, profile in sorted({(m.scenario, m.runs, m.profile) for m in MUTATIONS.values()}):
        report = asyncvm.explore(scenario, runs=runs, seed=0, profile=profile)
        assert report.runs == runs and report.ok, report.summary()
