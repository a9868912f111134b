"""The VMM's address space: mmap/munmap/madvise, host page tables, GUP and MMU notifiers.

munmap() and madvise(MADV_DONTNEED) bracket the removal of host PTEs with
``invalidate_range_start``/``invalidate_range_end`` into every registered notifier (each VM
using this mm), as ``mmu_notifier_invalidate_range_start/end`` do, while holding mmap_lock for
write. KVM never holds a reference on a page it maps through a memslot; the notifier is all that
stops it from mapping a freed page.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

from .. import uapi
from ..intervals import IntervalMap
from ..runtime import traps
from ..runtime.failures import Violation
from ..runtime.sync import RWSem, might_sleep
from .pages import PAGE_SIZE, Folio, PageAllocator

#: Host mappings start here (page number), like a typical x86-64 mmap base.
MMAP_BASE_PAGE = 0x7F0000000


class MmuNotifier(Protocol):
    """What a VM registers with the mm (``struct mmu_notifier_ops``, the parts modeled)."""

    async def invalidate_range_start(self, start: int, end: int, may_block: bool) -> None: ...
    async def invalidate_range_end(self, start: int, end: int) -> None: ...


@dataclass(frozen=True)
class Vma:
    """An anonymous mapping; `page_order` > 0 models THP/hugetlb backing."""

    start: int  # page number
    end: int
    prot: int
    page_order: int


class UserAddr(int):
    """An address returned by mmap(); awaitable too, so `await mm.mmap(n)` and `mm.mmap(n)` agree."""

    def __await__(self) -> Generator[Any, None, UserAddr]:
        return self
        yield  # pragma: no cover - makes this a generator


class Mm:
    """``struct mm_struct`` of the VMM process (``kvm.mm``)."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.mmap_lock = RWSem("mm->mmap_lock")
        self.vmas: IntervalMap[Vma] = IntervalMap()
        #: page number -> folio mapped there (a folio's pages map at consecutive page numbers)
        self.ptes: IntervalMap[tuple[Folio, int]] = IntervalMap()
        self.notifiers: list[MmuNotifier] = []
        self._next = MMAP_BASE_PAGE
        #: pfns whose host writes must fault (SNP: RMP-private pages), maintained by the firmware model
        self.write_protected: IntervalMap[str] = IntervalMap()

    # -- notifier registration ------------------------------------------------------------
    def register_notifier(self, notifier: MmuNotifier) -> None:
        """mmu_notifier_register()"""
        self.notifiers.append(notifier)

    def unregister_notifier(self, notifier: MmuNotifier) -> None:
        if notifier in self.notifiers:
            self.notifiers.remove(notifier)

    # -- mappings -------------------------------------------------------------------------
    def mmap(
        self, length: int, *, prot: int = uapi.PROT_READ | uapi.PROT_WRITE, page_size: int = PAGE_SIZE
    ) -> UserAddr:
        """Map anonymous memory; returns the address. `page_size` 2 MiB or 1 GiB models huge pages."""
        if length <= 0:
            raise uapi.KvmError(uapi.EINVAL, "mmap length must be positive")
        if page_size not in (PAGE_SIZE, 512 * PAGE_SIZE, 512 * 512 * PAGE_SIZE):
            raise uapi.KvmError(uapi.EINVAL, "page_size must be 4 KiB, 2 MiB or 1 GiB")
        npages_per = page_size // PAGE_SIZE
        pages = (length + page_size - 1) // page_size * npages_per
        start = (self._next + npages_per - 1) // npages_per * npages_per
        self._next = start + pages + npages_per  # a guard gap between mappings
        self.vmas.assign(start, start + pages, Vma(start, start + pages, prot, npages_per.bit_length() - 1))
        return UserAddr(start * PAGE_SIZE)

    def _range(self, addr: int, length: int) -> tuple[int, int]:
        if addr % PAGE_SIZE or length <= 0:
            raise uapi.KvmError(uapi.EINVAL, "address must be page aligned and length positive")
        return addr // PAGE_SIZE, (addr + length + PAGE_SIZE - 1) // PAGE_SIZE

    async def munmap(self, addr: int, length: int) -> None:
        """munmap(): notifiers see the range before the pages go, then the VMAs go too."""
        start, end = self._range(addr, length)
        await self.mmap_lock.down_write()
        try:
            await self._zap(start, end)
            self.vmas.clear(start, end)
        finally:
            await self.mmap_lock.up_write()

    async def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(): MADV_DONTNEED/MADV_REMOVE drop the pages (next touch gets zeros)."""
        start, end = self._range(addr, length)
        if advice in (uapi.MADV_DONTNEED, uapi.MADV_REMOVE, uapi.MADV_FREE):
            await self.mmap_lock.down_read()
            try:
                if not self.vmas.any_overlap(start, end):
                    raise uapi.KvmError(uapi.ENOMEM, "madvise range is not mapped")
                await self._zap(start, end)
            finally:
                await self.mmap_lock.up_read()
        elif advice in (
            uapi.MADV_NORMAL,
            uapi.MADV_RANDOM,
            uapi.MADV_SEQUENTIAL,
            uapi.MADV_WILLNEED,
            uapi.MADV_HUGEPAGE,
            uapi.MADV_NOHUGEPAGE,
            uapi.MADV_DONTFORK,
            uapi.MADV_DOFORK,
            uapi.MADV_DONTDUMP,
            uapi.MADV_DODUMP,
        ):
            await traps.point(self.mmap_lock)
        else:
            raise uapi.KvmError(uapi.EINVAL, f"madvise advice {advice} is not modeled")

    async def _zap(self, start: int, end: int) -> None:
        """zap_page_range_single(): notifier start, clear PTEs, put the pages, notifier end."""
        # A huge folio partly inside the range is split off whole, as THP splits before a zap.
        for s, e, _hit in self.ptes.overlaps_unclipped(start, end):
            start, end = min(start, s), max(end, e)
        addr, hi = start * PAGE_SIZE, end * PAGE_SIZE
        for n in list(self.notifiers):
            await n.invalidate_range_start(addr, hi, True)
        victims = {id(f): f for _s, _e, (f, _b) in self.ptes.overlaps(start, end)}
        self.ptes.clear(start, end)
        for folio in victims.values():
            self.allocator.put(folio)
        traps.emit("host_zap", None, start=addr, end=hi, pages_freed=len(victims))
        for n in list(self.notifiers):
            await n.invalidate_range_end(addr, hi)

    # -- faults and GUP -------------------------------------------------------------------
    async def _fault(self, page: int) -> tuple[Folio, int]:
        """handle_mm_fault() under mmap_lock (read): map a zeroed folio if nothing is there."""
        hit = self.ptes.get(page)
        if hit is not None:
            folio, base = hit
            return folio, folio.pfn + page - base
        vma = self.vmas.get(page)
        if vma is None:
            raise uapi.KvmError(uapi.EFAULT, f"no mapping at {page * PAGE_SIZE:#x}")
        might_sleep("handle_mm_fault()")
        await traps.point(self.mmap_lock)  # the page allocator may sleep
        npages = 1 << vma.page_order
        base = page // npages * npages
        new = self.allocator.alloc(npages, "anon")
        if new is None:
            raise uapi.KvmError(uapi.ENOMEM, "out of memory faulting in a host page")
        new.zero()
        # Under the PTE lock again (pte_same() in do_anonymous_page()): if another fault mapped
        # a page meanwhile, use that one and free ours.
        hit = self.ptes.get(page)
        if hit is not None:
            self.allocator.put(new)
            folio, hbase = hit
            return folio, folio.pfn + page - hbase
        if self.vmas.get(page) is None:
            self.allocator.put(new)
            raise uapi.KvmError(uapi.EFAULT, f"mapping at {page * PAGE_SIZE:#x} went away")
        self.ptes.assign(base, base + npages, (new, base))
        return new, new.pfn + page - base

    async def get_user_page(self, addr: int, write: bool = False) -> tuple[Folio, int]:
        """get_user_pages() of one page: fault it in and return (folio, pfn) with a reference held."""
        page = addr // PAGE_SIZE
        await self.mmap_lock.down_read()
        try:
            folio, pfn = await self._fault(page)
            self.allocator.get(folio)
        finally:
            await self.mmap_lock.up_read()
        return folio, pfn

    def host_mapping_pages(self, addr: int) -> int:
        """Pages in the host mapping that covers `addr` (host_pfn_mapping_level): 1, 512 or 262144."""
        hit = self.ptes.get(addr // PAGE_SIZE)
        return hit[0].npages if hit is not None else 1

    def is_mapped(self, addr: int) -> bool:
        return self.vmas.get(addr // PAGE_SIZE) is not None

    # -- the VMM touching its own memory ----------------------------------------------------
    async def write(self, addr: int, data: bytes) -> None:
        """A userspace store (memcpy into the mapping): faults pages in as needed."""
        await self.mmap_lock.down_read()
        try:
            pos = 0
            while pos < len(data):
                a = addr + pos
                page, off = divmod(a, PAGE_SIZE)
                folio, pfn = await self._fault(page)
                self._check_host_write(pfn)
                n = min(PAGE_SIZE - off, len(data) - pos)
                folio.write_page(pfn - folio.pfn, off, data[pos : pos + n])
                pos += n
        finally:
            await self.mmap_lock.up_read()

    async def read(self, addr: int, length: int) -> bytes:
        """A userspace load from the mapping."""
        out = bytearray()
        await self.mmap_lock.down_read()
        try:
            pos = 0
            while pos < length:
                a = addr + pos
                page, off = divmod(a, PAGE_SIZE)
                folio, pfn = await self._fault(page)
                n = min(PAGE_SIZE - off, length - pos)
                out += folio.read_page(pfn - folio.pfn)[off : off + n]
                pos += n
        finally:
            await self.mmap_lock.up_read()
        return bytes(out)

    def _check_host_write(self, pfn: int) -> None:
        owner = self.write_protected.get(pfn)
        if owner is not None:
            raise Violation(
                "rmp_host_write",
                f"host write to pfn {pfn:#x}, which the RMP assigns to {owner} (an RMP #PF on real hardware)",
                signature="rmp_host_write",
                pfn=pfn,
            )

    def read_sync(self, addr: int, length: int) -> bytes:
        """Read without scheduling (for oracles and reports): unmapped or absent pages read as zero."""
        out = bytearray()
        for a in range(addr, addr + length, PAGE_SIZE):
            hit = self.ptes.get(a // PAGE_SIZE)
            if hit is None:
                out += bytes(PAGE_SIZE)
            else:
                folio, base = hit
                out += folio.read_page(a // PAGE_SIZE - base)
        return bytes(out[:length])
