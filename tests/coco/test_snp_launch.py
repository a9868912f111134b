"""SEV-SNP launch (kvm-coco.md section 4, ISSUE 6): a full launch whose digest is computed here
from the SNP ABI's PAGE_INFO hash chain, the fallocate-before-LAUNCH_UPDATE seed scenario in both
behaviours (6.10 and 6.18), and every errno row of sections 4.1 / 4.1a with the struct written
back only on success."""

from __future__ import annotations

import struct
from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.x86.sev.firmware import SEV_RET_INVALID_PARAM

from .helpers import (
    PAGE,
    SNP_POLICY,
    errno_of,
    expected_launch_digest,
    gmem_vm,
    image,
    run_guest,
    run_once,
    snp_vm,
    source,
)

NORMAL = uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL
ZERO = uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO
CPUID = uapi.KVM_SEV_SNP_PAGE_TYPE_CPUID
PROFILES = pytest.mark.parametrize("profile", ["6.18", "7.0"])


def update(gfn: int, uaddr: int, npages: int, page_type: int = NORMAL, **kw: Any) -> uapi.SevSnpLaunchUpdate:
    return uapi.SevSnpLaunchUpdate(gfn, uaddr, npages * PAGE, page_type, **kw)


def fields(u: uapi.SevSnpLaunchUpdate) -> tuple[int, int, int]:
    return (u.gfn_start, u.uaddr, u.len)


# -- a full launch --------------------------------------------------------------------------------


@PROFILES
def test_snp_launch_digest_matches_the_page_info_hash_chain(profile: str) -> None:
    """sev.c: snp_launch_start(), snp_launch_update() -> sev_gmem_post_populate() ->
    SEV_CMD_SNP_LAUNCH_UPDATE per page, snp_launch_finish(); the digest is the SNP ABI chain
    SHA-384(PAGE_INFO) over three NORMAL pages then a ZERO page; after FINISH the guest reads
    its image back (and zeros from the ZERO page)."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 8)
        data = image(3, seed=5)
        src = await source(kvm, data)
        normal = update(2, src, 3)
        await vm.snp_launch_update(normal)
        assert fields(normal) == (5, src + 3 * PAGE, 0), "written back fully advanced on success"
        zero = update(6, 0, 1, ZERO)
        await vm.snp_launch_update(zero)
        assert fields(zero) == (7, 0, 0), "uaddr is not advanced for ZERO pages"
        await vm.snp_launch_finish()
        assert vm.sev_fw_error == 0
        out["digest"] = vm.snp_firmware.launch_digest
        out["data"] = data
        vcpu = await vm.create_vcpu(0)
        program = [GuestAccess.read(g * PAGE, PAGE) for g in (2, 3, 4, 6)]
        out["reads"] = await run_guest(vcpu, program)

    run_once(body, profile=profile)
    data = out["data"]
    pages = [data[i * PAGE : (i + 1) * PAGE] for i in range(3)]
    launched = [(g * PAGE, NORMAL, page) for g, page in zip((2, 3, 4), pages, strict=True)]
    want = expected_launch_digest([*launched, (6 * PAGE, ZERO, bytes(PAGE))])
    assert out["digest"] == want
    assert out["reads"] == [*pages, bytes(PAGE)]


# -- the seed scenario: fallocate() before LAUNCH_UPDATE -----------------------------------------------


async def fallocate_then_launch(kvm: asyncvm.Kvm, out: dict[str, Any]) -> None:
    vm, gmem, _hva = await snp_vm(kvm, 4)
    src = await source(kvm, image(4))
    await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 4 * PAGE)
    u = update(0, src, 4)
    out["errno"] = await errno_of(vm.snp_launch_update(u))
    out["fields"] = fields(u)
    out["src"] = src
    out["fw_error"] = vm.sev_fw_error


def test_fallocate_before_launch_update_fails_with_eio_in_6_10() -> None:
    """[6.10] kvm_gmem_allocate() -> kvm_gmem_get_folio(prepare) zeroes and RMP-assigns the folio
    (sev_gmem_prepare()), so sev_gmem_post_populate() finds it assigned: -EEXIST, collapsed to
    -EIO by snp_launch_update(); the struct is not written back and error = 0 (not a firmware
    failure) (kvm-coco.md 4.6, the thread that led to lazy preparation)."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        await fallocate_then_launch(kvm, out)

    run_once(body, profile="6.10")
    assert out["errno"] == uapi.EIO
    assert out["fields"] == (0, out["src"], 4 * PAGE)
    assert out["fw_error"] == 0


def test_fallocate_before_launch_update_succeeds_in_6_18() -> None:
    """[>=6.11] "KVM: guest_memfd: lazy preparation of pages": fallocate only allocates (no zeroing,
    no prepare, not uptodate), so the launch of fallocate'd pages succeeds (kvm-coco.md 4.6)."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        await fallocate_then_launch(kvm, out)

    run_once(body, profile="6.18")
    assert out["errno"] == 0
    assert out["fields"] == (4, out["src"] + 4 * PAGE, 0)


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_second_launch_update_of_a_page_is_eio(profile: str) -> None:
    """sev.c: snp_launch_update(): a first-page failure of kvm_gmem_populate() becomes -EIO: [G11]
    gmem's -EEXIST for the uptodate folio ("do not allow populating the same page twice"), [G20]
    the RMP check in sev_gmem_post_populate() (-EEXIST); error = 0, the struct is not written
    back, the digest is unchanged (kvm-coco.md 0.18, 4.1)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 4)
        src = await source(kvm, image(1))
        await vm.snp_launch_update(update(1, src, 1))
        digest = vm.snp_firmware.launch_digest
        again = update(1, src, 1)
        assert await errno_of(vm.snp_launch_update(again)) == uapi.EIO
        assert fields(again) == (1, src, PAGE)
        assert vm.sev_fw_error == 0
        assert vm.snp_firmware.launch_digest == digest
        await vm.snp_launch_finish()

    run_once(body, profile=profile)


# -- 4.1 KVM_SEV_SNP_LAUNCH_START ------------------------------------------------------------------------


@PROFILES
def test_launch_start_twice_is_einval(profile: str) -> None:
    """sev.c: snp_launch_start(): a launch context already exists -> -EINVAL (4.1a: STARTED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        assert await errno_of(vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_launch_start_after_finish_is_einval(profile: str) -> None:
    """sev.c: snp_launch_start(): the context outlives LAUNCH_FINISH -> -EINVAL (4.1a: FINISHED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        await vm.snp_launch_finish()
        assert await errno_of(vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
@pytest.mark.parametrize(
    ("policy", "flags"),
    [(SNP_POLICY, 1), (SNP_POLICY | 1 << 40, 0), (0, 0)],
    ids=["flags", "unsupported_policy_bit", "policy_lacks_bit_17"],
)
def test_launch_start_with_bad_flags_or_policy_is_einval(profile: str, policy: int, flags: int) -> None:
    """sev.c: snp_launch_start(): flags != 0, policy bits KVM does not support, or the
    reserved-must-be-one bit 17 clear -> -EINVAL, and no context is created (a good START works)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2, start=False)
        bad = uapi.SevSnpLaunchStart(policy=policy, flags=flags)
        assert await errno_of(vm.snp_launch_start(bad)) == uapi.EINVAL
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))

    run_once(body, profile=profile)


def test_snp_launch_commands_on_a_non_snp_vm_are_enotty() -> None:
    """sev.c: snp_launch_start() and snp_launch_finish(): !sev_snp_guest() -> -ENOTTY (vmx/main.c:
    vt_mem_enc_ioctl() gives -ENOTTY for every non-TD VM on Intel too)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        for vm_type in (uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM):
            vm = await kvm.create_vm(vm_type)
            assert await errno_of(vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))) == uapi.ENOTTY
            assert await errno_of(vm.snp_launch_finish()) == uapi.ENOTTY

    run_once(body)


# -- 4.1 KVM_SEV_SNP_LAUNCH_UPDATE --------------------------------------------------------------------------


@PROFILES
def test_launch_update_before_start_is_einval(profile: str) -> None:
    """sev.c: snp_launch_update(): no launch context -> -EINVAL (4.1a: INIT2 done, no START)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2, start=False)
        src = await source(kvm, image(1))
        u = update(0, src, 1)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EINVAL
        assert fields(u) == (0, src, PAGE)

    run_once(body, profile=profile)


BAD_UPDATES = {
    "len_zero": dict(len=0),
    "len_not_page_multiple": dict(len=PAGE + 8),
    "flags": dict(flags=1),
    "type_zero": dict(type=0),
    "type_vmsa": dict(type=2),  # VMSA pages are KVM's own, never userspace's
    "type_unknown": dict(type=7),
}


@PROFILES
@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_launch_update_with_bad_len_flags_or_type_is_einval(profile: str, case: str) -> None:
    """sev.c: snp_launch_update(): len == 0, len not a 4K multiple, flags != 0, or a type other
    than NORMAL/ZERO/UNMEASURED/SECRETS/CPUID -> -EINVAL; nothing written back."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        src = await source(kvm, image(1))
        u = update(0, src, 1)
        for name, value in BAD_UPDATES[case].items():
            setattr(u, name, value)
        before = fields(u)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EINVAL
        assert fields(u) == before
        assert not vm.snp_firmware.rmp

    run_once(body, profile=profile)


@pytest.mark.parametrize(("profile", "errno"), [("6.18", 0), ("7.0", uapi.EINVAL)], ids=["6.18-accepted", "7.0-EINVAL"])
def test_launch_update_with_an_unaligned_uaddr(profile: str, errno: int) -> None:
    """sev.c: snp_launch_update(): [G20] "Document/enforce page-alignment for
    KVM_SEV_SNP_LAUNCH_UPDATE": uaddr not page aligned -> -EINVAL; before it the unaligned source
    was accepted and copied from there (kvm-coco.md 4.1)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        data = image(2)
        src = await source(kvm, data)
        u = update(0, src + 64, 1)
        assert await errno_of(vm.snp_launch_update(u)) == errno
        if errno:
            assert fields(u) == (0, src + 64, PAGE)
        else:
            assert fields(u) == (1, src + 64 + PAGE, 0)
            want = expected_launch_digest([(0, NORMAL, data[64 : 64 + PAGE])])
            assert vm.snp_firmware.launch_digest == want

    run_once(body, profile=profile)


def test_launch_update_with_a_null_uaddr_is_einval_in_7_0() -> None:
    """sev.c: snp_launch_update() [G20]: uaddr == 0 for a non-ZERO page -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        assert await errno_of(vm.snp_launch_update(update(0, 0, 1))) == uapi.EINVAL

    run_once(body, profile="7.0")


@PROFILES
@pytest.mark.parametrize("where", ["no_memslot", "non_gmem_memslot"])
def test_launch_update_of_a_gfn_not_in_a_guest_memfd_slot_is_einval(profile: str, where: str) -> None:
    """sev.c: snp_launch_update(): the memslot at gfn_start has no guest_memfd (or there is no
    memslot) -> -EINVAL, checked under slots_lock before kvm_gmem_populate()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        hva = kvm.mm.mmap(2 * PAGE)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(1, 0, 16 * PAGE, 2 * PAGE, hva))
        src = await source(kvm, image(1))
        gfn = 8 if where == "no_memslot" else 16
        u = update(gfn, src, 1)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EINVAL
        assert fields(u) == (gfn, src, PAGE)

    run_once(body, profile=profile)


@PROFILES
def test_launch_update_of_a_shared_gfn_is_eio(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): the GFN is not PRIVATE -> -EINVAL, which
    snp_launch_update() turns into -EIO (every first-page failure is -EIO); error stays 0."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGE, 0))
        src = await source(kvm, image(1))
        u = update(0, src, 1)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EIO
        assert fields(u) == (0, src, PAGE)
        assert vm.sev_fw_error == 0

    run_once(body, profile=profile)


@PROFILES
def test_launch_update_from_an_unmapped_source_is_eio(profile: str) -> None:
    """sev.c: sev_gmem_post_populate() copy_from_user ([G20]: the GUP in kvm_gmem_populate()) fails
    -EFAULT on the first page -> -EIO at the ioctl; the page is not left assigned in the RMP."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        gone = kvm.mm.mmap(PAGE)
        await kvm.mm.munmap(gone, PAGE)
        u = update(0, int(gone), 1)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EIO
        assert fields(u) == (0, int(gone), PAGE)
        assert not vm.snp_firmware.rmp

    run_once(body, profile=profile)


@PROFILES
def test_launch_update_failing_after_the_first_page_reports_partial_progress(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate() returns the pages done if any: a failure on the 2nd page
    (already launched) is swallowed, snp_launch_update() returns 0 and writes back the struct
    advanced by exactly one page; the caller re-issues from there (kvm-coco.md 0.16, 4.1)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 4)
        src = await source(kvm, image(3))
        await vm.snp_launch_update(update(1, src + PAGE, 1))
        u = update(0, src, 3)
        await vm.snp_launch_update(u)
        assert fields(u) == (1, src + PAGE, 2 * PAGE)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EIO
        assert fields(u) == (1, src + PAGE, 2 * PAGE)
        u.gfn_start, u.uaddr, u.len = 2, src + 2 * PAGE, PAGE
        await vm.snp_launch_update(u)
        assert sorted(e.gpa // PAGE for e in vm.snp_firmware.rmp.values()) == [0, 1, 2]

    run_once(body, profile=profile)


def cpuid_page(entries: list[tuple[int, int, int, int, int]]) -> bytes:
    """An SNP CPUID page (struct snp_cpuid_table): count, 12 reserved bytes, then 48-byte entries
    {eax_in, ecx_in, xcr0_in, xss_in, eax, ebx, ecx, edx, reserved}."""
    page = bytearray(PAGE)
    struct.pack_into("<I", page, 0, len(entries))
    for i, (fn, eax, ebx, ecx, edx) in enumerate(entries):
        struct.pack_into("<IIQQIIIIQ", page, 16 + 48 * i, fn, 0, 0, 0, eax, ebx, ecx, edx, 0)
    return bytes(page)


@PROFILES
def test_cpuid_page_failure_writes_the_corrected_table_back(profile: str) -> None:
    """sev.c: sev_gmem_post_populate(): SNP_LAUNCH_UPDATE of a CPUID page the firmware refuses fails
    with SEV_RET_INVALID_PARAM after the firmware corrected the page; KVM reclaims the page
    (snp_page_reclaim(), RMP back to shared) and copies the corrected table into the user
    buffer; the ioctl is -EIO with error = INVALID_PARAM and the struct not written back. Issued
    again with the corrected table, the launch succeeds (kvm-coco.md 4.2)."""
    bad_bits = 1 << 5 | 1 << 20
    leaf1 = (0x1, 0x000806F8, 0x00000800, 0x7FFAFBFF, 0xBFEBFBFF)
    table = cpuid_page([leaf1, (0x7, 0, 0x029C6FBF | bad_bits, 0, 0)])
    corrected = cpuid_page([leaf1, (0x7, 0, 0x029C6FBF & ~bad_bits, 0, 0)])
    assert corrected != table

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 4)
        vm.snp_firmware.cpuid_forbidden[(0x7, "ebx")] = bad_bits
        src = await source(kvm, table)
        u = update(3, src, 1, CPUID)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EIO
        assert vm.sev_fw_error == SEV_RET_INVALID_PARAM
        assert fields(u) == (3, src, PAGE)
        assert await kvm.mm.read(src, PAGE) == corrected
        assert not vm.snp_firmware.rmp, "the refused page was reclaimed to shared"
        await vm.snp_launch_update(u)
        assert fields(u) == (4, src + PAGE, 0)
        assert vm.sev_fw_error == 0
        assert vm.snp_firmware.launch_digest == expected_launch_digest([(3 * PAGE, CPUID, corrected)])
        await vm.snp_launch_finish()

    run_once(body, profile=profile)


@PROFILES
def test_launch_update_after_finish_is_eio(profile: str) -> None:
    """sev.c: snp_launch_update() has no state check after FINISH: the firmware rejects the guest
    (no longer launching) -> -EIO with error = the firmware code; the page is reclaimed (4.1a)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        await vm.snp_launch_finish()
        u = update(0, 0, 1, ZERO)
        assert await errno_of(vm.snp_launch_update(u)) == uapi.EIO
        assert vm.sev_fw_error != 0
        assert fields(u) == (0, 0, PAGE)
        assert not vm.snp_firmware.rmp

    run_once(body, profile=profile)


# -- 4.1 KVM_SEV_SNP_LAUNCH_FINISH and pre-fault --------------------------------------------------------------


@PROFILES
def test_launch_finish_before_start_is_einval(profile: str) -> None:
    """sev.c: snp_launch_finish(): no launch context -> -EINVAL (4.1a: INIT2 done, no START)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2, start=False)
        assert await errno_of(vm.snp_launch_finish()) == uapi.EINVAL

    run_once(body, profile=profile)


@PROFILES
def test_launch_finish_with_flags_is_einval(profile: str) -> None:
    """sev.c: snp_launch_finish(): flags != 0 -> -EINVAL; the launch can still finish."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await snp_vm(kvm, 2)
        assert await errno_of(vm.snp_launch_finish(uapi.SevSnpLaunchFinish(flags=1))) == uapi.EINVAL
        await vm.snp_launch_finish()

    run_once(body, profile=profile)


@PROFILES
def test_pre_fault_is_eopnotsupp_until_launch_finish(profile: str) -> None:
    """svm.c: svm_vm_init(): pre_fault_allowed = !has_private_mem; sev.c: snp_launch_finish() sets
    it: KVM_PRE_FAULT_MEMORY is -EOPNOTSUPP before START and while STARTED, nothing gets
    RMP-assigned, and after FINISH it maps (and prepares) every page (4.1a: PRE_FAULT_MEMORY)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, _gmem, _hva = await gmem_vm(kvm, uapi.KVM_X86_SNP_VM, 4)
        vcpu = await vm.create_vcpu(0)
        r = uapi.PreFaultMemory(0, 4 * PAGE)
        assert await errno_of(vcpu.pre_fault_memory(r)) == uapi.EOPNOTSUPP
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))
        src = await source(kvm, image(1))
        await vm.snp_launch_update(update(0, src, 1))
        assert await errno_of(vcpu.pre_fault_memory(r)) == uapi.EOPNOTSUPP
        assert (r.gpa, r.size) == (0, 4 * PAGE)
        assert len(vm.snp_firmware.rmp) == 1
        await vm.snp_launch_finish()
        await vcpu.pre_fault_memory(r)
        assert r.size == 0
        assert sorted(e.gpa // PAGE for e in vm.snp_firmware.rmp.values()) == [0, 1, 2, 3]

    run_once(body, profile=profile)
