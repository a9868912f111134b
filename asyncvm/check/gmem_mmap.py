"""The oracles of host-mapped guest_memfd (6.18 GUEST_MEMFD_FLAG_MMAP, and the in-place conversion
design): what the VMM's own page tables may point at.

- **No host mapping of private memory** (``gmem_host_private``): a host PTE of a guest_memfd page
  exists only while the page is shared with the host: the file is INIT_SHARED (6.18) or the page's
  shareability says shared (in-place conversion), and the hardware does not hold the pfn private
  (assigned in the SNP RMP, mapped in a TDX Secure-EPT).
  Checked when a host PTE is set, when the host touches the page, when a range turns private, and
  at quiescence.
- **No host access to a freed folio** (``gmem_host_freed``): a host PTE never outlives the folio's
  place in the guest_memfd page cache. Checked when a folio is truncated (every host PTE of it must
  already be gone), when the host touches a page (the folio must be live and still the file's),
  and at quiescence.

Invalidation balance across the new paths (the host fault, truncation's unmap, conversion) is the
memory-model oracles' begin/end rule (invariants.py): the new paths announce through the same
tracepoints. The lock order with ``mm->mmap_lock`` in it is lockdep's (runtime/lockdep.py).

They watch host/pages.py's mm tracepoints and kvm/trace.py's guest_memfd tracepoints; one set of
oracles per host address space (``kvm.mm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..host.pages import Folio, trace_mm_file_fault, trace_mm_host_access
from ..kvm import trace as kvm_trace
from ..kvm.guest_memfd import GmemInode, GuestMemfd, kvm_gmem_is_shared_mem
from ..runtime import traps
from ..runtime.failures import Violation
from ..uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE
from .registry import Registry, watched

if TYPE_CHECKING:
    from ..host.mm import Mm, Vma
    from ..kvm.vm import Vm


def _private(where: str, detail: str, **data: Any) -> Violation:
    return Violation("gmem_host_private", f"host {where} {detail}", signature=f"gmem_host_private:{where}", **data)


def _freed(where: str, detail: str, **data: Any) -> Violation:
    return Violation("gmem_host_freed", f"host {where} {detail}", signature=f"gmem_host_freed:{where}", **data)


def _hardware_owner(vm: Vm, pfn: int) -> str | None:
    """Whether the hardware holds `pfn` private for `vm`: assigned in the SNP RMP, or mapped in the
    TDX S-EPT (the host touching it would fault, or corrupt the guest)."""
    firmware = vm.snp_firmware
    if firmware is not None and firmware.lookup(pfn) is not None:
        return f"the RMP assigns to {vm.name}"
    module = vm.tdx_module
    if module is not None and any(leaf.pfn == pfn for leaf in module.sept.values()):
        return f"{vm.name}'s Secure-EPT maps"
    return None


class GmemMmapOracles:
    """The host-mapping oracles of one VMM address space."""

    def __init__(self, mm: Mm) -> None:
        self.mm = watched(mm)  # a weak proxy in live mode: the registry must not keep the mm alive
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    # -- the checks -----------------------------------------------------------------------
    def _check_shared(self, where: str, inode: GmemInode, index: int, folio: Folio) -> None:
        if not kvm_gmem_is_shared_mem(inode, index):
            raise _private(
                where,
                f"maps guest_memfd page {index:#x} (pfn {folio.pfn:#x}), which is private to the guest",
                index=index,
                pfn=folio.pfn,
            )
        for file in inode.files:
            owner = _hardware_owner(file.vm, folio.pfn)
            if owner is not None:
                raise _private(where, f"maps pfn {folio.pfn:#x}, which {owner}", pfn=folio.pfn)

    def _check_cached(self, where: str, inode: GmemInode, index: int, folio: Folio) -> None:
        if folio.freed:
            raise _freed(where, f"reaches freed pfn {folio.pfn:#x} (guest_memfd page {index:#x})", pfn=folio.pfn)
        if inode.folios.get(index) is not folio:
            raise _freed(
                where,
                f"reaches pfn {folio.pfn:#x}, which guest_memfd page {index:#x} no longer holds (truncated)",
                index=index,
                pfn=folio.pfn,
            )

    def _file_page(self, addr: int) -> tuple[GmemInode, int] | None:
        vma = self.mm.vma_at(addr)
        if vma is None or not isinstance(vma.file, GuestMemfd):
            return None
        page = addr // PAGE_SIZE
        return vma.file.inode, vma.pgoff + page - vma.start

    def _mapped_pages(self, vma: Vma, start: int, end: int) -> list[tuple[int, Folio]]:
        """(page offset, folio) of every host PTE of `vma` over file pages [start, end)."""
        mm = self.mm
        lo = max(vma.start, vma.start + start - vma.pgoff)
        hi = min(vma.end, vma.start + end - vma.pgoff)
        out = []
        for s, e, (folio, _base) in mm.ptes.overlaps(lo, hi) if lo < hi else ():
            for page in range(s, e):
                if mm.vmas.get(page) is vma:
                    out.append((vma.pgoff + page - vma.start, folio))
        return out

    # -- probes ---------------------------------------------------------------------------
    def file_fault(self, addr: int, file: Any, pgoff: int, folio: Folio) -> None:
        """finish_fault() set a host PTE of a guest_memfd page."""
        if isinstance(file, GuestMemfd):
            self._check_cached("fault", file.inode, pgoff, folio)
            self._check_shared("fault", file.inode, pgoff, folio)

    def host_access(self, addr: int, folio: Folio, pfn: int, write: bool) -> None:
        """The VMM loads or stores through a file mapping."""
        hit = self._file_page(addr)
        if hit is not None:
            inode, index = hit
            self._check_cached("access", inode, index, folio)
            self._check_shared("access", inode, index, folio)

    def truncated(self, vma: Vma, index: int, folio: Folio) -> None:
        """A folio left the page cache: no host PTE of it may be left."""
        for page_index, mapped in self._mapped_pages(vma, index, index + 1):
            if mapped is folio:
                raise _freed(
                    "pte",
                    f"still maps pfn {folio.pfn:#x} after guest_memfd page {page_index:#x} was truncated",
                    index=page_index,
                    pfn=folio.pfn,
                )

    def made_private(self, vma: Vma, start: int, end: int) -> None:
        """Pages [start, end) became private: no host PTE of them may be left."""
        for index, folio in self._mapped_pages(vma, start, end):
            raise _private(
                "pte", f"still maps guest_memfd page {index:#x} (pfn {folio.pfn:#x}) after it became private"
            )

    def at_quiescence(self) -> None:
        """Every host PTE of a guest_memfd mapping maps the file's live, shared folio."""
        mm = self.mm
        seen: set[int] = set()
        for _s, _e, vma in mm.vmas.items():
            if id(vma) in seen or not isinstance(vma.file, GuestMemfd):
                continue
            seen.add(id(vma))
            inode = vma.file.inode
            for index, folio in self._mapped_pages(vma, vma.pgoff, vma.pgoff + vma.end - vma.start):
                self._check_cached("pte", inode, index, folio)
                self._check_shared("pte", inode, index, folio)


#: one set per host address space
ORACLES: Registry[GmemMmapOracles] = Registry()


def _on_create_vm(vm: Vm) -> None:
    mm = vm.kvm.mm
    if ORACLES.get(mm) is None:
        ORACLES.add(mm, GmemMmapOracles(mm))


def _on_truncate(inode: GmemInode, index: int, folio: Folio) -> None:
    for mm, vma in list(inode.i_mmap):
        oracles = ORACLES.get(mm)
        if oracles is not None:
            oracles.truncated(vma, index, folio)


def _on_set_attributes(inode: GmemInode, start: int, end: int, attributes: int) -> None:
    if not attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE:
        return
    for mm, vma in list(inode.i_mmap):
        oracles = ORACLES.get(mm)
        if oracles is not None:
            oracles.made_private(vma, start, end)


def attach() -> None:
    """Register the host-mapping oracles' probes (once)."""
    ORACLES.attach(
        [
            (kvm_trace.trace_kvm_create_vm, _on_create_vm),
            (trace_mm_file_fault, ORACLES.probe(GmemMmapOracles.file_fault)),
            (trace_mm_host_access, ORACLES.probe(GmemMmapOracles.host_access)),
            (kvm_trace.trace_kvm_gmem_truncate_folio, _on_truncate),
            (kvm_trace.trace_kvm_gmem_set_attributes, _on_set_attributes),
        ]
    )
