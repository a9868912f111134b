"""Every oracle of asyncvm/check/invariants.py (and the memslot lifetime oracle) can fire: each test
injects the bug the oracle exists to catch -- a named bug from asyncvm.bugs, or a model function
monkeypatched into its buggy form -- shows the oracle firing, and runs the same scenario clean.
The race scenarios' clean campaigns (1,000 PCT runs each) are in test_races.py."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.check.invariants import VmOracles
from asyncvm.host.mm import Mm
from asyncvm.kvm import guest_memfd, invalidate
from asyncvm.kvm.arch import kvm_arch_ops
from asyncvm.kvm.invalidate import GfnRange, kvm_mmu_invalidate_range_add
from asyncvm.kvm.vm import Vm
from asyncvm.runtime import traps
from asyncvm.runtime.sync import SRCU
from asyncvm.x86.mmu import fault as mmu_fault
from asyncvm.x86.mmu.tdp_mmu import TdpMmu

from . import scenarios
from .helpers import PAGE, SOURCE, fill_source, populate, pre_fault, private_vm, run_failing, run_once, shared_vm

PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE


async def range_add_without_zap(vm: Vm, rng: GfnRange) -> bool:
    """kvm_mmu_unmap_gfn_range() that records the range but forgets kvm_unmap_gfn_range()."""
    kvm_mmu_invalidate_range_add(vm, rng.start, rng.end)
    return False


async def prefaulted_shared(kvm: asyncvm.Kvm) -> tuple[Any, int, Any]:
    """A default VM with 4 anonymous pages at gpa 0, every one pre-faulted by vCPU 0: (vm, hva, vcpu)."""
    vm, hva = await shared_vm(kvm, 4)
    vcpu = await vm.create_vcpu(0)
    assert await pre_fault(vcpu, 0, 4 * PAGE) is None
    return vm, hva, vcpu


async def prefaulted_private(kvm: asyncvm.Kvm) -> Any:
    """A VM with 4 PRIVATE guest_memfd pages at gpa 0, every one pre-faulted by vCPU 0 (what
    private_vm() returns)."""
    p = await private_vm(kvm, 4)
    vcpu = await p.vm.create_vcpu(0)
    assert await pre_fault(vcpu, 0, 4 * PAGE) is None
    return p


# -- stale_install: the sequence rule --------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", [scenarios.punch_hole_vs_pre_fault, scenarios.punch_hole_vs_guest_run], ids=["pre_fault", "run"]
)
def test_stale_install_fires_when_the_fault_skips_the_invalidation_retry(scenario: Any) -> None:
    """bugs.py: drop_invalidate_retry (arch/x86/kvm/mmu/mmu.c: is_page_fault_stale(),
    kvm_mmu_faultin_pfn()): a pfn resolved before PUNCH_HOLE is installed after it."""
    report = asyncvm.explore(
        scenario, strategy="pct", runs=1000, seed=7, bugs=["drop_invalidate_retry"], stop_on_first_failure=True
    )
    found = report.first("stale_install")
    assert found is not None, report.summary()
    again = asyncvm.replay(found.schedule, scenario)
    assert again.failure is not None and again.failure.signature == found.signature


def test_the_pre_fault_scenario_is_clean_without_the_bug() -> None:
    """The same campaign without drop_invalidate_retry (the 1,000-run version is in test_races.py)."""
    assert asyncvm.explore(scenarios.punch_hole_vs_pre_fault, strategy="pct", runs=200, seed=7).ok


# -- mapped_freed_pfn / stale_spte: a mapping that outlives its memory -------------------------------


async def pre_fault_then_punch(kvm: asyncvm.Kvm) -> None:
    p = await prefaulted_private(kvm)
    await p.gmem.fallocate(PUNCH, PAGE, PAGE)


def test_mapped_freed_pfn_fires_when_punch_hole_does_not_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: __kvm_gmem_invalidate_begin() must unmap before truncate frees the folio."""
    run_once(pre_fault_then_punch)
    monkeypatch.setattr(guest_memfd, "kvm_mmu_unmap_gfn_range", range_add_without_zap)
    failure = run_failing(pre_fault_then_punch)
    assert failure.kind == "mapped_freed_pfn", failure


async def pin_then_munmap(kvm: asyncvm.Kvm) -> None:
    _vm, hva, _vcpu = await prefaulted_shared(kvm)
    # Someone else (e.g. an O_DIRECT read) holds references: the pages outlive the munmap.
    pins = [(await kvm.mm.get_user_page(hva + i * PAGE))[0] for i in range(4)]
    await kvm.mm.munmap(hva, 4 * PAGE)
    for folio in pins:
        kvm.allocator.put(folio)  # the read completes


def test_stale_spte_fires_when_the_mmu_notifier_does_not_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_mmu_notifier_invalidate_range_start() -> kvm_mmu_unmap_gfn_range(): without
    the zap the SPTE keeps mapping a page the host no longer maps there."""
    run_once(pin_then_munmap)
    monkeypatch.setattr(invalidate, "kvm_mmu_unmap_gfn_range", range_add_without_zap)
    failure = run_failing(pin_then_munmap)
    assert failure.kind == "stale_spte", failure


async def pre_fault_then_munmap_one_page(kvm: asyncvm.Kvm) -> None:
    _vm, hva, _vcpu = await prefaulted_shared(kvm)
    await kvm.mm.munmap(hva + 2 * PAGE, PAGE)


def test_mapped_freed_pfn_fires_at_quiescence_inside_a_run_of_shared_sptes(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_init_mmu_notifier(): without an MMU notifier the host frees a page KVM maps.
    No invalidation runs, so only the quiescence check can see it, and the freed page is the third
    of a run of four consecutive-pfn SPTEs (the check must visit every folio of the run)."""
    run_once(pre_fault_then_munmap_one_page)
    monkeypatch.setattr(Mm, "register_notifier", lambda self, notifier: None)
    assert run_failing(pre_fault_then_munmap_one_page).signature == "mapped_freed_pfn:free"
    # the same bug with the check at the free switched off: quiescence still sees it
    monkeypatch.setattr(VmOracles, "_check_unmapped", lambda self, folio, step: None)
    failure = run_failing(pre_fault_then_munmap_one_page)
    assert failure.signature == "mapped_freed_pfn" and failure.evidence["gfn"] == 2, failure


async def truncate_before_invalidate_begin(file: guest_memfd.GuestMemfd, offset: int, length: int) -> None:
    """kvm_gmem_punch_hole() with the truncation moved before kvm_gmem_invalidate_begin(): the
    folios are freed while the SPTEs still map them (the zap comes too late)."""
    inode = file.inode
    start, end = offset >> uapi.PAGE_SHIFT, (offset + length) >> uapi.PAGE_SHIFT
    await inode.invalidate_lock.down_write()
    try:
        await guest_memfd.truncate_inode_pages_range(inode, file.vm, start, end)
        await guest_memfd.kvm_gmem_invalidate_begin(inode, start, end)
        await guest_memfd.kvm_gmem_invalidate_end(inode, start, end)
    finally:
        await inode.invalidate_lock.up_write()


def test_mapped_freed_pfn_fires_at_the_free_when_punch_hole_truncates_before_the_zap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """guest_memfd.c: kvm_gmem_punch_hole(): begin (zap), then truncate. The other way round the
    zap still comes, before anyone can look at quiescence: only a check at the free sees it."""
    run_once(pre_fault_then_punch)
    monkeypatch.setattr(guest_memfd, "kvm_gmem_punch_hole", truncate_before_invalidate_begin)
    failure = run_failing(pre_fault_then_punch)
    assert failure.signature == "mapped_freed_pfn:free" and failure.evidence["gfn"] == 1, failure


async def pre_fault_then_close(kvm: asyncvm.Kvm) -> None:
    p = await prefaulted_private(kvm)
    await p.gmem.close()


def test_mapped_freed_pfn_fires_at_the_free_when_gmem_release_does_not_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_release() must zap the VM's mappings of the file before the last
    close evicts the inode and frees its folios."""

    async def no_invalidate(*args: Any) -> None:
        await traps.point(None)

    run_once(pre_fault_then_close)
    monkeypatch.setattr(guest_memfd, "__kvm_gmem_invalidate_begin", no_invalidate)
    monkeypatch.setattr(guest_memfd, "__kvm_gmem_invalidate_end", no_invalidate)
    failure = run_failing(pre_fault_then_close)
    assert failure.signature == "mapped_freed_pfn:free", failure


# -- stale_spte of a freed memslot: kvm_arch_flush_shadow_memslot() ----------------------------------


async def pre_fault_then_delete_the_slot(kvm: asyncvm.Kvm) -> None:
    vm, hva, _vcpu = await prefaulted_shared(kvm)
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, hva))


async def pre_fault_then_move_the_slot_onto_itself(kvm: asyncvm.Kvm) -> None:
    """A MOVE whose new range overlaps the old one, faulted again: the new slot's mappings in the
    old range are its own, not leftovers."""
    vm, hva, vcpu = await prefaulted_shared(kvm)
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 2 * PAGE, 4 * PAGE, hva))
    assert await pre_fault(vcpu, 2 * PAGE, 4 * PAGE) is None


async def no_flush(vm: Vm, slot: Any) -> None:
    """kvm_arch_flush_shadow_memslot() that zaps nothing."""
    await traps.point(None)


@pytest.mark.parametrize(
    "body", [pre_fault_then_delete_the_slot, pre_fault_then_move_the_slot_onto_itself], ids=["delete", "move"]
)
def test_stale_spte_fires_when_a_freed_memslot_was_not_flushed(body: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_set_memslot() -> kvm_invalidate_memslot() -> kvm_arch_flush_shadow_memslot():
    a deleted or moved slot's SPTEs go before kvm_commit_memory_region() frees it. The anonymous
    pages stay mapped by the host, so nothing is freed: only the check at the slot's free sees it."""
    run_once(body)
    monkeypatch.setattr(kvm_arch_ops(), "flush_shadow_memslot", no_flush)
    failure = run_failing(body)
    assert failure.signature == "stale_spte:memslot_freed" and failure.evidence["gfn"] == 0, failure


# -- folio_leak: references at quiescence ------------------------------------------------------------


async def pre_fault_shared(kvm: asyncvm.Kvm) -> None:
    _vm, _hva, _vcpu = await prefaulted_shared(kvm)


@pytest.mark.parametrize("body", [pre_fault_shared, pre_fault_then_punch], ids=["shared", "private"])
def test_folio_leak_fires_when_a_fault_keeps_its_page_reference(body: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """arch/x86/kvm/mmu/mmu.c: kvm_mmu_finish_page_fault() -> kvm_release_faultin_page(): the
    reference GUP (or kvm_gmem_get_pfn()) took to resolve the pfn is dropped once the SPTE is
    set. Kept, it pins the page for ever; at quiescence its refcount exceeds what holds it."""
    run_once(body)
    monkeypatch.setattr(mmu_fault, "kvm_mmu_finish_page_fault", lambda vcpu, fault, r: None)
    failure = run_failing(body)
    assert failure.kind == "folio_leak", failure


# -- invalidate_balance: begin/end pairs -----------------------------------------------------------


def test_invalidate_balance_fires_when_punch_hole_skips_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_punch_hole(): every kvm_gmem_invalidate_begin() needs its end."""

    async def skipped_end(*args: Any) -> None:
        await traps.point(None)

    run_once(pre_fault_then_punch)
    monkeypatch.setattr(guest_memfd, "kvm_gmem_invalidate_end", skipped_end)
    failure = run_failing(pre_fault_then_punch)
    assert failure.kind == "invalidate_balance" and failure.signature == "invalidate_balance:quiescence", failure


def test_invalidate_balance_fires_on_an_end_without_a_begin(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_mmu_invalidate_end(): KVM_BUG_ON(in_progress < 0)."""

    async def skipped_begin(*args: Any) -> None:
        await traps.point(None)

    async def punch(kvm: asyncvm.Kvm) -> None:
        # nothing mapped: without the begin's zap a mapped folio would be freed under its SPTE first
        p = await private_vm(kvm, 4)
        await p.gmem.fallocate(PUNCH, PAGE, PAGE)

    monkeypatch.setattr(guest_memfd, "kvm_gmem_invalidate_begin", skipped_begin)
    failure = run_failing(punch)
    assert failure.signature == "invalidate_balance:end", failure


# -- attribute_mismatch ----------------------------------------------------------------------------


async def pre_fault_then_convert(kvm: asyncvm.Kvm) -> None:
    p = await prefaulted_private(kvm)
    await p.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))


def test_attribute_mismatch_fires_when_a_conversion_does_not_zap(monkeypatch: pytest.MonkeyPatch) -> None:
    """arch/x86/kvm/mmu/mmu.c: kvm_arch_pre_set_memory_attributes() must unmap the old kind: a
    private SPTE left on a gfn that is now shared disagrees with the attributes."""

    async def no_zap(vm: Vm, rng: GfnRange) -> bool:
        await traps.point(None)
        return False

    run_once(pre_fault_then_convert)
    monkeypatch.setattr(kvm_arch_ops(), "pre_set_memory_attributes", no_zap)
    failure = run_failing(pre_fault_then_convert)
    assert failure.kind == "attribute_mismatch", failure


# -- populate_shared -------------------------------------------------------------------------------


async def populate_a_shared_gfn(kvm: asyncvm.Kvm) -> None:
    p = await private_vm(kvm, 4)
    await p.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))
    src = await fill_source(kvm, SOURCE)
    assert await populate(p.vm, 1, src, 1) == -uapi.EINVAL


def test_populate_shared_fires_when_populate_skips_the_attribute_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """guest_memfd.c: kvm_gmem_populate() must refuse gfns that are not PRIVATE (6.11+)."""
    run_once(populate_a_shared_gfn)
    monkeypatch.setattr(guest_memfd, "kvm_range_has_memory_attributes", lambda *args: True)
    failure = run_failing(populate_a_shared_gfn)
    assert failure.kind == "populate_shared", failure


# -- memslot_uaf -----------------------------------------------------------------------------------


def test_memslot_uaf_fires_when_a_memslot_update_does_not_wait_for_srcu_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kvm_main.c: kvm_swap_active_memslots() -> synchronize_srcu(): without it a pre-fault that
    looked the slot up keeps using it after kvm_free_memslot()."""

    async def no_wait(self: SRCU) -> None:
        await traps.point(self)

    scenario = scenarios.memslot_delete_vs_private_pre_fault
    monkeypatch.setattr(SRCU, "synchronize", no_wait)
    # POS reorders the racing operations on the memslot array directly; PCT needs far more runs.
    report = asyncvm.explore(scenario, strategy="pos", runs=300, seed=7)
    found = report.first("memslot_uaf")
    assert found is not None, report.summary()
    again = asyncvm.replay(found.schedule, scenario)
    assert again.failure is not None and again.failure.signature == found.signature


# -- invalidate_balance (mn_active_invalidate_count) and kvm_bug -------------------------------------


async def pre_fault_then_munmap(kvm: asyncvm.Kvm) -> None:
    _vm, hva, _vcpu = await prefaulted_shared(kvm)
    await kvm.mm.munmap(hva, 4 * PAGE)


def test_mn_active_balance_fires_when_range_end_forgets_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm_main.c: kvm_mmu_notifier_invalidate_range_end() must drop mn_active_invalidate_count,
    or every later memslot update waits forever in kvm_swap_active_memslots()."""
    original = invalidate.KvmMmuNotifier.invalidate_range_end

    async def forgets_the_decrement(self: invalidate.KvmMmuNotifier, start: int, end: int) -> None:
        await original(self, start, end)
        self.kvm.mn_active_invalidate_count += 1

    run_once(pre_fault_then_munmap)
    monkeypatch.setattr(invalidate.KvmMmuNotifier, "invalidate_range_end", forgets_the_decrement)
    failure = run_failing(pre_fault_then_munmap)
    assert failure.signature == "invalidate_balance:mn_active", failure


async def delete_the_slot_twice(kvm: asyncvm.Kvm) -> None:
    vm, hva, _vcpu = await prefaulted_shared(kvm)
    for _ in range(2):
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, hva))
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 4 * PAGE, hva))


def test_kvm_bug_fires_when_a_valid_root_loses_its_last_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """arch/x86/kvm/mmu/tdp_mmu.c: kvm_tdp_mmu_invalidate_roots() must mark a root invalid before it
    hands the MMU's reference to the zapper; kvm_tdp_mmu_put_root() KVM_BUG_ONs a valid root at 0."""

    def schedule_without_invalidating(self: TdpMmu, mirror: bool = False) -> None:
        for root in self.roots:
            if not root.invalid and root.is_mirror == mirror:
                root.scheduled_to_zap = True

    run_once(delete_the_slot_twice)
    monkeypatch.setattr(TdpMmu, "invalidate_roots", schedule_without_invalidating)
    failure = run_failing(delete_the_slot_twice)
    assert failure.kind == "kvm_bug", failure


def test_a_stale_install_names_the_steps_that_make_it_a_race() -> None:
    """The failure is reported at the install itself, and names where the fault snapshot the
    sequence, where the invalidation began and where the pfn was freed, in schedule order."""
    report = asyncvm.explore(
        scenarios.punch_hole_vs_pre_fault, strategy="pct", runs=1000, seed=7, bugs=["drop_invalidate_retry"]
    )
    found = report.first("stale_install")
    assert found is not None, report.summary()
    steps = found.failure.evidence["steps"]
    assert steps["install"] == found.failure.step
    assert steps["snapshot"] < steps["install"]
    assert steps["invalidate_begin"] < steps["install"]
    if "pfn_freed" in steps:
        assert steps["invalidate_begin"] < steps["pfn_freed"] < steps["install"]
    events = asyncvm.replay(found.schedule, scenarios.punch_hole_vs_pre_fault).events()
    installs = [e for e in events if e["op"] == "spte" and e["step"] == steps["install"] and e["new"] != "none"]
    assert installs, "the install is an event of the failing step"
