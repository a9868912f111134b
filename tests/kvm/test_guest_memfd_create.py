"""KVM_CREATE_GUEST_MEMFD and the guest_memfd file (kvm-core.md section 2.1), as the kernel selftest
tools/testing/selftests/kvm/guest_memfd_test.c checks them."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, uapi

from .helpers import PAGE, run_once

VM_TYPES = [uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM]


@pytest.mark.parametrize("vm_type", VM_TYPES, ids=uapi.vm_type_name)
def test_every_size_below_a_page_is_einval(vm_type: int) -> None:
    """guest_memfd_test.c: test_create_guest_memfd_invalid_sizes(); guest_memfd.c: kvm_gmem_create()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        for size in range(1, PAGE):
            with pytest.raises(KvmError) as e:
                await vm.create_guest_memfd(size=size)
            assert e.value.errno == uapi.EINVAL, size

    run_once(body)


@pytest.mark.parametrize("size", [0, -PAGE, PAGE + 1, 2 * PAGE - 1, 1 << 63, uapi.U64_MAX - PAGE + 1])
def test_zero_negative_or_unaligned_size_is_einval(size: int) -> None:
    """guest_memfd.c: kvm_gmem_create(): size <= 0 or !PAGE_ALIGNED(size) -> -EINVAL (the __u64
    size is read into a loff_t, so sizes with bit 63 set are negative)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        with pytest.raises(KvmError) as e:
            await vm.create_guest_memfd(uapi.CreateGuestMemfd(size))
        assert e.value.errno == uapi.EINVAL

    run_once(body)


def test_each_unsupported_flag_bit_is_einval() -> None:
    """guest_memfd_test.c: test_guest_memfd_flags(); guest_memfd.c: kvm_gmem_create() flags check."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        for bit in range(64):
            flag = 1 << bit
            if flag & supported:
                await vm.create_guest_memfd(size=PAGE, flags=flag)
                continue
            with pytest.raises(KvmError) as e:
                await vm.create_guest_memfd(size=PAGE, flags=flag)
            assert e.value.errno == uapi.EINVAL, hex(flag)

    run_once(body)


def test_flags_are_checked_before_the_size() -> None:
    """guest_memfd.c: kvm_gmem_create(): the flags check comes first (both are -EINVAL, but a
    bad flag with a good size must not succeed)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        with pytest.raises(KvmError) as e:
            await vm.create_guest_memfd(uapi.CreateGuestMemfd(PAGE, 1 << 63))
        assert e.value.errno == uapi.EINVAL

    run_once(body)


@pytest.mark.parametrize("op", ["read", "write", "pread", "pwrite"])
def test_read_and_write_fail(op: str) -> None:
    """guest_memfd_test.c: test_file_read_write(): guest_memfd has no read/write file operations."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        with pytest.raises(KvmError):
            if op in ("read", "pread"):
                getattr(gmem, op)(64, 0)
            else:
                getattr(gmem, op)(b"x" * 64, 0)

    run_once(body)


def test_mmap_without_the_mmap_flag_is_enodev() -> None:
    """guest_memfd_test.c: test_mmap_not_supported(); guest_memfd.c: kvm_gmem_mmap() -> -ENODEV."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        for length in (PAGE, 4 * PAGE):
            with pytest.raises(KvmError) as e:
                gmem.mmap(length)
            assert e.value.errno == uapi.ENODEV

    run_once(body)


def test_truncate_is_einval() -> None:
    """guest_memfd.c: kvm_gmem_setattr() refuses every size change with -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        for size in (0, PAGE, 8 * PAGE):
            with pytest.raises(KvmError) as e:
                gmem.truncate(size)
            assert e.value.errno == uapi.EINVAL
        assert gmem.fstat()["st_size"] == 4 * PAGE

    run_once(body)


def test_fstat_reports_size_and_page_blksize() -> None:
    """guest_memfd_test.c: test_file_size(): st_size is the creation size, st_blksize the page size."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        assert gmem.fstat() == {"st_size": 4 * PAGE, "st_blksize": PAGE}

    run_once(body)


def test_two_files_have_different_inodes_and_their_own_sizes() -> None:
    """guest_memfd_test.c: test_create_guest_memfd_multiple(): each create makes a new inode."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        first = await vm.create_guest_memfd(size=PAGE)
        second = await vm.create_guest_memfd(size=2 * PAGE)
        assert first.fstat()["st_size"] == PAGE
        assert second.fstat()["st_size"] == 2 * PAGE
        assert first.inode is not second.inode
        assert first.fstat()["st_size"] == PAGE

    run_once(body)


def test_the_file_belongs_to_the_vm_that_created_it() -> None:
    """guest_memfd.c: __kvm_gmem_create(): the file records (and pins) its VM."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=PAGE)
        assert gmem.vm is vm
        assert gmem in gmem.inode.files

    run_once(body)
