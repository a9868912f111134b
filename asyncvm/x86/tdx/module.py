"""The TDX module: its own state and locks, reached only through SEAMCALLs.

Every SEAMCALL takes the module's internal locks as try-locks (TDR, TDCS epoch, the S-EPT tree,
S-EPT entries), in the order of the lock table in kvm-coco.md section 2.6. Contention never
blocks: the call returns TDX_OPERAND_BUSY with the operand id, and KVM decides what to do. S-EPT
leaves go through the module's states (absent, PENDING after AUG, MAPPED after ADD or ACCEPT,
BLOCKED), and an operation on the wrong state returns the module's error code.

MRTD is the module's SHA-384 computation (section 2.9): PAGE.ADD extends it with a 128-byte block
"MEM.PAGE.ADD" + GPA, MR.EXTEND with "MR.EXTEND" + GPA followed by the 256-byte chunk, and
TDH.MR.FINALIZE freezes the digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...runtime import traps
from ...runtime.failures import Violation
from ...runtime.sync import WRITE, TryLock

if TYPE_CHECKING:
    from ...kvm.vm import Vm

# arch/x86/kvm/vmx/tdx_errno.h: status in bits 63:32, operand id in the low bits
TDX_SUCCESS = 0
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
# TDX module ABI (tdx_error_codes_defs.h; the kernel header dropped it: KVM never expects it)
TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
TDX_OP_STATE_INCORRECT = 0xC000030000000000
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000
TDX_OPERAND_ID_RCX = 0x01
TDX_OPERAND_ID_TDR = 0x80
TDX_OPERAND_ID_SEPT = 0x92
TDX_OPERAND_ID_TD_EPOCH = 0xA9

TDX_EXTENDMR_CHUNKSIZE = 256
PAGE_SIZE = 4096

#: statuses the model's KVM_BUG_ON messages name after the hex value (pr_tdx_error() prints only the
#: hex): ones that mean KVM got a SEAMCALL sequence wrong, not that it lost a try-lock race, so a
#: failure caused by them keeps a signature of its own (the BUSY of a known race stays plain hex)
STATUS_NAMES = {TDX_TLB_TRACKING_NOT_DONE: "TDX_TLB_TRACKING_NOT_DONE"}

SEPT_PENDING = "PENDING"
SEPT_MAPPED = "MAPPED"
SEPT_BLOCKED = "BLOCKED"


def status(code: int) -> int:
    return code & TDX_SEAMCALL_STATUS_MASK


def is_busy(code: int) -> bool:
    return status(code) in (TDX_OPERAND_BUSY, TDX_PREVIOUS_TLB_EPOCH_BUSY)


def describe(code: int) -> str:
    """The status as pr_tdx_error() prints it (hex), followed by its name if it is in `STATUS_NAMES`."""
    name = STATUS_NAMES.get(status(code))
    return f"{code:#x} ({name})" if name else f"{code:#x}"


@dataclass
class SeptLeaf:
    """A 4K S-EPT leaf as the module sees it."""

    pfn: int
    state: str
    added: bool  # PAGE.ADD (part of the initial image) rather than PAGE.AUG
    #: the TD's TLB epoch when TDH.MEM.RANGE.BLOCK blocked the leaf (the PAMT entry's BEPOCH)
    blocked_epoch: int = -1


def page_add_block(gpa: int) -> bytes:
    """The 128-byte block PAGE.ADD extends MRTD with."""
    block = bytearray(128)
    block[0:12] = b"MEM.PAGE.ADD"
    block[16:24] = gpa.to_bytes(8, "little")
    return bytes(block)


def mr_extend_block(gpa: int) -> bytes:
    """The 128-byte header MR.EXTEND extends MRTD with (the 256-byte chunk follows)."""
    block = bytearray(128)
    block[0:9] = b"MR.EXTEND"
    block[16:24] = gpa.to_bytes(8, "little")
    return bytes(block)


class TdxModule:
    """One TD's view of the TDX module (``vm.tdx_module``)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.name = f"tdx_module(vm{vm.id})"
        # internal locks; the S-EPT tree is also taken by agents the model does not run
        # (TDH.VP.ENTER's zero-step mitigation) while vCPUs are in the guest
        self.tdr = TryLock("tdx:TDR")
        self.epoch = TryLock("tdx:TD_EPOCH")
        self.sept_tree = TryLock("tdx:SEPT_tree", external=True, busy_p=0.05)
        self._entry_locks: dict[int, TryLock] = {}
        self.sept: dict[int, SeptLeaf] = {}
        self.sept_tables: set[tuple[int, int]] = set()
        self.created = False
        self.initialized = False
        self.finalized = False
        self.tlb_epoch = 0
        self.vcpus_created = 0
        self._mrtd = hashlib.sha384()
        self._mrtd_final: bytes | None = None
        #: chunks MR.EXTENDed since their page was last PAGE.ADDed (PAGE.REMOVE forgets them)
        self.extended_chunks: set[int] = set()
        #: every PAGE.ADD, in order (the image MRTD covers)
        self.added_pages: list[int] = []
        #: gfns in the image: PAGE.ADDed and not PAGE.REMOVEd since (the "added once" oracle)
        self.in_image: set[int] = set()
        #: whether vCPUs may be in guest mode (contending the S-EPT tree and the epoch)
        self.vcpus_in_guest = False
        #: guest TDCALLs executing right now (a kick waits for them to reach a VM exit)
        self.guest_in_flight = 0

    # -- measurement ----------------------------------------------------------------------
    @property
    def mrtd(self) -> bytes:
        """MRTD (48 bytes): final after TDH.MR.FINALIZE, the running value before it."""
        return self._mrtd_final if self._mrtd_final is not None else self._mrtd.copy().digest()

    # -- locking helpers ------------------------------------------------------------------
    def _entry(self, gfn: int) -> TryLock:
        lock = self._entry_locks.get(gfn)
        if lock is None:
            lock = self._entry_locks[gfn] = TryLock(f"tdx:SEPT_entry[{gfn:#x}]")
        return lock

    async def _acquire(self, plan: list[tuple[TryLock, str, int]]) -> int:
        """Take every lock of a SEAMCALL or none: BUSY with the operand id of the one that failed."""
        taken: list[TryLock] = []
        for lock, mode, operand in plan:
            external = lock.external and self.vcpus_in_guest
            saved = lock.external
            lock.external = saved if external else 0.0
            try:
                ok = await lock.try_lock(mode)
            finally:
                lock.external = saved
            if not ok:
                for t in reversed(taken):
                    await t.unlock()
                if lock.owner is None:
                    # Held by an agent outside the model (a guest TDCALL): it lets go by itself.
                    self.vm.mmu_word.write()
                traps.emit("seamcall_busy", self.vm, lock=lock.name)
                return TDX_OPERAND_BUSY | operand
            taken.append(lock)
        return TDX_SUCCESS

    async def _release(self, plan: list[tuple[TryLock, str, int]]) -> None:
        for lock, _mode, _operand in reversed(plan):
            await lock.unlock()
        self.vm.mmu_word.write()  # a SEAMCALL that met this one BUSY may now succeed

    async def _seamcall(self, name: str, plan: list[tuple[TryLock, str, int]], body: Any) -> int:
        """Enter SEAM, take the locks, run `body` (returns a status), leave."""
        await traps.point(self)
        err = await self._acquire(plan)
        if err:
            return err
        try:
            await traps.point(self)  # the module works while holding its locks
            code = int(body())
        finally:
            await self._release(plan)
        if traps.tracing():
            traps.emit("seamcall", self.vm, op=name, status=hex(code))
        return code

    def _shared(self) -> list[tuple[TryLock, str, int]]:
        return [(self.tdr, "read", TDX_OPERAND_ID_TDR)]

    # -- TD management --------------------------------------------------------------------
    async def tdh_mng_create(self) -> int:
        def body() -> int:
            self.created = True
            return TDX_SUCCESS

        return await self._seamcall("TDH.MNG.CREATE", [(self.tdr, WRITE, TDX_OPERAND_ID_TDR)], body)

    async def tdh_mng_init(self) -> int:
        def body() -> int:
            if not self.created or self.initialized:
                return TDX_OP_STATE_INCORRECT
            self.initialized = True
            return TDX_SUCCESS

        return await self._seamcall("TDH.MNG.INIT", [(self.tdr, WRITE, TDX_OPERAND_ID_TDR)], body)

    async def tdh_vp_create(self) -> int:
        """TDH.VP.CREATE: the TDR shared (TDX module tdh_vp_create.c: TDX_LOCK_SHARED; the new TDVPR
        page exclusively). Only VP.INIT takes the TDR exclusively (kvm-coco.md 2.6), which is why
        [T19] wraps just tdh_vp_init() in mmu_lock (tdx.c: tdx_td_vcpu_init())."""

        def body() -> int:
            self.vcpus_created += 1
            return TDX_SUCCESS

        return await self._seamcall("TDH.VP.CREATE", [(self.tdr, "read", TDX_OPERAND_ID_TDR)], body)

    async def tdh_vp_init(self) -> int:
        """TDH.VP.INIT, leaf version 1 as KVM calls it (with the x2APIC ID): the TDR exclusively."""

        def body() -> int:
            return TDX_SUCCESS if self.initialized and not self.finalized else TDX_OP_STATE_INCORRECT

        return await self._seamcall("TDH.VP.INIT", [(self.tdr, WRITE, TDX_OPERAND_ID_TDR)], body)

    async def tdh_mr_finalize(self) -> int:
        def body() -> int:
            if not self.initialized or self.finalized:
                return TDX_OP_STATE_INCORRECT
            self.finalized = True
            self._mrtd_final = self._mrtd.digest()
            return TDX_SUCCESS

        return await self._seamcall("TDH.MR.FINALIZE", [(self.tdr, WRITE, TDX_OPERAND_ID_TDR)], body)

    # -- S-EPT ----------------------------------------------------------------------------
    def _tree_plan(self, gfn: int, tree_mode: str) -> list[tuple[TryLock, str, int]]:
        return [
            (self.tdr, "read", TDX_OPERAND_ID_TDR),
            (self.sept_tree, tree_mode, TDX_OPERAND_ID_SEPT),
            (self._entry(gfn), WRITE, TDX_OPERAND_ID_RCX),
        ]

    def _walk_ok(self, gfn: int) -> bool:
        """The S-EPT tables above a 4K leaf exist (SEPT.ADD at the 2M and 1G levels)."""
        return (2, gfn - gfn % 512) in self.sept_tables and (3, gfn - gfn % (512 * 512)) in self.sept_tables

    async def tdh_mem_sept_add(self, gfn: int, level: int) -> int:
        """TDH.MEM.SEPT.ADD: a non-leaf S-EPT page for the table at `level` covering gfn."""
        key = (level, gfn - gfn % (512 ** (level - 1)))

        def body() -> int:
            if key in self.sept_tables:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            self.sept_tables.add(key)
            return TDX_SUCCESS

        return await self._seamcall("TDH.MEM.SEPT.ADD", self._tree_plan(gfn, "read"), body)

    async def tdh_mem_page_add(self, gfn: int, pfn: int, source: bytes) -> int:
        """TDH.MEM.PAGE.ADD: add a page to the initial image, copying `source` into it; extends MRTD."""

        def body() -> int:
            if gfn in self.in_image:
                # Oracle: KVM must never ask for a GPA already in the image (gmem's -EEXIST, [T19]
                # RET_PF_SPURIOUS stop it first); the module would refuse, but the attempt is the bug.
                raise Violation(
                    "tdx_double_add",
                    f"TDH.MEM.PAGE.ADD of gfn {gfn:#x}, which is already in the TD image",
                    signature="tdx_double_add",
                    gfn=gfn,
                )
            if self.finalized:
                return TDX_OP_STATE_INCORRECT
            if not self._walk_ok(gfn):
                return TDX_EPT_WALK_FAILED | TDX_OPERAND_ID_RCX
            if gfn in self.sept:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            folio = self.vm.kvm.allocator.folio_at(pfn)
            if folio is None or folio.freed:
                raise Violation(
                    "tdx_freed_page",
                    f"TDH.MEM.PAGE.ADD of gfn {gfn:#x} into freed pfn {pfn:#x}",
                    signature="tdx_freed_page:page_add",
                )
            folio.fill_page(pfn - folio.pfn, source)
            self.sept[gfn] = SeptLeaf(pfn, SEPT_MAPPED, True)
            self._mrtd.update(page_add_block(gfn * PAGE_SIZE))
            self.added_pages.append(gfn)
            self.in_image.add(gfn)
            return TDX_SUCCESS

        # PAGE.ADD takes the TDR exclusively (build time), per the lock table.
        return await self._seamcall(
            "TDH.MEM.PAGE.ADD",
            [(self.tdr, WRITE, TDX_OPERAND_ID_TDR), (self._entry(gfn), WRITE, TDX_OPERAND_ID_RCX)],
            body,
        )

    async def tdh_mr_extend(self, gpa: int) -> int:
        """TDH.MR.EXTEND: measure one 256-byte chunk of an added page."""
        gfn = gpa // PAGE_SIZE

        def body() -> int:
            if self.finalized:
                return TDX_OP_STATE_INCORRECT
            leaf = self.sept.get(gfn)
            if leaf is None or not leaf.added:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            if gpa in self.extended_chunks:
                raise Violation(
                    "tdx_double_extend",
                    f"TDH.MR.EXTEND of chunk {gpa:#x} a second time",
                    signature="tdx_double_extend",
                    gpa=gpa,
                )
            self.extended_chunks.add(gpa)
            folio = self.vm.kvm.allocator.folio_at(leaf.pfn)
            assert folio is not None
            page = folio.read_page(leaf.pfn - folio.pfn)
            off = gpa % PAGE_SIZE
            self._mrtd.update(mr_extend_block(gpa) + page[off : off + TDX_EXTENDMR_CHUNKSIZE])
            return TDX_SUCCESS

        return await self._seamcall("TDH.MR.EXTEND", [(self.tdr, WRITE, TDX_OPERAND_ID_TDR)], body)

    async def tdh_mem_page_aug(self, gfn: int, pfn: int) -> int:
        """TDH.MEM.PAGE.AUG: add a PENDING page to a running TD (the guest must accept it)."""

        def body() -> int:
            if not self.finalized:
                return TDX_OP_STATE_INCORRECT
            if not self._walk_ok(gfn):
                return TDX_EPT_WALK_FAILED | TDX_OPERAND_ID_RCX
            if gfn in self.sept:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            self.sept[gfn] = SeptLeaf(pfn, SEPT_PENDING, False)
            return TDX_SUCCESS

        return await self._seamcall("TDH.MEM.PAGE.AUG", self._tree_plan(gfn, "read"), body)

    async def tdh_mem_range_block(self, gfn: int) -> int:
        """TDH.MEM.RANGE.BLOCK: the S-EPT tree exclusively; the leaf must be present."""

        def body() -> int:
            leaf = self.sept.get(gfn)
            if leaf is None or leaf.state == SEPT_BLOCKED:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            leaf.state = SEPT_BLOCKED
            leaf.blocked_epoch = self.tlb_epoch
            return TDX_SUCCESS

        return await self._seamcall("TDH.MEM.RANGE.BLOCK", self._tree_plan(gfn, WRITE), body)

    async def tdh_mem_track(self) -> int:
        """TDH.MEM.TRACK: advance the TLB epoch (the epoch lock exclusively)."""

        def body() -> int:
            self.tlb_epoch += 1
            return TDX_SUCCESS

        plan = [(self.tdr, "read", TDX_OPERAND_ID_TDR), (self.epoch, WRITE, TDX_OPERAND_ID_TD_EPOCH)]
        return await self._seamcall("TDH.MEM.TRACK", plan, body)

    async def tdh_mem_page_remove(self, gfn: int) -> int:
        """TDH.MEM.PAGE.REMOVE: only a BLOCKED leaf can go, and once the TD may run only after TLB
        tracking: TDH.MEM.TRACK must have advanced the epoch since the BLOCK (TDX module
        tdh_mem_page_remove(): while op_state_is_tlb_tracking_required(), i.e. from RUNNABLE on,
        !is_tlb_tracked(BEPOCH) is TDX_TLB_TRACKING_NOT_DONE; KVM's tdx_track() kicks every vCPU
        out of the guest after TRACK, which the module's epoch refcounts stand for here).

        Before TDH.MR.FINALIZE the entry is FREE again afterwards, so the GPA may be PAGE.ADDed
        (and MR.EXTENDed) once more -- e.g. a VMM that punches a hole in the image and populates
        it again (tdx.c: tdx_sept_remove_private_spte() skips tdx_track() before RUNNABLE). The
        measurement records of the removed page are forgotten; MRTD keeps both ADD blocks, as the
        module's running SHA-384 does.
        """

        def body() -> int:
            leaf = self.sept.get(gfn)
            if leaf is None or leaf.state != SEPT_BLOCKED:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            if self.finalized and leaf.blocked_epoch >= self.tlb_epoch:
                # a guest TLB may still hold the translation: no TDH.MEM.TRACK since the BLOCK
                return TDX_TLB_TRACKING_NOT_DONE | TDX_OPERAND_ID_RCX
            del self.sept[gfn]
            if leaf.added:
                self.in_image.discard(gfn)
                base = gfn * PAGE_SIZE
                self.extended_chunks.difference_update(range(base, base + PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE))
            traps.emit("sept_remove", self.vm, gfn=gfn, pfn=leaf.pfn)
            return TDX_SUCCESS

        return await self._seamcall("TDH.MEM.PAGE.REMOVE", self._tree_plan(gfn, "read"), body)

    async def tdh_phymem_page_wbinvd(self, pfn: int) -> int:
        """TDH.PHYMEM.PAGE.WBINVD: write back and invalidate the page's cache lines (with the HKID)."""
        return await self._seamcall("TDH.PHYMEM.PAGE.WBINVD", [], lambda: TDX_SUCCESS)

    async def guest_accept(self, gfn: int) -> int:
        """TDG.MEM.PAGE.ACCEPT from the guest: PENDING -> MAPPED (takes the entry exclusively); the
        module initializes the page to zeros with the TD's key, so nothing the host left in it
        survives (TDX module spec, TDG.MEM.PAGE.ACCEPT)."""

        def body() -> int:
            leaf = self.sept.get(gfn)
            if leaf is None or leaf.state != SEPT_PENDING:
                return TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
            folio = self.vm.kvm.allocator.folio_at(leaf.pfn)
            if folio is not None and not folio.freed:
                folio.fill_page(leaf.pfn - folio.pfn, bytes(PAGE_SIZE))
            leaf.state = SEPT_MAPPED
            return TDX_SUCCESS

        self.guest_in_flight += 1
        try:
            return await self._seamcall("TDG.MEM.PAGE.ACCEPT", [(self._entry(gfn), WRITE, TDX_OPERAND_ID_RCX)], body)
        finally:
            self.guest_in_flight -= 1
            self.vm.mmu_word.write()
