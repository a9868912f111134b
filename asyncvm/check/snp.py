"""The SEV-SNP oracles: the RMP agrees with who may touch a page, and the launch digest covers
exactly the pages that stay in the guest (kvm-coco.md section 4).

A private guest access needs an RMP-assigned page, a fault may not RMP-assign a page before
LAUNCH_FINISH (6.11+: that page's LAUNCH_UPDATE would fail), and a freed page may not stay
assigned. They watch the guest-access, prepare and page-free tracepoints and read the RMP.

The measurement oracle: a page LAUNCH_UPDATE hashed into the digest must be the page guest_memfd
holds for that gfn when it is measured (kvm_gmem_populate() keeps PUNCH_HOLE out with the
invalidate lock), and at LAUNCH_FINISH every measured gfn whose page was never freed still maps
it: never another page, which the guest would run as measured content. A page the VMM punched out
after its LAUNCH_UPDATE leaves the rule (whatever is allocated there later is unvalidated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..host.pages import Folio, trace_mm_page_free
from ..kvm import trace as kvm_trace
from ..runtime import traps
from ..runtime.failures import Violation
from ..x86 import trace as x86_trace
from ..x86.sev.snp import sev_snp_guest, to_kvm_sev
from .registry import Registry, watched

if TYPE_CHECKING:
    from ..kvm.vm import Vm


class SnpOracles:
    """The SEV-SNP oracles of one guest."""

    def __init__(self, vm: Vm) -> None:
        self.vm: Vm = watched(vm)
        #: gfn -> pfn of every page in the launch digest
        self.measured: dict[int, int] = {}
        exe = traps.active()
        if exe is not None:
            exe.at_quiescence(self.at_quiescence)

    def _guest_pfn(self, gfn: int) -> int | None:
        """The pfn guest_memfd holds for `gfn` now (None: a hole, or no guest_memfd slot)."""
        slot = self.vm.gfn_to_memslot(gfn)
        file = slot.gmem_file if slot is not None else None
        if file is None:
            return None
        index = slot.gfn_to_pgoff(gfn)  # type: ignore[union-attr]
        for start, _end, folio in file.inode.folios.overlaps_unclipped(index, index + 1):
            return int(folio.pfn) + index - start
        return None

    def populated(self, gfn: int, pfn: int, r: int) -> None:
        """kvm_gmem_populate(): post_populate measured `pfn` for `gfn` (r == 0)."""
        if r != 0 or not to_kvm_sev(self.vm).firmware.launched:
            return
        now = self._guest_pfn(gfn)
        if now != pfn:
            raise Violation(
                "snp_measured_page_gone",
                f"LAUNCH_UPDATE measured pfn {pfn:#x} for gfn {gfn:#x}, but guest_memfd holds "
                f"{'no page' if now is None else f'pfn {now:#x}'} there: the digest covers a page the "
                "guest will never run with (truncated while populate held it)",
                signature="snp_measured_page_gone:populate",
                gfn=gfn,
                pfn=pfn,
            )
        self.measured[gfn] = pfn

    def launch_finish(self) -> None:
        """The digest is final: every measured gfn maps its measured page, or a hole."""
        for gfn, pfn in self.measured.items():
            now = self._guest_pfn(gfn)
            if now is not None and now != pfn:
                raise Violation(
                    "snp_measured_page_gone",
                    f"at LAUNCH_FINISH gfn {gfn:#x} maps pfn {now:#x}, not the measured pfn {pfn:#x}",
                    signature="snp_measured_page_gone:finish",
                    gfn=gfn,
                    pfn=pfn,
                )

    def guest_access(self, gfn: int, pfn: int, private: bool) -> None:
        if private and to_kvm_sev(self.vm).firmware.lookup(pfn) is None:
            raise Violation(
                "rmp_guest_shared",
                f"private guest access to pfn {pfn:#x}, which the RMP says is shared",
                signature="rmp_guest_shared",
                pfn=pfn,
            )

    def prepare(self, pfn: int, gfn: int) -> None:
        vm = self.vm
        if not to_kvm_sev(vm).firmware.finished and not vm.profile.gmem_fallocate_prepares:
            raise Violation(
                "snp_prepare_before_finish",
                f"gfn {gfn:#x} RMP-assigned by a fault before LAUNCH_FINISH",
                signature="snp_prepare_before_finish",
                gfn=gfn,
            )

    def page_freed(self, folio: Folio) -> None:
        """A page the firmware owns can only be reclaimed; freeing it leaks it (RMPUPDATE fails).

        A measured page that is freed (the VMM punched it out) leaves the digest's promise: a page
        allocated there later is not validated by the guest, so the finish rule no longer covers it.
        """
        if self.measured:
            gone = range(folio.pfn, folio.pfn + folio.npages)
            for gfn in [g for g, pfn in self.measured.items() if pfn in gone]:
                del self.measured[gfn]
        rmp = to_kvm_sev(self.vm).firmware.rmp
        for pfn in range(folio.pfn, folio.pfn + folio.npages):
            entry = rmp.get(pfn)
            if entry is not None and entry.immutable:
                raise Violation(
                    "rmp_freed_private",
                    f"pfn {pfn:#x} freed while the RMP still holds it for the firmware",
                    signature="rmp_freed_private",
                    pfn=pfn,
                )

    def at_quiescence(self) -> None:
        """Every freed page is shared in the RMP (the free hook ran)."""
        vm = self.vm
        for pfn in to_kvm_sev(vm).firmware.rmp:
            folio = vm.kvm.allocator.folio_at(pfn)
            if folio is None or folio.freed:
                raise Violation(
                    "rmp_freed_private",
                    f"freed pfn {pfn:#x} is still assigned in the RMP",
                    signature="rmp_freed_private",
                    pfn=pfn,
                )


#: the SNP oracles of every SNP guest alive
ORACLES: Registry[SnpOracles] = Registry()


def _on_create_vm(vm: Vm) -> None:
    if sev_snp_guest(vm):
        ORACLES.add(vm, SnpOracles(vm))


def attach() -> None:
    """Register the SNP oracles' probes (once)."""
    ORACLES.attach(
        [
            (kvm_trace.trace_kvm_create_vm, _on_create_vm),
            (x86_trace.trace_kvm_guest_access, ORACLES.vcpu_probe(SnpOracles.guest_access)),
            (x86_trace.trace_sev_gmem_prepare, ORACLES.probe(SnpOracles.prepare)),
            (kvm_trace.trace_kvm_gmem_populated, ORACLES.probe(SnpOracles.populated)),
            (x86_trace.trace_snp_launch_finish, ORACLES.probe(SnpOracles.launch_finish)),
            (trace_mm_page_free, ORACLES.page_free_probe(SnpOracles.page_freed)),
        ]
    )
