"""Memslots: the gfn -> (hva, guest_memfd) map, published RCU-style and updated under slots_lock.

A ``Memslots`` object is never changed once published: an update builds a new one and swaps the
VM's pointer, so a reader inside an SRCU read section keeps using the array it loaded until it
leaves. Deletion and moves first publish an INVALID copy of the slot, wait for every SRCU reader
(``synchronize_srcu``), zap, and only then free the old slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..intervals import IntervalMap
from ..runtime.failures import Violation
from ..uapi import KVM_MEM_GUEST_MEMFD, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .guest_memfd import GuestMemfd

KVM_MEMSLOT_INVALID = 1 << 16


@dataclass(eq=False)
class Memslot:
    """``struct kvm_memory_slot``."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    gmem_file: GuestMemfd | None = None  # slot->gmem.file (NULL once unbound or released)
    gmem_pgoff: int = 0
    #: KVM_MEMSLOT_INVALID: being deleted or moved
    invalid: bool = False
    #: kvm_free_memslot() ran: any later use is a use-after-free
    freed: bool = False
    #: the slot this one is an INVALID copy of
    original: Memslot | None = field(default=None, repr=False)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """__gfn_to_hva_memslot()"""
        return self.userspace_addr + (gfn - self.base_gfn) * PAGE_SIZE

    def gfn_to_pgoff(self, gfn: int) -> int:
        """kvm_gmem_get_index()"""
        return gfn - self.base_gfn + self.gmem_pgoff

    def has_gmem(self) -> bool:
        """kvm_slot_has_gmem() (formerly kvm_slot_can_be_private())"""
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def check_live(self, what: str) -> None:
        """Lifetime oracle: nothing may use a slot after kvm_free_memslot()."""
        if self.freed:
            raise Violation(
                "memslot_uaf",
                f"{what} used memslot {self.id} after it was freed",
                signature=f"memslot_uaf:{what}",
                slot=self.id,
            )

    def invalid_copy(self) -> Memslot:
        return replace(self, invalid=True, original=self)

    def __repr__(self) -> str:
        state = " INVALID" if self.invalid else ""
        return f"<Memslot {self.as_id}:{self.id} gfn {self.base_gfn:#x}+{self.npages:#x}{state}>"

    @property
    def name(self) -> str:
        return f"memslot{self.id}"


class Memslots:
    """``struct kvm_memslots`` of one address space: immutable once published."""

    def __init__(self, as_id: int, generation: int, slots: dict[int, Memslot]) -> None:
        self.as_id = as_id
        self.generation = generation
        self.by_id = slots
        self.gfn_map: IntervalMap[Memslot] = IntervalMap()
        for slot in slots.values():
            self.gfn_map.assign(slot.base_gfn, slot.end_gfn, slot)

    def lookup(self, gfn: int) -> Memslot | None:
        """__gfn_to_memslot()"""
        return self.gfn_map.get(gfn)

    def overlapping(self, start: int, end: int) -> list[Memslot]:
        return [s for _a, _b, s in self.gfn_map.overlaps_unclipped(start, end)]

    def with_slot(self, slot: Memslot, generation: int, replaces: Memslot | None = None) -> Memslots:
        slots = dict(self.by_id)
        if replaces is not None:
            slots.pop(replaces.id, None)
        slots[slot.id] = slot
        return Memslots(self.as_id, generation, slots)

    def without(self, slot: Memslot, generation: int) -> Memslots:
        slots = {k: v for k, v in self.by_id.items() if v is not slot}
        return Memslots(self.as_id, generation, slots)

    def hva_overlapping(self, start: int, end: int) -> list[tuple[Memslot, int, int]]:
        """kvm_for_each_memslot_in_hva_range(): (slot, gfn start, gfn end) for [start, end)."""
        out = []
        for slot in self.by_id.values():
            s_start = slot.userspace_addr
            s_end = s_start + (slot.npages << PAGE_SHIFT)
            lo, hi = max(start, s_start), min(end, s_end)
            if lo < hi:
                g0 = slot.base_gfn + ((lo - s_start) >> PAGE_SHIFT)
                g1 = slot.base_gfn + ((hi - s_start + PAGE_SIZE - 1) >> PAGE_SHIFT)
                out.append((slot, g0, g1))
        return out
