"""The AMD secure processor (PSP) firmware and the RMP, as SEV-SNP KVM uses them.

The RMP has one entry per 4K page: shared (hypervisor-owned, the default), pre-guest/firmware
(assigned and immutable: made so before SNP_LAUNCH_UPDATE), or guest-owned (assigned, mutable: made
so by ``sev_gmem_prepare`` on a fault after launch). The launch digest is the SNP ABI's hash chain:
each LAUNCH_UPDATE hashes a 0x70-byte PAGE_INFO block holding the previous digest, the SHA-384 of
the page's contents (for NORMAL pages; zeros for the other types), the page type and the GPA.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...runtime import traps
from ...runtime.failures import Violation

if TYPE_CHECKING:
    from ...kvm.vm import Vm

# include/uapi/linux/psp-sev.h: sev_ret_code
SEV_RET_SUCCESS = 0
SEV_RET_INVALID_PLATFORM_STATE = 0x0001
SEV_RET_INVALID_GUEST_STATE = 0x0002
SEV_RET_INVALID_PARAM = 0x0016
SEV_RET_INVALID_PAGE_STATE = 0x0018
SEV_RET_POLICY_FAILURE = 0x0007

PAGE_TYPE_NORMAL, PAGE_TYPE_VMSA, PAGE_TYPE_ZERO, PAGE_TYPE_UNMEASURED, PAGE_TYPE_SECRETS, PAGE_TYPE_CPUID = (
    1,
    2,
    3,
    4,
    5,
    6,
)
PAGE_INFO_LEN = 0x70
CPUID_ENTRY_SIZE = 48
CPUID_MAX_ENTRIES = 64


@dataclass
class RmpEntry:
    """An assigned RMP entry (shared pages have none)."""

    asid: int
    gpa: int
    immutable: bool
    validated: bool = False


def page_info(digest: bytes, contents: bytes, page_type: int, gpa: int) -> bytes:
    """SNP ABI PAGE_INFO: DIGEST_CUR, CONTENTS, LENGTH, PAGE_TYPE, IMI, VMPL perms, GPA."""
    return digest + contents + struct.pack("<HBBBBBBQ", PAGE_INFO_LEN, page_type, 0, 0, 0, 0, 0, gpa)


class SnpFirmware:
    """The PSP firmware's state for one SNP guest, plus the system RMP (``vm.snp_firmware``)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.name = f"psp(vm{vm.id})"
        self.rmp: dict[int, RmpEntry] = {}
        self.gctx = False
        self.launched = False
        self.finished = False
        self.asid = 1
        self.launch_digest = bytes(48)
        self.launched_gpas: set[int] = set()
        #: bits the firmware refuses in CPUID leaf outputs: (function, register) -> mask
        self.cpuid_forbidden: dict[tuple[int, str], int] = {}

    # -- RMP --------------------------------------------------------------------------------
    def lookup(self, pfn: int) -> RmpEntry | None:
        """snp_lookup_rmpentry(): None for a shared (hypervisor-owned) page."""
        return self.rmp.get(pfn)

    async def rmpupdate_private(self, pfn: int, gpa: int, immutable: bool) -> int:
        """rmp_make_private(): RMPUPDATE to assigned."""
        await traps.point(self)
        if pfn in self.rmp:
            return -22  # -EINVAL: RMPUPDATE on an assigned page
        self.rmp[pfn] = RmpEntry(self.asid, gpa, immutable)
        traps.emit("rmpupdate", self.vm, pfn=pfn, assigned=True, immutable=immutable)
        return 0

    async def rmpupdate_shared(self, pfn: int) -> int:
        """rmp_make_shared(): an immutable (firmware) page must be reclaimed first."""
        await traps.point(self)
        entry = self.rmp.get(pfn)
        if entry is not None and entry.immutable:
            return -22
        self.rmp.pop(pfn, None)
        traps.emit("rmpupdate", self.vm, pfn=pfn, assigned=False)
        return 0

    def check_host_write(self, pfn: int) -> None:
        """A host write to an assigned page takes an RMP #PF on real hardware: a model bug."""
        if pfn in self.rmp:
            raise Violation(
                "rmp_host_write",
                f"host write to pfn {pfn:#x}, which the RMP assigns to the guest",
                signature="rmp_host_write",
                pfn=pfn,
            )

    # -- firmware commands --------------------------------------------------------------------
    async def snp_gctx_create(self) -> int:
        await traps.point(self)
        self.gctx = True
        return SEV_RET_SUCCESS

    async def snp_launch_start(self, policy: int) -> int:
        await traps.point(self)
        if not self.gctx or self.launched:
            return SEV_RET_INVALID_GUEST_STATE
        self.launched = True
        return SEV_RET_SUCCESS

    async def snp_launch_update(self, pfn: int, gpa: int, page_type: int, contents: bytes) -> tuple[int, bytes | None]:
        """SNP_LAUNCH_UPDATE: the page must be pre-guest (assigned, immutable) and not launched.

        Returns (status, corrected CPUID page or None). A CPUID page with refused bits fails with
        INVALID_PARAM and the firmware writes the corrected table back into the page. On success
        the page goes Pre-Guest -> Guest-Valid (SNP ABI: assigned, validated, *not* immutable),
        so sev.c: sev_gmem_invalidate() can RMPUPDATE it back to shared when guest_memfd frees
        it (PUNCH_HOLE before LAUNCH_FINISH, or teardown) without SNP_PAGE_RECLAIM.
        """
        await traps.point(self)
        if not self.launched or self.finished:
            return SEV_RET_INVALID_GUEST_STATE, None
        entry = self.rmp.get(pfn)
        if entry is None or not entry.immutable or entry.validated:
            return SEV_RET_INVALID_PAGE_STATE, None
        if gpa in self.launched_gpas:
            raise Violation(
                "snp_double_launch",
                f"gpa {gpa:#x} launched twice",
                signature="snp_double_launch",
                gpa=gpa,
            )
        if page_type == PAGE_TYPE_CPUID:
            corrected = self._check_cpuid(contents)
            if corrected is not None:
                return SEV_RET_INVALID_PARAM, corrected
        measured = hashlib.sha384(contents).digest() if page_type in (PAGE_TYPE_NORMAL, PAGE_TYPE_VMSA) else bytes(48)
        self.launch_digest = hashlib.sha384(page_info(self.launch_digest, measured, page_type, gpa)).digest()
        entry.validated = True
        entry.immutable = False
        self.launched_gpas.add(gpa)
        traps.emit("snp_launch_update", self.vm, gpa=gpa, type=page_type)
        return SEV_RET_SUCCESS, None

    def _check_cpuid(self, page: bytes) -> bytes | None:
        count = struct.unpack_from("<I", page, 0)[0]
        fixed = bytearray(page)
        bad = count > CPUID_MAX_ENTRIES
        count = min(count, CPUID_MAX_ENTRIES)
        struct.pack_into("<I", fixed, 0, count)
        for i in range(count):
            off = 16 + i * CPUID_ENTRY_SIZE
            fn = struct.unpack_from("<I", page, off)[0]
            for r, reg in enumerate(("eax", "ebx", "ecx", "edx")):
                mask = self.cpuid_forbidden.get((fn, reg), 0)
                value = struct.unpack_from("<I", page, off + 24 + 4 * r)[0]
                if value & mask:
                    bad = True
                    struct.pack_into("<I", fixed, off + 24 + 4 * r, value & ~mask)
        return bytes(fixed) if bad else None

    async def snp_page_reclaim(self, pfn: int) -> int:
        """SNP_PAGE_RECLAIM: a firmware page becomes reclaimable (assigned, mutable)."""
        await traps.point(self)
        entry = self.rmp.get(pfn)
        if entry is None:
            return SEV_RET_INVALID_PAGE_STATE
        entry.immutable = False
        entry.validated = False
        return SEV_RET_SUCCESS

    async def snp_launch_finish(self) -> int:
        await traps.point(self)
        if not self.launched or self.finished:
            return SEV_RET_INVALID_GUEST_STATE
        self.finished = True
        return SEV_RET_SUCCESS
