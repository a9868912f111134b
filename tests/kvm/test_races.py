"""Races under the controlled runtime: each scenario runs clean on the correct model over 1,000 PCT
schedules, and the campaign sees both sides of its race (kvm-core.md section 0, items 1, 5, 11, 19)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import asyncvm
from asyncvm import uapi

from . import scenarios
from .helpers import PAGE, pre_fault, run_failing, run_once, shared_vm
from .scenarios import OUTCOMES

Scenario = Callable[[asyncvm.Kvm], Coroutine[Any, Any, None]]


def campaign(scenario: Scenario, *, runs: int = 1000, seed: int = 7, profile: str = "6.18") -> asyncvm.Report:
    OUTCOMES.pop(scenario.__name__, None)
    report = asyncvm.explore(scenario, strategy="pct", runs=runs, seed=seed, profile=profile)
    assert report.runs == runs
    assert report.ok, report.summary()
    return report


def test_punch_hole_vs_kvm_gmem_get_pfn_from_pre_fault_is_clean() -> None:
    """guest_memfd.c: kvm_gmem_punch_hole() vs kvm_gmem_get_pfn(); arch/x86/kvm/mmu/mmu.c:
    kvm_mmu_faultin_pfn() / is_page_fault_stale() retry on the invalidation."""
    campaign(scenarios.punch_hole_vs_pre_fault)
    seen = OUTCOMES["punch_hole_vs_pre_fault"]
    assert frozenset({1, 2}) in seen, "some schedules must pre-fault the hole after the punch"
    assert any(mapped != frozenset({1, 2}) for mapped in seen), "some schedules must punch a page already mapped"


def test_punch_hole_vs_guest_run_reads_data_or_zeros() -> None:
    """x86/private_mem_conversions_test.c: guest_test_punch_hole(), raced against KVM_RUN."""
    campaign(scenarios.punch_hole_vs_guest_run)
    seen = OUTCOMES["punch_hole_vs_guest_run"]
    assert (False, False) in seen, "some schedules must read the hole before the punch"
    assert (True, True) in seen, "some schedules must read the hole after the punch"


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_attribute_flip_vs_populate_either_populates_or_is_einval(profile: str) -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes() vs guest_memfd.c: kvm_gmem_populate(): both hold
    slots_lock, so populate runs wholly before the flip (success) or after it (-EINVAL)."""
    campaign(scenarios.attribute_flip_vs_populate, profile=profile)
    seen = OUTCOMES["attribute_flip_vs_populate"]
    assert seen["populated"] and seen["EINVAL"]


def test_memslot_delete_vs_pre_fault_srcu_reader_is_clean() -> None:
    """kvm_main.c: kvm_swap_active_memslots() synchronize_srcu vs kvm_vcpu_pre_fault_memory()'s SRCU
    read section; mmu.c: kvm_mmu_faultin_pfn() -EAGAIN on a KVM_MEMSLOT_INVALID slot [~6.18]."""
    campaign(scenarios.memslot_delete_vs_pre_fault)
    seen = OUTCOMES["memslot_delete_vs_pre_fault"]
    assert seen["done"] and seen["EAGAIN"] and seen["ENOENT"]


def test_memslot_delete_vs_private_pre_fault_is_clean() -> None:
    """As above for a guest_memfd slot: kvm_gmem_unbind() after synchronize_srcu, and a private
    pre-fault without a memslot is a KVM_EXIT_MEMORY_FAULT (-EFAULT)."""
    campaign(scenarios.memslot_delete_vs_private_pre_fault)
    seen = OUTCOMES["memslot_delete_vs_private_pre_fault"]
    assert seen["done"] and seen["EAGAIN"] and seen["EFAULT"]


def test_memslot_delete_vs_guest_run_is_clean() -> None:
    """set_memory_region_test.c: test_delete_memory_region(): the guest keeps running across the
    delete; accesses without a memslot exit as MMIO."""
    campaign(scenarios.memslot_delete_vs_guest_run)
    seen = OUTCOMES["memslot_delete_vs_guest_run"]
    assert seen[0] and sum(n for k, n in seen.items() if k)


async def delete_recreate_then_pre_fault(kvm: asyncvm.Kvm) -> None:
    vm, hva = await shared_vm(kvm, 4)
    vcpu = await vm.create_vcpu(0)
    assert await pre_fault(vcpu, 0, 4 * PAGE) is None
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, hva))
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 4 * PAGE, hva))
    assert await pre_fault(vcpu, 0, 4 * PAGE) is None


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_pre_fault_after_a_memslot_delete_frees_the_obsolete_root(profile: str) -> None:
    """arch/x86/kvm/mmu.h: kvm_mmu_reload() [~6.15] handles KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, so a
    pre-fault after kvm_mmu_zap_all_fast() (default VM memslot delete) loads a new root."""
    run_once(delete_recreate_then_pre_fault, profile=profile)


def test_pre_fault_after_a_memslot_delete_livelocks_before_6_15() -> None:
    """commit "KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()" (~6.15): before it,
    the pre-fault looped on RET_PF_RETRY from is_page_fault_stale() on the invalidated root."""
    failure = run_failing(delete_recreate_then_pre_fault, profile="6.10", max_steps=20_000)
    assert failure.signature == "hang:prefault.py:kvm_tdp_map_page", failure
