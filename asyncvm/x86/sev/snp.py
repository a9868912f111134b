"""KVM's SEV-SNP back end: the launch ioctls, the populate callback and the guest_memfd
prepare/invalidate hooks (arch/x86/kvm/svm/sev.c, as of 6.11-6.18 unless noted).

A VM created with KVM_X86_SNP_VM is taken to have done KVM_SEV_INIT2 (the model has no SEV
platform state to initialize). Pre-fault stays refused until LAUNCH_FINISH: a fault before it
would RMP-assign pages and make their LAUNCH_UPDATE fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import uapi
from ...host.pages import Folio
from ...kvm.guest_memfd import kvm_gmem_populate
from ...runtime import traps
from ...runtime.failures import Violation
from ...uapi import PAGE_SHIFT, PAGE_SIZE, KvmError
from ..x86 import X86Arch
from .firmware import PAGE_TYPE_CPUID, SEV_RET_INVALID_PARAM, SnpFirmware

if TYPE_CHECKING:
    from ...kvm.vm import Vm

SNP_POLICY_MASK_RSVD_MBO = 1 << 17
SNP_POLICY_MASK_VALID = (
    0xFF | (0xFF << 8) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23)
)
LAUNCH_UPDATE_TYPES = (
    uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL,
    uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO,
    uapi.KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
    uapi.KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    uapi.KVM_SEV_SNP_PAGE_TYPE_CPUID,
)


class SnpError(KvmError):
    """A launch ioctl failure; ``fw_error`` is the firmware code KVM copies to ``argp->error``."""

    def __init__(self, errno_value: int, detail: str, fw_error: int = 0) -> None:
        super().__init__(errno_value, detail)
        self.fw_error = fw_error


class SnpArch(X86Arch):
    """``struct kvm_sev_info`` for an SNP guest plus the SNP entries of ``svm_x86_ops``."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(vm)
        self.firmware = SnpFirmware(vm)
        vm.snp_firmware = self.firmware  # type: ignore[attr-defined]
        self.snp_context = False
        self.fw_error = 0

    def vm_init(self, vm: Vm) -> None:
        """svm.c: svm_vm_init(): pre_fault_allowed = !has_private_mem, i.e. false for SNP."""
        self._pre_fault_allowed = False

    def guest_access_is_private(self, vm: Vm, access: Any) -> bool:
        return vm.mem_is_private(access.gpa >> PAGE_SHIFT)

    # -- guest_memfd hooks --------------------------------------------------------------------
    async def gmem_prepare(self, vm: Vm, pfn: int, gfn: int, order: int) -> int:
        """sev.c: sev_gmem_prepare(): RMP-assign a faulted private page; already assigned -> 0."""
        if self.firmware.lookup(pfn) is not None:
            return 0
        if not self.firmware.finished and not vm.profile.gmem_fallocate_prepares:
            raise Violation(
                "snp_prepare_before_finish",
                f"gfn {gfn:#x} RMP-assigned by a fault before LAUNCH_FINISH",
                signature="snp_prepare_before_finish",
                gfn=gfn,
            )
        if traps.draw("rmpupdate_error", 0.0):
            return -uapi.EINVAL  # RMPUPDATE failed: a hardware error a campaign may inject
        r = await self.firmware.rmpupdate_private(pfn, gfn << PAGE_SHIFT, immutable=False)
        return -uapi.EINVAL if r else 0

    def gmem_free_folio_hook(self, vm: Vm) -> Callable[[Folio], None] | None:
        """sev.c: sev_gmem_invalidate() on free_folio: the page goes back to shared."""
        fw = self.firmware

        def on_free(folio: Folio) -> None:
            for pfn in range(folio.pfn, folio.pfn + folio.npages):
                entry = fw.rmp.get(pfn)
                if entry is None:
                    continue
                if entry.immutable:
                    # A firmware page can only be reclaimed; RMPUPDATE would fail and leak it.
                    raise Violation(
                        "rmp_freed_private",
                        f"pfn {pfn:#x} freed while the RMP still holds it for the firmware",
                        signature="rmp_freed_private",
                        pfn=pfn,
                    )
                del fw.rmp[pfn]
                # The GPA's image page is gone: populating it again is a new launch of a new page.
                fw.launched_gpas.discard(entry.gpa)
                traps.emit("rmpupdate", vm, pfn=pfn, assigned=False, why="sev_gmem_invalidate")

        return on_free

    def check_guest_access(self, vm: Vm, folio: Folio, pfn: int, private: bool) -> None:
        entry = self.firmware.lookup(pfn)
        if private and entry is None:
            raise Violation(
                "rmp_guest_shared",
                f"private guest access to pfn {pfn:#x}, which the RMP says is shared",
                signature="rmp_guest_shared",
                pfn=pfn,
            )

    def at_quiescence(self, vm: Vm) -> None:
        """Every freed page is shared in the RMP (the free hook ran)."""
        for pfn in self.firmware.rmp:
            folio = vm.kvm.allocator.folio_at(pfn)
            if folio is None or folio.freed:
                raise Violation(
                    "rmp_freed_private",
                    f"freed pfn {pfn:#x} is still assigned in the RMP",
                    signature="rmp_freed_private",
                    pfn=pfn,
                )

    # -- KVM_SEV_SNP_LAUNCH_START -----------------------------------------------------------
    async def snp_launch_start(self, params: uapi.SevSnpLaunchStart) -> None:
        """sev.c: snp_launch_start()"""
        vm = self.vm
        await vm.lock.lock()
        try:
            if self.snp_context:
                raise SnpError(uapi.EINVAL, "launch context exists")
            if params.flags:
                raise SnpError(uapi.EINVAL, "flags must be 0")
            if params.policy & ~SNP_POLICY_MASK_VALID or not params.policy & SNP_POLICY_MASK_RSVD_MBO:
                raise SnpError(uapi.EINVAL, f"policy {params.policy:#x} has unsupported bits or lacks bit 17")
            if await self.firmware.snp_gctx_create():
                raise SnpError(uapi.ENOTTY, "SNP_GCTX_CREATE failed")
            rc = await self.firmware.snp_launch_start(params.policy)
            if rc:
                self.fw_error = rc
                raise SnpError(uapi.EIO, "SNP_LAUNCH_START failed", rc)
            self.snp_context = True
        finally:
            await vm.lock.unlock()

    # -- KVM_SEV_SNP_LAUNCH_UPDATE ----------------------------------------------------------
    async def snp_launch_update(self, params: uapi.SevSnpLaunchUpdate) -> None:
        """sev.c: snp_launch_update(): writes gfn_start/uaddr/len back only on success."""
        vm = self.vm
        await vm.lock.lock()
        try:
            if not self.snp_context:
                raise SnpError(uapi.EINVAL, "no launch context (LAUNCH_START first)")
            if not params.len or params.len % PAGE_SIZE or params.flags or params.type not in LAUNCH_UPDATE_TYPES:
                raise SnpError(uapi.EINVAL, "bad len, flags or page type")
            zero = params.type == uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO
            if not zero and (params.uaddr == 0 or params.uaddr % PAGE_SIZE) and vm.profile.gmem_populate_per_page_lock:
                raise SnpError(uapi.EINVAL, "uaddr must be page aligned")  # [G20]
            await vm.slots_lock.lock()
            try:
                slot = vm.gfn_to_memslot(params.gfn_start)
                if slot is None or not slot.has_gmem():
                    raise SnpError(uapi.EINVAL, "gfn_start is not in a guest_memfd memslot")
                self.fw_error = 0
                src = None if zero else params.uaddr
                count = await kvm_gmem_populate(
                    vm, params.gfn_start, src, params.len // PAGE_SIZE, self.sev_gmem_post_populate, params.type
                )
            finally:
                await vm.slots_lock.unlock()
            if count < 0:
                raise SnpError(uapi.EIO, f"SNP_LAUNCH_UPDATE failed on the first page ({count})", self.fw_error)
            params.gfn_start += count
            params.len -= count * PAGE_SIZE
            if not zero:
                params.uaddr += count * PAGE_SIZE
        finally:
            await vm.lock.unlock()

    async def sev_gmem_post_populate(
        self, vm: Vm, gfn: int, pfn: int, src: int | None, order: int, page_type: Any
    ) -> int:
        """sev.c: sev_gmem_post_populate(): RMP check, copy, rmp_make_private, SNP_LAUNCH_UPDATE."""
        fw = self.firmware
        if page_type != uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO and src is None:
            return -uapi.EINVAL
        if fw.lookup(pfn) is not None:
            return -uapi.EEXIST
        folio = vm.kvm.allocator.folio_at(pfn)
        assert folio is not None
        index = pfn - folio.pfn
        if src is not None:
            try:
                data = await vm.kvm.mm.read(src, PAGE_SIZE)
            except KvmError:
                return -uapi.EFAULT
            fw.check_host_write(pfn)
            folio.fill_page(index, data)
        else:
            fw.check_host_write(pfn)
            folio.fill_page(index, bytes(PAGE_SIZE))
        r = await fw.rmpupdate_private(pfn, gfn << PAGE_SHIFT, immutable=True)
        if r:
            return r
        rc, corrected = await fw.snp_launch_update(pfn, gfn << PAGE_SHIFT, int(page_type), folio.read_page(index))
        if rc:
            self.fw_error = rc
            if await fw.snp_page_reclaim(pfn) or await fw.rmpupdate_shared(pfn):
                vm.kvm_bug("KVM_BUG_ON: snp_page_reclaim failed; page leaked")
                return -uapi.EIO
            if (
                corrected is not None
                and page_type == PAGE_TYPE_CPUID
                and rc == SEV_RET_INVALID_PARAM
                and src is not None
            ):
                folio.fill_page(index, corrected)
                await vm.kvm.mm.write(src, corrected)
            return -uapi.EIO
        return 0

    # -- KVM_SEV_SNP_LAUNCH_FINISH ----------------------------------------------------------
    async def snp_launch_finish(self, params: uapi.SevSnpLaunchFinish) -> None:
        """sev.c: snp_launch_finish(): then pre_fault_allowed."""
        vm = self.vm
        await vm.lock.lock()
        try:
            if not self.snp_context:
                raise SnpError(uapi.EINVAL, "no launch context")
            if params.flags:
                raise SnpError(uapi.EINVAL, "flags must be 0")
            rc = await self.firmware.snp_launch_finish()
            if rc:
                self.fw_error = rc
                raise SnpError(uapi.EIO, "SNP_LAUNCH_FINISH failed", rc)
            self._pre_fault_allowed = True
            traps.emit("snp_launch_finish", vm, digest=self.firmware.launch_digest.hex())
        finally:
            await vm.lock.unlock()
