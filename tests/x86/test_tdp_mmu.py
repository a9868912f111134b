"""TDP MMU unit behaviour: root refcounts and obsolete roots, range-based SPTE state, and the
handle_changed_spte() invariant (arch/x86/kvm/mmu/tdp_mmu.c, mmu.c, mmu.h; kvm-core.md 5.2, 5.4)."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.kvm import Kvm
from asyncvm.x86.mmu import fault as fault_mod
from asyncvm.x86.mmu.fault import RET_PF_FIXED, RET_PF_INVALID, KvmPageFault
from asyncvm.x86.mmu.prefault import kvm_arch_vcpu_pre_fault_memory
from asyncvm.x86.mmu.tdp_mmu import PAGES, PG_LEVEL_1G, Leaf, Root, align

from .helpers import PAGE, SZ_1G, add_slot, assert_clean, delete_slot, pre_fault, run_once

GPA = 1 << 30


async def _prefaulted_vm(kvm: Kvm, npages: int = 4) -> Any:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, GPA, npages * PAGE)
    r = uapi.PreFaultMemory(GPA, npages * PAGE)
    assert await pre_fault(vcpu, r) == 0 and r.size == 0
    return vcpu


# -- root lifetime ------------------------------------------------------------------------------


async def root_refcounts(kvm: Kvm) -> None:
    vcpu = await _prefaulted_vm(kvm)
    vm = vcpu.vm
    mmu = vm.arch.mmu
    root: Root = vcpu.arch.mmu.root
    assert root.refcount == 2, "one reference for the vCPU, one for the TDP MMU itself"
    other = await vm.create_vcpu(1)
    assert await pre_fault(other, uapi.PreFaultMemory(GPA, PAGE)) == 0
    assert other.arch.mmu.root is root and root.refcount == 3, "a second vCPU reuses the valid root"

    await vm.mmu_lock.write_lock()
    mmu.invalidate_roots()
    await vm.mmu_lock.write_unlock()
    assert root.invalid and root.scheduled_to_zap and root.refcount == 3, "invalidating only marks"

    await vm.mmu_lock.read_lock()
    await mmu.zap_invalidated_roots()
    await vm.mmu_lock.read_unlock()
    assert root.refcount == 2 and not root.leaves(0, 1 << 40), "zapped, then the MMU's reference put"
    assert root in mmu.roots and not root.freed, "vCPUs still hold it"

    for v in (vcpu, other):
        await v.arch.mmu.kvm_mmu_free_obsolete_roots()
    assert root.refcount == 0 and root.freed and root not in mmu.roots, "the last put frees it"
    assert vcpu.arch.mmu.root is None and other.arch.mmu.root is None


def test_root_refcount_lifecycle() -> None:
    """tdp_mmu.c: kvm_tdp_mmu_alloc_root() starts a root at 2 (vCPU + TDP MMU);
    kvm_tdp_mmu_invalidate_roots() only marks it and hands the MMU's reference to
    kvm_tdp_mmu_zap_invalidated_roots(), which zaps and then puts it; kvm_tdp_mmu_put_root()
    frees the root when the count reaches 0."""
    assert_clean(run_once(root_refcounts))


async def put_valid_root_to_zero(kvm: Kvm) -> None:
    vcpu = await _prefaulted_vm(kvm)
    mmu = vcpu.vm.arch.mmu
    root = vcpu.arch.mmu.root
    mmu.put_root(root)
    mmu.put_root(root)


def test_freeing_a_valid_root_is_a_kvm_bug() -> None:
    """tdp_mmu.c: kvm_tdp_mmu_put_root(): KVM_BUG_ON(!is_invalid) when the count reaches 0."""
    result = run_once(put_valid_root_to_zero)
    assert result.failure is not None and result.failure.kind == "kvm_bug", str(result.failure)


async def delete_then_prefault(kvm: Kvm, out: dict[str, Any]) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, GPA, 4 * PAGE)
    await add_slot(vm, 1, 2 * GPA, 4 * PAGE)
    assert await pre_fault(vcpu, uapi.PreFaultMemory(GPA, 4 * PAGE)) == 0
    old: Root = vcpu.arch.mmu.root
    await delete_slot(vm, 1)  # default VM + KVM_X86_QUIRK_SLOT_ZAP_ALL: kvm_mmu_zap_all_fast()
    out["after_delete"] = (old.invalid, old.refcount, vcpu.has_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"))
    r = uapi.PreFaultMemory(GPA, 4 * PAGE)
    out["errno"] = await pre_fault(vcpu, r)
    out["size"] = r.size
    out["old_freed"] = old.freed
    out["new_root"] = (
        vcpu.arch.mmu.root is not old and vcpu.arch.mmu.root is not None and not vcpu.arch.mmu.root.invalid
    )


def test_memslot_delete_then_prefault_frees_the_obsolete_root() -> None:
    """x86.c: kvm_arch_flush_shadow_memslot() -> mmu.c: kvm_mmu_zap_all_fast() invalidates the
    roots and requests KVM_REQ_MMU_FREE_OBSOLETE_ROOTS; [~6.15] mmu.h: kvm_mmu_reload() handles
    the request, so the next pre-fault frees the obsolete root and loads a new one (commit "KVM:
    x86/mmu: Check and free obsolete roots in kvm_mmu_reload()")."""
    out: dict[str, Any] = {}
    assert_clean(run_once(delete_then_prefault, profile="6.18", out=out))
    assert out["after_delete"] == (True, 1, True), "invalid, only the vCPU's reference left, request pending"
    assert (out["errno"], out["size"]) == (0, 0)
    assert out["old_freed"] and out["new_root"]


def test_610_prefault_on_an_obsolete_root_only_returns_through_a_signal() -> None:
    """Before [~6.15] kvm_mmu_reload() ignored KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: the vCPU keeps its
    invalid root and is_page_fault_stale() returns RET_PF_RETRY on every attempt, so the [6.11]
    kvm_tdp_map_page() loop ends only when signal_pending() makes it -EINTR (no progress): a hung
    task, reported as a hang at the loop (issue 14)."""
    ended_by_signal = 0
    for seed in range(1, 11):
        out: dict[str, Any] = {}
        result = run_once(delete_then_prefault, seed=seed, profile="6.10", data_probs={}, out=out)
        if "after_delete" not in out:
            continue  # a signal stopped the set-up's own pre-fault first
        assert out["after_delete"] == (True, 1, True)
        assert (out["errno"], out["size"]) == (uapi.EINTR, 4 * PAGE)
        assert not out["old_freed"] and not out["new_root"], "the obsolete root is still loaded"
        if result.failure is None:
            continue  # the signal came within the first re-checks: not yet told from a BUSY retry
        assert result.failure.signature == "hang:prefault.py:kvm_tdp_map_page", result.failure
        ended_by_signal += 1
    assert ended_by_signal


def test_610_prefault_on_an_obsolete_root_is_a_livelock_without_signals() -> None:
    """The same [6.11-6.14] pre-fault with no signal ever arriving spins on RET_PF_RETRY forever:
    explore() reports a livelock of the vCPU task (the hang Yan Zhao's kvm_mmu_reload() fix cured)."""
    report = asyncvm.explore(
        delete_then_prefault,
        strategy="random",
        runs=2,
        seed=3,
        profile="6.10",
        params={"out": {}},
        data_probs={"signal": 0.0},
        max_steps=5_000,
    )
    assert report.failures and {f.kind for f in report.failures} == {"hang"}, report.summary()
    assert report.failures[0].signature == "hang:prefault.py:kvm_tdp_map_page"


# -- range-based SPTE state ---------------------------------------------------------------------


async def prefault_1g(kvm: Kvm, out: dict[str, Any]) -> None:
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, 0, SZ_1G, SZ_1G, page_size=SZ_1G)
    idx = await vm.srcu.read_lock()
    try:
        out["first_step"] = await kvm_arch_vcpu_pre_fault_memory(vcpu, SZ_1G, SZ_1G)
    finally:
        await vm.srcu.read_unlock(idx)
    r = uapi.PreFaultMemory(SZ_1G, SZ_1G)
    assert await pre_fault(vcpu, r) == 0 and r.size == 0
    root: Root = vcpu.arch.mmu.root
    out["entries"] = {level: len(root.levels[level]) for level in (1, 2, 3)}
    out["leaf"] = root.leaf_at(SZ_1G // PAGE + 12345)
    out["host_ptes"] = len(kvm.mm.ptes)


def test_1g_hugepage_backed_slot_is_a_handful_of_interval_entries() -> None:
    """Model rule (DESIGN.md "Performance rules"): SPTE state is an interval map, so pre-faulting a
    1 GiB hugepage-backed shared slot maps one PG_LEVEL_1G leaf in one step and costs O(1)
    entries, not 262144 (mmu.c: kvm_mmu_hugepage_adjust() picks 1G from host_pfn_mapping_level())."""
    out: dict[str, Any] = {}
    assert_clean(run_once(prefault_1g, out=out))
    assert out["first_step"] == SZ_1G
    assert out["entries"] == {1: 0, 2: 0, 3: 1}
    level, leaf = out["leaf"]
    assert level == PG_LEVEL_1G and leaf.level == PG_LEVEL_1G
    assert out["host_ptes"] == 1


# -- handle_changed_spte(): a present leaf never changes pfn in place -----------------------------


@pytest.fixture
def remap_present_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutate the model: faults skip the lockless fast path and, finding a present leaf at the
    goal level, install a leaf with a different pfn over it instead of returning SPURIOUS."""
    original = fault_mod._map_target_level

    async def buggy(vcpu: Any, fault: KvmPageFault, root: Root) -> int:
        level = fault.goal_level
        base = align(fault.gfn, level)
        old = root.get(level, base)
        if isinstance(old, Leaf):
            new = old._replace(delta=old.delta + PAGES[level])
            if await vcpu.vm.arch.mmu.set_spte_atomic(root, level, base, old, new):
                return RET_PF_FIXED
        return await original(vcpu, fault, root)

    monkeypatch.setattr(fault_mod, "fast_page_fault", lambda vcpu, fault: RET_PF_INVALID)
    monkeypatch.setattr(fault_mod, "_map_target_level", buggy)


async def prefault_twice(kvm: Kvm) -> None:
    vcpu = await _prefaulted_vm(kvm, npages=1)
    await pre_fault(vcpu, uapi.PreFaultMemory(GPA, PAGE))


@pytest.mark.usefixtures("remap_present_leaf")
def test_replacing_a_present_leaf_with_another_pfn_is_caught() -> None:
    """tdp_mmu.c: handle_changed_spte() BUG()s when a present leaf becomes a present leaf with a
    different pfn (it must go through non-present and a TLB flush): the spte_pfn_change oracle."""
    result = run_once(prefault_twice)
    assert result.failure is not None and result.failure.kind == "spte_pfn_change", str(result.failure)
