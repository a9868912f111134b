"""fallocate(2) on a guest_memfd (kvm-core.md section 2.3): the VFS checks of fs/open.c:
vfs_fallocate(), then virt/kvm/guest_memfd.c: kvm_gmem_fallocate(), as
tools/testing/selftests/kvm/guest_memfd_test.c checks them."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.guest_memfd import MAX_LFS_FILESIZE, GuestMemfd

from .helpers import PAGE, run_once

KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
TOTAL = 4 * PAGE  # guest_memfd_test.c: gmem_test() uses page_size * 4


async def new_gmem(kvm: asyncvm.Kvm, size: int = TOTAL) -> GuestMemfd:
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    return await vm.create_guest_memfd(size=size)


async def expect_errno(errno: int, gmem: GuestMemfd, mode: int, offset: int, length: int) -> None:
    with pytest.raises(KvmError) as e:
        await gmem.fallocate(mode, offset, length)
    assert e.value.errno == errno, f"mode {mode:#x} ({offset:#x}, {length:#x}): got {e.value!r}"


def folio_indices(gmem: GuestMemfd) -> list[int]:
    return [i for s, e, _f in gmem.inode.folios.items() for i in range(s, e)]


# -- VFS checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(-PAGE, PAGE), (0, 0), (0, -PAGE), (1 << 63, PAGE), (0, 1 << 64)])
def test_negative_offset_or_non_positive_length_is_einval(offset: int, length: int) -> None:
    """fs/open.c: vfs_fallocate(): offset < 0 || len <= 0 -> -EINVAL (both are loff_t: 1 << 63 is
    negative, 1 << 64 is 0)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        for mode in (KEEP, PUNCH):
            await expect_errno(uapi.EINVAL, gmem, mode, offset, length)

    run_once(body)


def test_the_einval_range_check_comes_before_the_mode_check() -> None:
    """fs/open.c: vfs_fallocate(): the offset/len check is the first one."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EINVAL, gmem, 1 << 20, -PAGE, PAGE)

    run_once(body)


@pytest.mark.parametrize("mode", [uapi.FALLOC_FL_NO_HIDE_STALE | KEEP, 1 << 8 | KEEP, 1 << 30 | PUNCH])
def test_unknown_mode_bits_are_eopnotsupp(mode: int) -> None:
    """fs/open.c: vfs_fallocate(): mode outside FALLOC_FL_MODE_MASK | KEEP_SIZE -> -EOPNOTSUPP."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_errno(uapi.EOPNOTSUPP, await new_gmem(kvm), mode, 0, PAGE)

    run_once(body)


def test_punch_hole_without_keep_size_is_eopnotsupp() -> None:
    """fs/open.c: vfs_fallocate(): PUNCH_HOLE must come with KEEP_SIZE."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_errno(uapi.EOPNOTSUPP, await new_gmem(kvm), uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)

    run_once(body)


@pytest.mark.parametrize(
    "mode",
    [
        uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_ZERO_RANGE | KEEP,
        uapi.FALLOC_FL_COLLAPSE_RANGE | KEEP,
        uapi.FALLOC_FL_INSERT_RANGE | KEEP,
        uapi.FALLOC_FL_WRITE_ZEROES | KEEP,
    ],
    ids=["punch_and_zero", "collapse_keep_size", "insert_keep_size", "write_zeroes_keep_size"],
)
def test_vfs_mode_errors_come_before_the_efbig_check(mode: int) -> None:
    """fs/open.c: vfs_fallocate() (exclusive-mode switch, ~6.12): invalid mode combinations are
    -EOPNOTSUPP even for a range that would also be -EFBIG."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_errno(uapi.EOPNOTSUPP, await new_gmem(kvm), mode, MAX_LFS_FILESIZE - PAGE + 1, 2 * PAGE)

    run_once(body)


@pytest.mark.parametrize("mode", [KEEP, PUNCH, 0, uapi.FALLOC_FL_ZERO_RANGE], ids=["keep", "punch", "none", "zero"])
def test_range_beyond_the_maximum_file_size_is_efbig(mode: int) -> None:
    """fs/open.c: vfs_fallocate(): offset + len past s_maxbytes (MAX_LFS_FILESIZE) -> -EFBIG, which
    comes before guest_memfd's own mode and alignment checks."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EFBIG, gmem, mode, MAX_LFS_FILESIZE - PAGE + 1, 2 * PAGE)
        await expect_errno(uapi.EFBIG, gmem, mode, MAX_LFS_FILESIZE, 1)

    run_once(body)


def test_fallocate_on_a_closed_guest_memfd_is_ebadf() -> None:
    """fs/open.c: ksys_fallocate(): no open file -> -EBADF."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.close()
        await expect_errno(uapi.EBADF, gmem, KEEP, 0, PAGE)

    run_once(body)


# -- guest_memfd checks ----------------------------------------------------------------------------


def test_allocate_without_keep_size_is_eopnotsupp() -> None:
    """guest_memfd.c: kvm_gmem_fallocate(): !(mode & FALLOC_FL_KEEP_SIZE) -> -EOPNOTSUPP."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_errno(uapi.EOPNOTSUPP, await new_gmem(kvm), uapi.FALLOC_FL_ALLOCATE_RANGE, 0, PAGE)

    run_once(body)


@pytest.mark.parametrize(
    "mode",
    [
        uapi.FALLOC_FL_ZERO_RANGE | KEEP,
        uapi.FALLOC_FL_UNSHARE_RANGE | KEEP,
        uapi.FALLOC_FL_ZERO_RANGE,
        uapi.FALLOC_FL_COLLAPSE_RANGE,
        uapi.FALLOC_FL_INSERT_RANGE,
        uapi.FALLOC_FL_WRITE_ZEROES,
    ],
    ids=["zero_keep", "unshare_keep", "zero", "collapse", "insert", "write_zeroes"],
)
def test_modes_other_than_allocate_and_punch_hole_are_eopnotsupp(mode: int) -> None:
    """guest_memfd.c: kvm_gmem_fallocate(): only KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE are supported."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_errno(uapi.EOPNOTSUPP, await new_gmem(kvm), mode, 0, PAGE)

    run_once(body)


def test_mode_errors_come_before_alignment_errors() -> None:
    """guest_memfd.c: kvm_gmem_fallocate(): the mode checks precede the PAGE_ALIGNED() check."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EOPNOTSUPP, gmem, uapi.FALLOC_FL_ZERO_RANGE | KEEP, 1, 1)
        await expect_errno(uapi.EOPNOTSUPP, gmem, 0, 1, 1)

    run_once(body)


INVALID_PUNCH_HOLES = [
    (0, 1),
    (0, PAGE - 1),
    (0, PAGE + 1),
    (1, 1),
    (1, PAGE - 1),
    (1, PAGE),
    (1, PAGE + 1),
    (PAGE, 1),
    (PAGE, PAGE - 1),
    (PAGE, PAGE + 1),
]


@pytest.mark.parametrize(("offset", "length"), INVALID_PUNCH_HOLES)
def test_unaligned_punch_hole_is_einval(offset: int, length: int) -> None:
    """guest_memfd_test.c: test_invalid_punch_hole(): ten unaligned (offset, len) pairs, all -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EINVAL, gmem, PUNCH, offset, length)

    run_once(body)


@pytest.mark.parametrize(("offset", "length"), [(PAGE - 1, PAGE), (0, PAGE + 1), (1, 1)])
def test_unaligned_allocate_is_einval(offset: int, length: int) -> None:
    """guest_memfd.c: kvm_gmem_fallocate(): !PAGE_ALIGNED(offset) || !PAGE_ALIGNED(len) -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EINVAL, gmem, KEEP, offset, length)
        assert folio_indices(gmem) == []

    run_once(body)


def test_selftest_fallocate_sequence() -> None:
    """guest_memfd_test.c: test_fallocate(), step by step."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.fallocate(KEEP, 0, TOTAL)
        await expect_errno(uapi.EINVAL, gmem, PUNCH, PAGE - 1, PAGE)
        await expect_errno(uapi.EINVAL, gmem, KEEP, TOTAL, PAGE)
        await expect_errno(uapi.EINVAL, gmem, KEEP, TOTAL + PAGE, PAGE)
        await gmem.fallocate(PUNCH, TOTAL, PAGE)
        await gmem.fallocate(PUNCH, TOTAL + PAGE, PAGE)
        await expect_errno(uapi.EINVAL, gmem, PUNCH, PAGE, PAGE - 1)
        await gmem.fallocate(PUNCH, PAGE, PAGE)
        await gmem.fallocate(KEEP, PAGE, PAGE)

    run_once(body)


def test_allocate_populates_every_page_of_the_range() -> None:
    """guest_memfd.c: kvm_gmem_allocate(): a folio per index in [offset >> 12, (offset + len) >> 12)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.fallocate(KEEP, PAGE, 2 * PAGE)
        assert folio_indices(gmem) == [1, 2]
        await gmem.fallocate(KEEP, 0, TOTAL)
        assert folio_indices(gmem) == [0, 1, 2, 3]

    run_once(body)


def test_allocate_crossing_the_end_of_the_file_is_einval_and_allocates_nothing() -> None:
    """guest_memfd.c: kvm_gmem_allocate(): offset + len > i_size -> -EINVAL before any allocation."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EINVAL, gmem, KEEP, 2 * PAGE, 3 * PAGE)
        assert folio_indices(gmem) == []

    run_once(body)


def test_punch_hole_at_or_after_the_end_is_a_successful_no_op() -> None:
    """guest_memfd_test.c: test_fallocate(); guest_memfd.c: kvm_gmem_punch_hole() has no size check."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.fallocate(KEEP, 0, TOTAL)
        folios = list(gmem.inode.folios.items())
        await gmem.fallocate(PUNCH, TOTAL, PAGE)
        await gmem.fallocate(PUNCH, 64 * TOTAL, 16 * PAGE)
        assert list(gmem.inode.folios.items()) == folios

    run_once(body)


def test_punch_hole_frees_the_pages_and_reallocate_gets_new_ones() -> None:
    """guest_memfd_test.c: test_fallocate() (punch, then restore the hole);
    guest_memfd.c: kvm_gmem_punch_hole() -> truncate_inode_pages_range()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.fallocate(KEEP, 0, TOTAL)
        old = gmem.inode.folios.get(1)
        assert old is not None
        await gmem.fallocate(PUNCH, PAGE, PAGE)
        assert folio_indices(gmem) == [0, 2, 3]
        assert old.freed
        await gmem.fallocate(KEEP, PAGE, PAGE)
        new = gmem.inode.folios.get(1)
        assert new is not None and new is not old and not new.freed

    run_once(body)


@pytest.mark.parametrize(("profile", "prepared"), [("6.10", True), ("6.18", False), ("7.0", False)])
def test_allocate_zeroes_and_marks_uptodate_only_before_6_11(profile: str, prepared: bool) -> None:
    """guest_memfd.c: kvm_gmem_allocate() / kvm_gmem_get_folio(): [6.8-6.10] new folios are zeroed
    and uptodate; [>=6.11] zeroing is deferred to kvm_gmem_get_pfn() or populate."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await gmem.fallocate(KEEP, 0, TOTAL)
        for _s, _e, folio in gmem.inode.folios.items():
            assert folio.uptodate is prepared
            assert folio.initialized is prepared

    run_once(body, profile=profile)


def test_allocate_interrupted_by_a_signal_is_eintr() -> None:
    """guest_memfd.c: kvm_gmem_allocate(): signal_pending() -> -EINTR (no partial-progress return)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        gmem = await new_gmem(kvm)
        await expect_errno(uapi.EINTR, gmem, KEEP, 0, TOTAL)

    run_once(body, data_probs={"signal": 1.0})
