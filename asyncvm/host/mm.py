"""The VMM's address space: mmap/munmap/madvise, host page tables, GUP and MMU notifiers.

munmap() and madvise(MADV_DONTNEED) bracket the removal of host PTEs with
``invalidate_range_start``/``invalidate_range_end`` into every registered notifier (each VM
using this mm), as ``mmu_notifier_invalidate_range_start/end`` do, while holding mmap_lock for
write. KVM never holds a reference on a page it maps through a memslot; the notifier is all that
stops it from mapping a freed page.

A file can be mapped too (``mmap(length, fd=file, shared=True)``, for guest_memfd since 6.18): the
VMA keeps a reference on the file and the file's ``i_mmap`` lists the VMAs that map it, so the
file can unmap its pages from every process (``unmap_mapping_range``). A fault on such a VMA asks
the file's fault handler for the page (``vm_ops->fault``), which either returns it locked with a
reference for the PTE (VM_FAULT_LOCKED) or answers SIGBUS; a userspace access then raises
``SigBus``, GUP fails with -EFAULT.
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
from .pages import PAGE_SIZE, Folio, PageAllocator, trace_mm_file_fault, trace_mm_host_access

#: Host mappings start here (page number), like a typical x86-64 mmap base.
MMAP_BASE_PAGE = 0x7F0000000


class MmuNotifier(Protocol):
    """What a VM registers with the mm (``struct mmu_notifier_ops``, the parts modeled)."""

    async def invalidate_range_start(self, start: int, end: int, may_block: bool) -> None: ...
    async def invalidate_range_end(self, start: int, end: int) -> None: ...


class SigBus(uapi.KvmError):
    """SIGBUS delivered to the VMM for a userspace access the fault handler refused (VM_FAULT_SIGBUS).

    It is a KvmError(EFAULT) too: the same refused access made by a kernel copy on the VMM's
    behalf (copy_from_user() of an ioctl's source buffer) is -EFAULT, so kernel paths that read
    user memory through the mm see the errno they would get.
    """

    def __init__(self, addr: int, reason: str) -> None:
        super().__init__(uapi.EFAULT, f"SIGBUS at {addr:#x}: {reason}")
        self.addr = addr
        self.reason = reason


class VmFaultSigbus(Exception):
    """A file's fault handler returning VM_FAULT_SIGBUS (the mm turns it into SigBus or -EFAULT)."""


class MappableFile(Protocol):
    """What a file mapped into an mm provides (``file->f_op->mmap`` and ``vma->vm_ops->fault``)."""

    @property
    def i_mmap(self) -> list[tuple[Mm, Vma]]:
        """``mapping->i_mmap``: (mm, vma) of every mapping of this file."""
        ...

    def mmap_check(self, shared: bool) -> None:
        """f_op->mmap(): raise KvmError(errno) to refuse the mapping."""
        ...

    def get_file_active(self) -> Any:
        """get_file(): the VMA's reference (None if the file is already gone)."""
        ...

    async def fput(self, *, returning_to_user: bool = False) -> None: ...

    async def fault_user_mapping(self, pgoff: int, write: bool) -> Folio:
        """vm_ops->fault(): the page at `pgoff`, locked, with a reference for the PTE; raises
        VmFaultSigbus."""
        ...


@dataclass(frozen=True)
class Vma:
    """A mapping: anonymous (`page_order` > 0 models THP/hugetlb backing) or of `file` at `pgoff`."""

    start: int  # page number
    end: int
    prot: int
    page_order: int
    #: the mapped file (``vm_file``) and the file page at `start` (``vm_pgoff``); None: anonymous
    file: Any = None
    pgoff: int = 0


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
        self,
        length: int,
        *,
        prot: int = uapi.PROT_READ | uapi.PROT_WRITE,
        page_size: int = PAGE_SIZE,
        fd: MappableFile | None = None,
        offset: int = 0,
        shared: bool = False,
    ) -> UserAddr:
        """Map anonymous memory, or `fd` from `offset` (MAP_SHARED if `shared`); returns the address.
        `page_size` 2 MiB or 1 GiB models huge anonymous pages.

        mmap() holds mmap_lock for write; here it has no scheduling point inside, so no other task
        can see the mapping half-built (what holding the lock guarantees), and it stays callable
        from synchronous set-up code (``await mm.mmap(...)`` works as well).
        """
        length = uapi.check_int(length, "length", "mm.mmap")
        prot = uapi.check_int(prot, "prot", "mm.mmap")
        page_size = uapi.check_int(page_size, "page_size", "mm.mmap")
        if length <= 0:
            raise uapi.KvmError(uapi.EINVAL, "mmap length must be positive")
        if fd is not None:
            return self._mmap_file(length, prot, fd, uapi.check_int(offset, "offset", "mm.mmap"), bool(shared))
        if page_size not in (PAGE_SIZE, 512 * PAGE_SIZE, 512 * 512 * PAGE_SIZE):
            raise uapi.KvmError(uapi.EINVAL, "page_size must be 4 KiB, 2 MiB or 1 GiB")
        npages_per = page_size // PAGE_SIZE
        pages = (length + page_size - 1) // page_size * npages_per
        start = (self._next + npages_per - 1) // npages_per * npages_per
        self._next = start + pages + npages_per  # a guard gap between mappings
        self.vmas.assign(start, start + pages, Vma(start, start + pages, prot, npages_per.bit_length() - 1))
        return UserAddr(start * PAGE_SIZE)

    def _mmap_file(self, length: int, prot: int, fd: MappableFile, offset: int, shared: bool) -> UserAddr:
        """mm/mmap.c: do_mmap() of a file: offset checks, then the file's own ->mmap, then the VMA."""
        if not hasattr(fd, "fault_user_mapping"):
            raise uapi.KvmError(uapi.EBADF, "not a mappable open file")
        if offset < 0 or offset % PAGE_SIZE:
            raise uapi.KvmError(uapi.EINVAL, "mmap offset must be page aligned")
        # fdget(): a closed fd is EBADF even while a mapping still holds the file
        file = None if getattr(fd, "fd_closed", False) else fd.get_file_active()
        if file is None:
            raise uapi.KvmError(uapi.EBADF, "file is closed")
        try:
            file.mmap_check(shared)
        except BaseException:
            file.refcount -= 1  # fput() of a reference that is not the last one
            raise
        pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        start = self._next
        self._next = start + pages + 1  # a guard gap between mappings
        vma = Vma(start, start + pages, prot, 0, file, offset // PAGE_SIZE)
        self.vmas.assign(start, start + pages, vma)
        file.i_mmap.append((self, vma))
        return UserAddr(start * PAGE_SIZE)

    async def _unlink_file_vmas(self, vmas: list[Vma]) -> None:
        """remove_vma(): each file VMA munmap detached drops its file reference (fput as task
        work: after mmap_lock is released, on the way back to userspace)."""
        for vma in vmas:
            vma.file.i_mmap.remove((self, vma))
            await vma.file.fput(returning_to_user=True)

    def _range(self, addr: int, length: int, call: str) -> tuple[int, int]:
        addr = uapi.check_int(addr, "addr", call)
        length = uapi.check_int(length, "length", call)
        if addr % PAGE_SIZE or length <= 0:
            raise uapi.KvmError(uapi.EINVAL, "address must be page aligned and length positive")
        return addr // PAGE_SIZE, (addr + length + PAGE_SIZE - 1) // PAGE_SIZE

    @traps.syscall
    async def munmap(self, addr: int, length: int) -> None:
        """munmap(): notifiers see the range before the pages go, then the VMAs go too."""
        start, end = self._range(addr, length, "mm.munmap")
        files: list[Vma] = []
        await self.mmap_lock.down_write()
        try:
            await self._zap(start, end)
            files = list({id(v): v for _s, _e, v in self.vmas.overlaps(start, end) if v.file is not None}.values())
            self.vmas.clear(start, end)
            # mm/vma.c: a VMA is detached (and later freed, remove_vma()) by the one munmap that
            # unmaps its last page, decided under mmap_lock: a concurrent munmap of the rest of
            # a split VMA must not free it too.
            files = [vma for vma in files if not any(v is vma for _s, _e, v in self.vmas.overlaps(vma.start, vma.end))]
        finally:
            await self.mmap_lock.up_write()
        if files:
            await self._unlink_file_vmas(files)

    @traps.syscall
    async def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(): MADV_DONTNEED/MADV_REMOVE drop the pages (next touch gets zeros)."""
        start, end = self._range(addr, length, "mm.madvise")
        advice = uapi.check_int(advice, "advice", "mm.madvise")
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
        if vma.file is not None:
            return await self._fault_file(vma, page)
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

    async def _fault_file(self, vma: Vma, page: int) -> tuple[Folio, int]:
        """mm/memory.c: do_shared_fault() -> __do_fault() -> finish_fault(): the file hands over the
        page locked with a reference; the PTE is installed before the page is unlocked, so a
        truncation (which takes the page lock, then unmaps) cannot slip in between."""
        might_sleep("handle_mm_fault()")
        pgoff = vma.pgoff + page - vma.start
        folio = await vma.file.fault_user_mapping(pgoff, True)
        try:
            await traps.point(self.mmap_lock)  # finish_fault(): the PTE lock
            hit = self.ptes.get(page)
            if hit is not None:
                # Another thread's fault mapped it first (pte_none() failed): keep theirs.
                self.allocator.put(folio)
                f, base = hit
                return f, f.pfn + page - base
            if self.vmas.get(page) is not vma:
                self.allocator.put(folio)
                raise uapi.KvmError(uapi.EFAULT, f"mapping at {page * PAGE_SIZE:#x} went away")
            self.ptes.assign(page, page + 1, (folio, page))
            trace_mm_file_fault(self, page * PAGE_SIZE, vma.file, pgoff, folio)
        finally:
            lock = folio.lock
            if lock is not None and lock.held_by_current():
                await lock.unlock()
        return folio, folio.pfn

    async def get_user_page(self, addr: int, write: bool = False) -> tuple[Folio, int]:
        """get_user_pages() of one page: fault it in and return (folio, pfn) with a reference held.
        A page the file refuses (VM_FAULT_SIGBUS) is -EFAULT, as GUP reports it."""
        page = addr // PAGE_SIZE
        await self.mmap_lock.down_read()
        try:
            try:
                folio, pfn = await self._fault(page)
                while folio.owner != "anon" and not self._pte_maps(page, folio):
                    folio, pfn = await self._fault(page)
            except VmFaultSigbus as e:
                raise uapi.KvmError(uapi.EFAULT, f"GUP at {addr:#x}: {e}") from None
            self.allocator.get(folio)
        finally:
            await self.mmap_lock.up_read()
        return folio, pfn

    def _pte_maps(self, page: int, folio: Folio) -> bool:
        """Is `folio` still what the PTE maps? A file fault ends with a scheduling point (the page
        unlock) in which a truncation may zap the new PTE again; the access (or GUP's grab under
        the PTE lock) then faults once more, as hardware would. Anonymous faults end at the PTE."""
        hit = self.ptes.get(page)
        return hit is not None and hit[0] is folio

    def vma_at(self, addr: int) -> Vma | None:
        """find_vma() for exactly `addr` (None if nothing maps it)."""
        return self.vmas.get(addr // PAGE_SIZE)

    async def unmap_file_range(self, vma: Vma, pgoff_start: int, pgoff_end: int) -> int:
        """mm/memory.c: unmap_mapping_range_vma() for one VMA of a file: zap the PTEs of file pages
        [pgoff_start, pgoff_end) it maps (MMU notifiers fire); returns the number of pages zapped.
        Runs under the file's i_mmap lock, not mmap_lock."""
        lo = max(vma.start, vma.start + pgoff_start - vma.pgoff)
        hi = min(vma.end, vma.start + pgoff_end - vma.pgoff)
        if lo >= hi:
            return 0
        n = sum(e - s for s, e, _h in self.ptes.overlaps(lo, hi))
        if n:
            await self._zap(lo, hi)
        return n

    def host_mapping_pages(self, addr: int) -> int:
        """Pages in the host mapping that covers `addr` (host_pfn_mapping_level): 1, 512 or 262144."""
        hit = self.ptes.get(addr // PAGE_SIZE)
        return hit[0].npages if hit is not None else 1

    def is_mapped(self, addr: int) -> bool:
        return self.vmas.get(addr // PAGE_SIZE) is not None

    # -- the VMM touching its own memory ----------------------------------------------------
    async def write(self, addr: int, data: bytes) -> None:
        """A userspace store (memcpy into the mapping): faults pages in as needed."""
        addr = uapi.check_int(addr, "addr", "mm.write")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"mm.write() argument 'data' must be bytes, not {type(data).__name__}")
        data = bytes(data)
        await self.mmap_lock.down_read()
        try:
            pos = 0
            while pos < len(data):
                a = addr + pos
                page, off = divmod(a, PAGE_SIZE)
                folio, pfn = await self._user_fault(page, a)
                self._check_host_write(pfn)
                n = min(PAGE_SIZE - off, len(data) - pos)
                folio.write_page(pfn - folio.pfn, off, data[pos : pos + n])
                pos += n
        finally:
            await self.mmap_lock.up_read()

    async def read(self, addr: int, length: int) -> bytes:
        """A userspace load from the mapping."""
        addr = uapi.check_int(addr, "addr", "mm.read")
        length = uapi.check_int(length, "length", "mm.read")
        out = bytearray()
        await self.mmap_lock.down_read()
        try:
            pos = 0
            while pos < length:
                a = addr + pos
                page, off = divmod(a, PAGE_SIZE)
                folio, pfn = await self._user_fault(page, a, write=False)
                n = min(PAGE_SIZE - off, length - pos)
                out += folio.read_page(pfn - folio.pfn)[off : off + n]
                pos += n
        finally:
            await self.mmap_lock.up_read()
        return bytes(out)

    async def _user_fault(self, page: int, addr: int, write: bool = True) -> tuple[Folio, int]:
        """A userspace access reaching the page: VM_FAULT_SIGBUS becomes the signal. Accesses to a
        file's pages are announced (the oracles check what the host touches)."""
        try:
            folio, pfn = await self._fault(page)
            while folio.owner != "anon" and not self._pte_maps(page, folio):
                folio, pfn = await self._fault(page)
        except VmFaultSigbus as e:
            raise SigBus(addr, str(e)) from None
        if trace_mm_host_access.probes and folio.owner != "anon":
            trace_mm_host_access(self, addr, folio, pfn, write)
        return folio, pfn

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
