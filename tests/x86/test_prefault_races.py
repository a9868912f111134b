"""Races around the x86 fault and pre-fault paths, explored with PCT: clean on the correct model,
and caught by the oracles once the mmu_invalidate retry is removed (kvm-core.md sections 0, 1.8,
4.4; arch/x86/kvm/mmu/mmu.c: kvm_mmu_faultin_pfn(), is_page_fault_stale())."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import TaskGroup, uapi
from asyncvm.explore.engine import ScenarioFn
from asyncvm.kvm.kvm import Kvm

from .helpers import PAGE
from .scenarios import (
    prefault_overlapping,
    prefault_vs_host_unmap,
    prefault_vs_memslot_delete,
    prefault_vs_punch_hole,
    run_vs_attribute_flip,
)

RUNS = 1000
SEED = 20240611  # any seed; each explore() is reproducible from (seed, run index)

#: the failure kinds a missing invalidation retry produces (and a correct fault path never does)
STALE = ("stale_install", "stale_spte", "mapped_freed_pfn")


def _clean(scenario: ScenarioFn, **params: Any) -> None:
    report = asyncvm.explore(scenario, strategy="pct", runs=RUNS, seed=SEED, params=params)
    assert report.runs == RUNS
    assert report.ok, report.summary()


# -- clean on the correct model -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("vm_type", "private"),
    [(uapi.KVM_X86_DEFAULT_VM, False), (uapi.KVM_X86_SW_PROTECTED_VM, True)],
    ids=["shared", "private"],
)
def test_vcpus_prefaulting_overlapping_ranges(vm_type: int, private: bool) -> None:
    """api.rst: several vCPUs may pre-fault in parallel; concurrent installs of the same gfn race
    on the SPTE cmpxchg (tdp_mmu.c: tdp_mmu_set_spte_atomic()) and the loser retries or finds the
    leaf SPURIOUS. The shared memory is untouched, so the vCPUs' GUPs also race to fault it in."""
    _clean(prefault_overlapping, vm_type=vm_type, private=private)


async def concurrent_gup_of_untouched_page(kvm: Kvm) -> None:
    hva = kvm.mm.mmap(PAGE)
    pfns: list[int] = []

    async def gup() -> None:
        folio, pfn = await kvm.mm.get_user_page(hva)
        pfns.append(pfn)
        kvm.allocator.put(folio)

    async with TaskGroup() as tg:
        tg.spawn(gup, name="vcpu0_gup")
        tg.spawn(gup, name="vcpu1_gup")
    assert pfns[0] == pfns[1], f"one untouched page resolved to two pfns {pfns[0]:#x} and {pfns[1]:#x}"


def test_concurrent_gups_of_one_untouched_page_resolve_one_pfn() -> None:
    """mm/memory.c: do_anonymous_page(): the fault that loses the race for an empty PTE frees its
    folio and uses the winner's, so two vCPUs pre-faulting the same untouched page see one pfn
    (else tdp_mmu_map_handle_target_level() WARNs on a SPURIOUS leaf with another pfn). The host
    model got this re-check while these tests were written; this keeps it."""
    report = asyncvm.explore(concurrent_gup_of_untouched_page, strategy="pct", runs=200, seed=SEED)
    assert report.ok, report.summary()


def test_prefault_vs_guest_memfd_punch_hole() -> None:
    """guest_memfd.c: kvm_gmem_punch_hole() invalidates, truncates and ends under the
    invalidate_lock; a racing pre-fault retries and re-allocates, never mapping a truncated folio."""
    _clean(prefault_vs_punch_hole)


@pytest.mark.parametrize("op", ["madvise", "munmap"])
def test_prefault_vs_host_unmap(op: str) -> None:
    """kvm_main.c: kvm_mmu_notifier_invalidate_range_start()/_end(): MADV_DONTNEED and munmap zap
    the shared mapping and bump mmu_invalidate_seq; a pre-fault that resolved the old pfn retries."""
    _clean(prefault_vs_host_unmap, op=op)


def test_vcpu_fault_vs_attribute_flip() -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes() + mmu.c: kvm_arch_pre_set_memory_attributes():
    a KVM_RUN fault racing a private<->shared conversion retries or exits with
    KVM_EXIT_MEMORY_FAULT, and no mapping of the old kind survives the flip."""
    _clean(run_vs_attribute_flip)


@pytest.mark.parametrize(
    ("vm_type", "private"),
    [(uapi.KVM_X86_DEFAULT_VM, False), (uapi.KVM_X86_SW_PROTECTED_VM, True)],
    ids=["default_zap_all_fast", "sw_protected_private_zap_memslot"],
)
def test_prefault_vs_memslot_delete(vm_type: int, private: bool) -> None:
    """kvm_main.c: kvm_invalidate_memslot() + mmu.c: kvm_mmu_faultin_pfn() [~6.18]: a pre-fault
    hitting the INVALID slot returns -EAGAIN (or 0 after progress) instead of spinning under
    kvm->srcu, and a retry after the slot is re-created finishes (pre_fault_memory_test.c)."""
    _clean(prefault_vs_memslot_delete, vm_type=vm_type, private=private)


# -- the oracles fire when the retry is removed --------------------------------------------------


def _finds_stale(scenario: ScenarioFn, **params: Any) -> None:
    report = asyncvm.explore(
        scenario,
        strategy="pct",
        runs=RUNS,
        seed=SEED,
        params=params,
        bugs=["drop_invalidate_retry"],
        stop_on_first_failure=True,
    )
    assert report.failures, f"no failure in {report.runs} runs with drop_invalidate_retry"
    kinds = {f.kind for f in report.failures}
    assert kinds <= set(STALE), report.summary()


def test_missing_retry_is_caught_against_punch_hole() -> None:
    """bugs.py drop_invalidate_retry: without mmu_invalidate_retry_gfn() in is_page_fault_stale()
    (and the lockless pre-checks) a pfn resolved before PUNCH_HOLE is installed after it; the
    sequence/stale oracles report it. test_prefault_vs_guest_memfd_punch_hole is the clean twin."""
    _finds_stale(prefault_vs_punch_hole)


@pytest.mark.parametrize("op", ["madvise", "munmap"])
def test_missing_retry_is_caught_against_host_unmap(op: str) -> None:
    """bugs.py drop_invalidate_retry against the MMU notifier: the host page freed by
    MADV_DONTNEED/munmap gets mapped (stale_install, or mapped_freed_pfn). The clean twin is
    test_prefault_vs_host_unmap."""
    _finds_stale(prefault_vs_host_unmap, op=op)


def test_missing_retry_is_caught_against_attribute_flip() -> None:
    """bugs.py drop_invalidate_retry against KVM_SET_MEMORY_ATTRIBUTES: a fault that read the old
    attribute installs inside (or after) the conversion's invalidation window."""
    _finds_stale(run_vs_attribute_flip)
