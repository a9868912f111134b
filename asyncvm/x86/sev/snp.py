"""KVM's SEV-SNP back end: the launch ioctls, the populate callback and the guest_memfd
prepare/invalidate hooks (arch/x86/kvm/svm/sev.c, as of 6.11-6.18 unless noted).

A VM created with KVM_X86_SNP_VM is taken to have done KVM_SEV_INIT2 (the model has no SEV
platform state to initialize). Pre-fault stays refused until LAUNCH_FINISH: a fault before it
would RMP-assign pages and make their LAUNCH_UPDATE fail. The guest's state is
``struct kvm_sev_info`` (:class:`KvmSevInfo`, ``to_kvm_sev(vm)``); ``svm.py`` puts these
functions in ``svm_x86_ops``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ... import uapi
from ...host.pages import Folio
from ...kvm.guest_memfd import kvm_gmem_populate
from ...kvm.trace import WARN
from ...runtime import hb, traps
from ...uapi import PAGE_SHIFT, PAGE_SIZE, KvmError
from ..trace import trace_sev_gmem_prepare, trace_snp_launch_finish
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


class KvmSevInfo:
    """``struct kvm_sev_info`` for an SNP guest: the launch context and its firmware."""

    def __init__(self, vm: Vm) -> None:
        self.firmware = SnpFirmware(vm)
        self.snp_context = False
        #: SNP_LAUNCH_FINISH succeeded: the vCPUs' VMSAs are launched and KVM_RUN may enter the guest
        self.launch_finished = False
        #: the firmware code of the command running now (copied to kvm_sev_cmd.error)
        self.fw_error = 0


def to_kvm_sev(vm: Vm) -> KvmSevInfo:
    """svm.h: to_kvm_sev_info()"""
    sev = vm.arch.vendor
    assert isinstance(sev, KvmSevInfo), f"{vm} is not an SNP guest"
    return sev


def sev_snp_guest(vm: Vm) -> bool:
    """svm.h: sev_snp_guest()"""
    return vm.type == uapi.KVM_X86_SNP_VM


def sev_vm_init(vm: Vm) -> KvmSevInfo | None:
    """svm.c: svm_vm_init() + sev.c: KVM_SEV_INIT2: pre_fault_allowed = !has_private_mem, i.e.
    false for SNP; the guest's SEV state."""
    if not sev_snp_guest(vm):
        return None
    vm.arch.pre_fault_allowed = False
    return KvmSevInfo(vm)


# -- guest_memfd hooks --------------------------------------------------------------------------
async def sev_gmem_prepare(vm: Vm, pfn: int, gfn: int, order: int) -> int:
    """sev.c: sev_gmem_prepare(): RMP-assign a faulted private page; already assigned -> 0."""
    if not sev_snp_guest(vm):
        return 0
    firmware = to_kvm_sev(vm).firmware
    if firmware.lookup(pfn) is not None:
        return 0
    trace_sev_gmem_prepare(vm, pfn, gfn)
    if traps.draw("rmpupdate_error", 0.0):
        return -uapi.EINVAL  # RMPUPDATE failed: a hardware error a campaign may inject
    r = await firmware.rmpupdate_private(pfn, gfn << PAGE_SHIFT, immutable=False)
    return -uapi.EINVAL if r else 0


def sev_gmem_invalidate(vm: Vm, folio: Folio) -> None:
    """sev.c: sev_gmem_invalidate() on free_folio: each page goes back to shared. A page the
    firmware owns (immutable) cannot be made shared: RMPUPDATE fails, the kernel WARNs and leaks it."""
    if not sev_snp_guest(vm):
        return
    fw = to_kvm_sev(vm).firmware
    for pfn in range(folio.pfn, folio.pfn + folio.npages):
        entry = fw.rmp.get(pfn)
        if entry is None:
            continue
        if entry.immutable:
            WARN(vm, f"SEV: Failed to update RMP entry for PFN {pfn:#x}")
            continue
        del fw.rmp[pfn]
        # The GPA's image page is gone: populating it again is a new launch of a new page.
        fw.launched_gpas.discard(entry.gpa)
        traps.emit("rmpupdate", vm, pfn=pfn, assigned=False, why="sev_gmem_invalidate")


# -- KVM_MEMORY_ENCRYPT_OP -------------------------------------------------------------------------
async def sev_mem_enc_ioctl(vm: Vm, cmd: uapi.SevCmd, payload: Any) -> None:
    """sev.c: sev_mem_enc_ioctl() for the SNP launch commands; the firmware code goes back in
    ``cmd.error`` whatever the outcome."""
    try:
        if cmd.id == uapi.KVM_SEV_SNP_LAUNCH_START:
            await snp_launch_start(vm, payload)
        elif cmd.id == uapi.KVM_SEV_SNP_LAUNCH_UPDATE:
            await snp_launch_update(vm, payload)
        elif cmd.id == uapi.KVM_SEV_SNP_LAUNCH_FINISH:
            await snp_launch_finish(vm, payload)
        else:
            raise KvmError(uapi.EINVAL, f"SEV command {cmd.id} is not supported")
    finally:
        if sev_snp_guest(vm):
            cmd.error = to_kvm_sev(vm).fw_error


async def snp_launch_start(vm: Vm, params: uapi.SevSnpLaunchStart) -> None:
    """sev.c: snp_launch_start()"""
    if not sev_snp_guest(vm):
        raise KvmError(uapi.ENOTTY, f"SNP_LAUNCH_START on a {uapi.vm_type_name(vm.type)} VM")
    sev = to_kvm_sev(vm)
    await vm.lock.lock()
    try:
        sev.fw_error = 0
        if sev.snp_context:
            raise SnpError(uapi.EINVAL, "launch context exists")
        if params.flags:
            raise SnpError(uapi.EINVAL, "flags must be 0")
        if params.policy & ~SNP_POLICY_MASK_VALID or not params.policy & SNP_POLICY_MASK_RSVD_MBO:
            raise SnpError(uapi.EINVAL, f"policy {params.policy:#x} has unsupported bits or lacks bit 17")
        if await sev.firmware.snp_gctx_create():
            raise SnpError(uapi.ENOTTY, "SNP_GCTX_CREATE failed")
        rc = await sev.firmware.snp_launch_start(params.policy)
        if rc:
            sev.fw_error = rc
            raise SnpError(uapi.EIO, "SNP_LAUNCH_START failed", rc)
        sev.snp_context = True
    finally:
        await vm.lock.unlock()


async def snp_launch_update(vm: Vm, params: uapi.SevSnpLaunchUpdate) -> None:
    """sev.c: snp_launch_update(): writes gfn_start/uaddr/len back only on success."""
    if not sev_snp_guest(vm):
        raise KvmError(uapi.EINVAL, f"SNP_LAUNCH_UPDATE on a {uapi.vm_type_name(vm.type)} VM")
    sev = to_kvm_sev(vm)
    await vm.lock.lock()
    try:
        sev.fw_error = 0
        if not sev.snp_context:
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
            src = None if zero else params.uaddr
            count = await kvm_gmem_populate(
                vm, params.gfn_start, src, params.len // PAGE_SIZE, sev_gmem_post_populate, params.type
            )
        finally:
            await vm.slots_lock.unlock()
        if count < 0:
            raise SnpError(uapi.EIO, f"SNP_LAUNCH_UPDATE failed on the first page ({count})", sev.fw_error)
        params.gfn_start += count
        params.len -= count * PAGE_SIZE
        if not zero:
            params.uaddr += count * PAGE_SIZE
    finally:
        await vm.lock.unlock()


async def sev_gmem_post_populate(vm: Vm, gfn: int, pfn: int, src: int | None, order: int, page_type: Any) -> int:
    """sev.c: sev_gmem_post_populate(): RMP check, copy, rmp_make_private, SNP_LAUNCH_UPDATE."""
    sev = to_kvm_sev(vm)
    fw = sev.firmware
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
        sev.fw_error = rc
        if await fw.snp_page_reclaim(pfn) or await fw.rmpupdate_shared(pfn):
            vm.kvm_bug("KVM_BUG_ON: snp_page_reclaim failed; page leaked")
            return -uapi.EIO
        if corrected is not None and page_type == PAGE_TYPE_CPUID and rc == SEV_RET_INVALID_PARAM and src is not None:
            folio.fill_page(index, corrected)
            await vm.kvm.mm.write(src, corrected)
        return -uapi.EIO
    return 0


async def snp_launch_finish(vm: Vm, params: uapi.SevSnpLaunchFinish) -> None:
    """sev.c: snp_launch_finish(): then pre_fault_allowed."""
    if not sev_snp_guest(vm):
        raise KvmError(uapi.ENOTTY, f"SNP_LAUNCH_FINISH on a {uapi.vm_type_name(vm.type)} VM")
    sev = to_kvm_sev(vm)
    await vm.lock.lock()
    try:
        sev.fw_error = 0
        if not sev.snp_context:
            raise SnpError(uapi.EINVAL, "no launch context")
        if params.flags:
            raise SnpError(uapi.EINVAL, "flags must be 0")
        rc = await sev.firmware.snp_launch_finish()
        if rc:
            sev.fw_error = rc
            raise SnpError(uapi.EIO, "SNP_LAUNCH_FINISH failed", rc)
        if hb.ACTIVE:
            hb.access(hb.STORE_RELEASE, "pre_fault_allowed", vm)
        vm.arch.pre_fault_allowed = True
        sev.launch_finished = True
        traps.emit("snp_launch_finish", vm, digest=sev.firmware.launch_digest.hex())
        trace_snp_launch_finish(vm)
    finally:
        await vm.lock.unlock()
