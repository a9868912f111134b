"""Physical memory: folios with pfns, reference counts, contents, and a memory of freed pfns.

Pfns are handed out in increasing order and never reused, so a pfn that a stale mapping still
holds names exactly the folio it used to belong to: "mapped after free" is unambiguous. Lookups
go through an interval map of pfn ranges, so a 1 GiB folio costs one entry, not 262144.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..intervals import IntervalMap
from ..runtime import traps
from ..runtime.failures import Violation
from ..runtime.tracepoint import Tracepoint

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)

#: include/trace/events/kmem.h: mm_page_free (allocator, folio), fired when the last reference
#: goes, before the owner's free hook (e.g. guest_memfd's free_folio)
trace_mm_page_free = Tracepoint("mm_page_free")
#: mm/memory.c: finish_fault() of a file page (mm, addr, file, pgoff, folio): the host PTE is set
trace_mm_file_fault = Tracepoint("mm_file_fault")
#: a userspace load/store (mm, addr, folio, pfn, write) reaching a page that is not anonymous
#: (fired by host/mm.py; the model's stand-in for the access itself, which has no kernel hook)
trace_mm_host_access = Tracepoint("mm_host_access")


class Folio:
    """A naturally aligned run of 2^order pages with one reference count and one set of flags."""

    __slots__ = (
        "data",
        "freed",
        "hwpoison",
        "initialized",
        "lock",
        "npages",
        "on_free",
        "owner",
        "pfn",
        "refcount",
        "uptodate",
    )

    def __init__(self, pfn: int, npages: int, owner: str) -> None:
        self.pfn = pfn
        self.npages = npages
        self.refcount = 1
        self.freed = False
        #: who allocated it ("anon", "guest_memfd", ...): for reports
        self.owner = owner
        #: PG_uptodate (guest_memfd gives it its own meaning per kernel profile)
        self.uptodate = False
        self.hwpoison = False
        #: False until zeroed or fully written: reading it then exposes stale host data
        self.initialized = False
        #: page index within the folio -> contents (missing = zeros, once initialized)
        self.data: dict[int, bytes] = {}
        #: called once when the last reference goes (the arch free_folio hook, e.g. SNP)
        self.on_free: Callable[[Folio], None] | None = None
        #: the folio lock (PG_locked), created by the first user that needs it
        self.lock: Any = None

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"ref={self.refcount}"
        return f"<Folio pfn={self.pfn:#x}+{self.npages} {self.owner} {state}>"

    def contains(self, pfn: int) -> bool:
        return self.pfn <= pfn < self.pfn + self.npages

    def zero(self) -> None:
        """clear_highpage() over the folio."""
        self.data.clear()
        self.initialized = True

    def read_page(self, index: int) -> bytes:
        return self.data.get(index, ZERO_PAGE)

    def write_page(self, index: int, offset: int, chunk: bytes) -> None:
        page = bytearray(self.data.get(index, ZERO_PAGE))
        page[offset : offset + len(chunk)] = chunk
        self.data[index] = bytes(page)

    def fill_page(self, index: int, contents: bytes) -> None:
        """Write a whole page (e.g. a populate copy): the page is fully defined afterwards."""
        assert len(contents) == PAGE_SIZE
        if contents == ZERO_PAGE:
            self.data.pop(index, None)
        else:
            self.data[index] = contents
        if self.npages == 1:
            self.initialized = True


class PageAllocator:
    """Hands out folios and keeps every folio it ever allocated, live or freed, by pfn."""

    def __init__(self, base_pfn: int = 0x100000) -> None:
        self._next = base_pfn
        self._by_pfn: IntervalMap[Folio] = IntervalMap()
        self.live_pages = 0
        self.allocated = 0
        self.freed = 0

    def alloc(self, npages: int = 1, owner: str = "anon") -> Folio | None:
        """A new folio with one reference, or None if this allocation fails (a recorded choice)."""
        if traps.draw("alloc_fail", 0.0):
            return None
        # Natural alignment, as the buddy allocator gives large folios.
        pfn = (self._next + npages - 1) // npages * npages
        self._next = pfn + npages
        folio = Folio(pfn, npages, owner)
        self._by_pfn.assign(pfn, pfn + npages, folio)
        self.live_pages += npages
        self.allocated += 1
        traps.emit("folio_alloc", None, pfn=pfn, npages=npages, owner=owner)
        return folio

    def get(self, folio: Folio) -> None:
        """folio_get(): only on a live folio (a get after free is a use-after-free)."""
        if folio.freed:
            raise Violation(
                "use_after_free",
                f"reference taken on freed folio pfn {folio.pfn:#x} ({folio.owner})",
                signature=f"use_after_free:folio_get:{folio.owner}",
                pfn=folio.pfn,
            )
        folio.refcount += 1

    def put(self, folio: Folio) -> None:
        """folio_put(): the last reference frees the folio (running its free hook)."""
        if folio.freed or folio.refcount <= 0:
            raise Violation(
                "use_after_free",
                f"reference dropped on freed folio pfn {folio.pfn:#x} ({folio.owner})",
                signature=f"use_after_free:folio_put:{folio.owner}",
                pfn=folio.pfn,
            )
        folio.refcount -= 1
        if folio.refcount == 0:
            folio.freed = True
            self.live_pages -= folio.npages
            self.freed += 1
            traps.emit("folio_free", None, pfn=folio.pfn, npages=folio.npages, owner=folio.owner)
            trace_mm_page_free(self, folio)
            if folio.on_free is not None:
                hook, folio.on_free = folio.on_free, None
                hook(folio)

    def folio_at(self, pfn: int) -> Folio | None:
        """The folio `pfn` belongs or belonged to."""
        return self._by_pfn.get(pfn)

    def is_freed(self, pfn: int) -> bool:
        folio = self._by_pfn.get(pfn)
        return folio is None or folio.freed

    def folios(self) -> Iterator[Folio]:
        """Every folio this allocator ever handed out, live or freed, in pfn order (for the
        oracles' quiescence checks: the allocator is the only record of a folio nobody holds)."""
        for _s, _e, folio in self._by_pfn.items():
            yield folio

    def stats(self) -> dict[str, Any]:
        return {"live_pages": self.live_pages, "folios_allocated": self.allocated, "folios_freed": self.freed}
