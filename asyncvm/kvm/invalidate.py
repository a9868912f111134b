"""The mmu_invalidate_* protocol: seq, in_progress, the union range, and the MMU notifier.

An invalidation runs begin -> range_add -> zap under ``mmu_lock`` held for write, frees or
converts the memory with the lock dropped, then ends (seq++ before in_progress--) under the lock
again. A fault snapshots the seq before resolving its pfn and, under ``mmu_lock``, retries if an
invalidation covering its gfn is in progress or the seq moved: a mapping can never outlive the
memory it points to. Memslot deletion does not use this protocol; it relies on SRCU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..runtime import traps
from ..runtime.failures import Violation
from ..runtime.sync import WRITE

if TYPE_CHECKING:
    from .memslots import Memslot
    from .vm import Vm

INVALID_GPA = -1

KVM_FILTER_PRIVATE = 1 << 0
KVM_FILTER_SHARED = 1 << 1


@dataclass
class GfnRange:
    """``struct kvm_gfn_range``: a gfn range within one memslot, and which mappings to act on."""

    start: int
    end: int
    slot: Memslot | None
    attr_filter: int = KVM_FILTER_PRIVATE | KVM_FILTER_SHARED
    may_block: bool = True


@dataclass(eq=False)
class Invalidation:
    """One begin..end window, for the oracles: what it covered and when it ran."""

    source: str
    began: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    ended: int | None = None


def lockdep_assert_held_write(lock: Any, what: str) -> None:
    """lockdep_assert_held_write(): the model states each locking rule as a check."""
    if not lock.held_by_current(WRITE):
        raise Violation(
            "lock_assert",
            f"{what} requires {lock.name} held for write",
            signature=f"lock_assert:{what}",
        )


def lockdep_assert_held(lock: Any, what: str) -> None:
    if not lock.held_by_current():
        raise Violation("lock_assert", f"{what} requires {lock.name} held", signature=f"lock_assert:{what}")


def kvm_mmu_invalidate_begin(vm: Vm, source: str) -> Invalidation:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_begin() (6.8+); returns the window for the oracles."""
    lockdep_assert_held_write(vm.mmu_lock, "kvm_mmu_invalidate_begin")
    vm.mmu_invalidate_in_progress += 1
    if vm.mmu_invalidate_in_progress == 1:
        vm.mmu_invalidate_range_start = INVALID_GPA
        vm.mmu_invalidate_range_end = INVALID_GPA
    inv = vm.oracles.invalidate_begin(source)
    traps.emit("invalidate_begin", vm, source=source, in_progress=vm.mmu_invalidate_in_progress)
    return inv


def kvm_mmu_invalidate_range_add(vm: Vm, inv: Invalidation, start: int, end: int) -> None:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_range_add() (6.8+): the range only grows."""
    lockdep_assert_held_write(vm.mmu_lock, "kvm_mmu_invalidate_range_add")
    if vm.mmu_invalidate_in_progress <= 0:
        raise Violation("invalidate_balance", "range_add outside begin/end", signature="invalidate_balance:range_add")
    if "invalidate_range_add_no_widen" in vm.bugs and vm.mmu_invalidate_range_start != INVALID_GPA:
        # bug: a later invalidation replaces the accumulated range instead of widening it
        vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end = start, end
    elif vm.mmu_invalidate_range_start == INVALID_GPA:
        vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end = start, end
    else:
        vm.mmu_invalidate_range_start = min(vm.mmu_invalidate_range_start, start)
        vm.mmu_invalidate_range_end = max(vm.mmu_invalidate_range_end, end)
    vm.oracles.invalidate_range_add(inv, start, end)
    traps.emit("invalidate_range_add", vm, start=start, end=end)


def kvm_mmu_invalidate_end(vm: Vm, inv: Invalidation) -> None:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_end() (6.8+): seq++ before in_progress--."""
    lockdep_assert_held_write(vm.mmu_lock, "kvm_mmu_invalidate_end")
    vm.mmu_invalidate_seq += 1
    vm.mmu_invalidate_in_progress -= 1
    if vm.mmu_invalidate_in_progress < 0:
        raise Violation(
            "invalidate_balance", "kvm_mmu_invalidate_end without a begin", signature="invalidate_balance:end"
        )
    vm.oracles.invalidate_end(inv)
    traps.emit("invalidate_end", vm, seq=vm.mmu_invalidate_seq, in_progress=vm.mmu_invalidate_in_progress)


def mmu_invalidate_retry_gfn(vm: Vm, mmu_seq: int, gfn: int) -> bool:
    """include/linux/kvm_host.h: mmu_invalidate_retry_gfn() (6.8+), under mmu_lock."""
    lockdep_assert_held(vm.mmu_lock, "mmu_invalidate_retry_gfn")
    return _retry(vm, mmu_seq, gfn)


def mmu_invalidate_retry_gfn_unsafe(vm: Vm, mmu_seq: int, gfn: int) -> bool:
    """include/linux/kvm_host.h: mmu_invalidate_retry_gfn_unsafe() (6.8+): lockless pre-check."""
    return _retry(vm, mmu_seq, gfn)


def _retry(vm: Vm, mmu_seq: int, gfn: int) -> bool:
    if vm.mmu_invalidate_in_progress:
        if vm.mmu_invalidate_range_start == INVALID_GPA:
            return True  # the kernel WARNs: begin without range_add
        if vm.mmu_invalidate_range_start <= gfn < vm.mmu_invalidate_range_end:
            return True
    return vm.mmu_invalidate_seq != mmu_seq


async def kvm_mmu_unmap_gfn_range(vm: Vm, inv: Invalidation, rng: GfnRange) -> bool:
    """virt/kvm/kvm_main.c: kvm_mmu_unmap_gfn_range() (6.8+): range_add, then the arch zap."""
    kvm_mmu_invalidate_range_add(vm, inv, rng.start, rng.end)
    return await vm.arch.unmap_gfn_range(vm, rng)


class KvmMmuNotifier:
    """``kvm_mmu_notifier_ops``: host mm invalidations reaching one VM (virt/kvm/kvm_main.c)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._open: dict[tuple[int, int], list[Invalidation]] = {}

    async def invalidate_range_start(self, start: int, end: int, may_block: bool) -> None:
        """kvm_mmu_notifier_invalidate_range_start() (6.8+)."""
        vm = self.vm
        await vm.mn_invalidate_lock.lock()
        vm.mn_active_invalidate_count += 1
        await vm.mn_invalidate_lock.unlock()
        inv = None
        idx = await vm.srcu.read_lock()
        try:
            flush = False
            for slot, gstart, gend in vm.hva_range_slots(start, end):
                if inv is None:
                    await vm.mmu_lock.write_lock()
                    inv = kvm_mmu_invalidate_begin(vm, "mmu_notifier")
                rng = GfnRange(gstart, gend, slot, KVM_FILTER_SHARED, may_block)
                flush |= await kvm_mmu_unmap_gfn_range(vm, inv, rng)
            if inv is not None:
                if flush:
                    vm.arch.flush_remote_tlbs(vm)
                await vm.mmu_lock.write_unlock()
        finally:
            await vm.srcu.read_unlock(idx)
        if inv is not None:
            self._open.setdefault((start, end), []).append(inv)

    async def invalidate_range_end(self, start: int, end: int) -> None:
        """kvm_mmu_notifier_invalidate_range_end() (6.8+)."""
        vm = self.vm
        idx = await vm.srcu.read_lock()
        try:
            if any(True for _ in vm.hva_range_slots(start, end)):
                await vm.mmu_lock.write_lock()
                pending = self._open.get((start, end))
                inv = pending.pop() if pending else vm.oracles.orphan_invalidation("mmu_notifier")
                kvm_mmu_invalidate_end(vm, inv)
                await vm.mmu_lock.write_unlock()
        finally:
            await vm.srcu.read_unlock(idx)
        await vm.mn_invalidate_lock.lock()
        vm.mn_active_invalidate_count -= 1
        wake = vm.mn_active_invalidate_count == 0
        await vm.mn_invalidate_lock.unlock()
        if wake:
            await vm.mn_memslots_update_rcuwait.wake_up()
