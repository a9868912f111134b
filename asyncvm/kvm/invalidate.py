"""The mmu_invalidate_* protocol: seq, in_progress, the union range, and the MMU notifier.

An invalidation runs begin -> range_add -> zap under ``mmu_lock`` held for write, frees or
converts the memory with the lock dropped, then ends (seq++ before in_progress--) under the lock
again. A fault snapshots the seq before resolving its pfn and, under ``mmu_lock``, retries if an
invalidation covering its gfn is in progress or the seq moved: a mapping can never outlive the
memory it points to. Memslot deletion does not use this protocol; it relies on SRCU.

The functions keep the kernel's parameters; each announces itself through a tracepoint
(``kvm/trace.py``), which is how the oracles learn which windows were open and what they covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..runtime import hb, traps
from ..runtime.lockdep import lockdep_assert_held, lockdep_assert_held_write
from .trace import (
    trace_kvm_mmu_invalidate_begin,
    trace_kvm_mmu_invalidate_end,
    trace_kvm_mmu_invalidate_range_add,
    trace_kvm_unmap_hva_range,
)

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
    #: ``arg.attributes``: the attributes being set (KVM_SET_MEMORY_ATTRIBUTES)
    attributes: int = 0


def kvm_mmu_invalidate_begin(kvm: Vm) -> None:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_begin() (6.8+)."""
    lockdep_assert_held_write(kvm.mmu_lock)
    if hb.ACTIVE:
        hb.access(hb.PLAIN_RMW, "mmu_invalidate_in_progress", kvm)
    kvm.mmu_invalidate_in_progress += 1
    if kvm.mmu_invalidate_in_progress == 1:
        # aligned word stores, which KCSAN (ASSUME_PLAIN_WRITES_ATOMIC) does not count as plain
        if hb.ACTIVE:
            hb.access(hb.WRITE_ONCE, "mmu_invalidate_range", kvm)
        kvm.mmu_invalidate_range_start = INVALID_GPA
        kvm.mmu_invalidate_range_end = INVALID_GPA
    kvm.mmu_word.write()
    traps.emit("invalidate_begin", kvm, in_progress=kvm.mmu_invalidate_in_progress)
    trace_kvm_mmu_invalidate_begin(kvm)


def kvm_mmu_invalidate_range_add(kvm: Vm, start: int, end: int) -> None:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_range_add() (6.8+): the range only grows."""
    lockdep_assert_held_write(kvm.mmu_lock)
    if hb.ACTIVE:
        hb.access(hb.PLAIN_RMW, "mmu_invalidate_range", kvm)
    if "invalidate_range_add_no_widen" in kvm.bugs and kvm.mmu_invalidate_range_start != INVALID_GPA:
        # bug: a later invalidation replaces the accumulated range instead of widening it
        kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end = start, end
    elif kvm.mmu_invalidate_range_start == INVALID_GPA:
        kvm.mmu_invalidate_range_start, kvm.mmu_invalidate_range_end = start, end
    else:
        kvm.mmu_invalidate_range_start = min(kvm.mmu_invalidate_range_start, start)
        kvm.mmu_invalidate_range_end = max(kvm.mmu_invalidate_range_end, end)
    kvm.mmu_word.write()
    traps.emit("invalidate_range_add", kvm, start=start, end=end)
    trace_kvm_mmu_invalidate_range_add(kvm, start, end)


def kvm_mmu_invalidate_end(kvm: Vm) -> None:
    """virt/kvm/kvm_main.c: kvm_mmu_invalidate_end() (6.8+): seq++ before in_progress--."""
    lockdep_assert_held_write(kvm.mmu_lock)
    if hb.ACTIVE:
        hb.access(hb.PLAIN_RMW, "mmu_invalidate_seq", kvm)
    kvm.mmu_invalidate_seq += 1
    if hb.ACTIVE:
        hb.access(hb.PLAIN_RMW, "mmu_invalidate_in_progress", kvm)
    kvm.mmu_invalidate_in_progress -= 1
    kvm.mmu_word.write()
    traps.emit("invalidate_end", kvm, seq=kvm.mmu_invalidate_seq, in_progress=kvm.mmu_invalidate_in_progress)
    trace_kvm_mmu_invalidate_end(kvm)


def mmu_invalidate_retry_gfn(kvm: Vm, mmu_seq: int, gfn: int) -> bool:
    """include/linux/kvm_host.h: mmu_invalidate_retry_gfn() (6.8+), under mmu_lock."""
    lockdep_assert_held(kvm.mmu_lock)
    if hb.ACTIVE:
        for word in ("mmu_invalidate_in_progress", "mmu_invalidate_range", "mmu_invalidate_seq"):
            hb.access(hb.PLAIN_READ, word, kvm)
    return _retry(kvm, mmu_seq, gfn)


def mmu_invalidate_retry_gfn_unsafe(kvm: Vm, mmu_seq: int, gfn: int) -> bool:
    """include/linux/kvm_host.h: mmu_invalidate_retry_gfn_unsafe() (6.8+): lockless pre-check."""
    if hb.ACTIVE:
        # READ_ONCE() of in_progress and seq; start/end are read plainly, and the kernel's comment
        # accepts stale values there (only in_progress's 1->0 matters): counted as marked.
        for word in ("mmu_invalidate_in_progress", "mmu_invalidate_range", "mmu_invalidate_seq"):
            hb.access(hb.READ_ONCE, word, kvm)
    return _retry(kvm, mmu_seq, gfn)


def _retry(kvm: Vm, mmu_seq: int, gfn: int) -> bool:
    if kvm.mmu_invalidate_in_progress:
        if kvm.mmu_invalidate_range_start == INVALID_GPA:
            return True  # the kernel WARNs: begin without range_add
        if kvm.mmu_invalidate_range_start <= gfn < kvm.mmu_invalidate_range_end:
            return True
    return kvm.mmu_invalidate_seq != mmu_seq


async def kvm_mmu_unmap_gfn_range(kvm: Vm, range: GfnRange) -> bool:
    """virt/kvm/kvm_main.c: kvm_mmu_unmap_gfn_range() (6.8+): range_add, then the arch zap."""
    kvm_mmu_invalidate_range_add(kvm, range.start, range.end)
    return await kvm.ops.unmap_gfn_range(kvm, range)


class KvmMmuNotifier:
    """``kvm_mmu_notifier_ops``: host mm invalidations reaching one VM (virt/kvm/kvm_main.c)."""

    def __init__(self, kvm: Vm) -> None:
        self.kvm = kvm

    async def invalidate_range_start(self, start: int, end: int, may_block: bool) -> None:
        """kvm_mmu_notifier_invalidate_range_start() (6.8+)."""
        kvm = self.kvm
        trace_kvm_unmap_hva_range(kvm, start, end)
        await kvm.mn_invalidate_lock.lock()
        kvm.mn_active_invalidate_count += 1
        await kvm.mn_invalidate_lock.unlock()
        locked = False
        idx = await kvm.srcu.read_lock()
        try:
            flush = False
            for slot, gstart, gend in kvm.hva_range_slots(start, end):
                if not locked:
                    locked = True
                    await kvm.mmu_lock.write_lock()
                    kvm_mmu_invalidate_begin(kvm)
                flush |= await kvm_mmu_unmap_gfn_range(kvm, GfnRange(gstart, gend, slot, KVM_FILTER_SHARED, may_block))
            if locked:
                if flush:
                    kvm.ops.flush_remote_tlbs(kvm)
                await kvm.mmu_lock.write_unlock()
        finally:
            await kvm.srcu.read_unlock(idx)

    async def invalidate_range_end(self, start: int, end: int) -> None:
        """kvm_mmu_notifier_invalidate_range_end() (6.8+)."""
        kvm = self.kvm
        idx = await kvm.srcu.read_lock()
        try:
            if any(True for _ in kvm.hva_range_slots(start, end)):
                await kvm.mmu_lock.write_lock()
                kvm_mmu_invalidate_end(kvm)
                await kvm.mmu_lock.write_unlock()
        finally:
            await kvm.srcu.read_unlock(idx)
        await kvm.mn_invalidate_lock.lock()
        kvm.mn_active_invalidate_count -= 1
        wake = kvm.mn_active_invalidate_count == 0
        await kvm.mn_invalidate_lock.unlock()
        if wake:
            await kvm.mn_memslots_update_rcuwait.wake_up()
