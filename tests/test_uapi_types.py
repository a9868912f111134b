"""Issue 16: API type misuse is a TypeError naming the field, struct or argument, never a raw
Python error from inside the model; out-of-range ints are read as the C field would hold them."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.uapi import PAGE_SIZE

from .support import run_once

PAGE = PAGE_SIZE


async def _expect_type_error(call: Awaitable[Any], *words: str) -> None:
    with pytest.raises(TypeError) as info:
        await call
    for word in words:
        assert word in str(info.value), str(info.value)


# -- the reproducers of the issue -------------------------------------------------------------


def test_prefault_struct_with_a_float_gpa_names_the_field() -> None:
    with pytest.raises(TypeError, match=r"PreFaultMemory\.gpa must be an int, not float"):
        uapi.PreFaultMemory(0.0, 4096)  # type: ignore[arg-type]


def test_memory_region_struct_with_a_float_slot_names_the_field() -> None:
    with pytest.raises(TypeError, match=r"UserspaceMemoryRegion2\.slot must be an int, not float"):
        uapi.UserspaceMemoryRegion2(0.0, 0, 0, PAGE, 0)  # type: ignore[arg-type]


def test_prefault_given_a_tuple_names_the_struct_and_leaves_the_vcpu_usable() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        vcpu = await vm.create_vcpu(0)
        await _expect_type_error(vcpu.pre_fault_memory((0, 4096, 0)), "uapi.PreFaultMemory", "tuple")  # type: ignore[arg-type]
        # Refused before vcpu->mutex was taken: the next ioctl on this vCPU runs normally.
        with pytest.raises(KvmError) as err:
            await vcpu.pre_fault_memory(uapi.PreFaultMemory(0, PAGE))
        assert err.value.errno == uapi.ENOENT

    run_once(body)


def test_create_guest_memfd_with_a_float_size_names_the_field() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        await _expect_type_error(vm.create_guest_memfd(size=4096.0), "size", "float")  # type: ignore[arg-type]
        await _expect_type_error(vm.create_guest_memfd((4096, 0)), "uapi.CreateGuestMemfd")  # type: ignore[arg-type]

    run_once(body)


def test_fallocate_with_a_float_mode_names_the_argument() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        await _expect_type_error(gmem.fallocate(3.0, 0, PAGE), "'mode'", "float")  # type: ignore[arg-type]
        await _expect_type_error(gmem.fallocate(3, 0.0, PAGE), "'offset'")  # type: ignore[arg-type]
        await _expect_type_error(gmem.fallocate(3, 0, "4096"), "'len'", "str")  # type: ignore[arg-type]
        await gmem.fallocate(3, 0, PAGE)  # PUNCH_HOLE|KEEP_SIZE still works afterwards
        # found by asyncvm soak: a kernel without in-place conversion answered ENOTTY instead
        await _expect_type_error(gmem.set_memory_attributes2(None), "uapi.MemoryAttributes2")  # type: ignore[arg-type]

    run_once(body)


def test_mm_calls_with_floats_name_the_argument() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        with pytest.raises(TypeError, match=r"mm\.mmap\(\) argument 'length'"):
            kvm.mm.mmap(4096.0)  # type: ignore[arg-type]
        addr = await kvm.mm.mmap(2 * PAGE)
        await _expect_type_error(kvm.mm.munmap(float(addr), PAGE), "mm.munmap", "'addr'")  # type: ignore[arg-type]
        await _expect_type_error(kvm.mm.madvise(addr, PAGE, 4.0), "mm.madvise", "'advice'")  # type: ignore[arg-type]
        await _expect_type_error(kvm.mm.read(addr, 8.0), "mm.read", "'length'")  # type: ignore[arg-type]
        await _expect_type_error(kvm.mm.write(addr, "text"), "mm.write", "'data'")  # type: ignore[arg-type]
        await kvm.mm.write(addr, bytearray(b"ok"))
        assert await kvm.mm.read(addr, 2) == b"ok"

    run_once(body)


# -- every ioctl-shaped method, handed the wrong struct ----------------------------------------

Call = Callable[[Any, Any, Any], Awaitable[Any]]

WRONG_STRUCT: list[tuple[str, int, Call, str]] = [
    ("set_memory_attributes", uapi.KVM_X86_SW_PROTECTED_VM, lambda vm, vcpu, bad: vm.set_memory_attributes(bad),
     "MemoryAttributes"),
    ("set_user_memory_region", uapi.KVM_X86_DEFAULT_VM, lambda vm, vcpu, bad: vm.set_user_memory_region(bad),
     "UserspaceMemoryRegion"),
    ("set_user_memory_region2", uapi.KVM_X86_DEFAULT_VM, lambda vm, vcpu, bad: vm.set_user_memory_region2(bad),
     "UserspaceMemoryRegion2"),
    ("create_guest_memfd", uapi.KVM_X86_SW_PROTECTED_VM, lambda vm, vcpu, bad: vm.create_guest_memfd(bad),
     "CreateGuestMemfd"),
    ("pre_fault_memory", uapi.KVM_X86_DEFAULT_VM, lambda vm, vcpu, bad: vcpu.pre_fault_memory(bad), "PreFaultMemory"),
    ("tdx_init_vm", uapi.KVM_X86_TDX_VM, lambda vm, vcpu, bad: vm.tdx_init_vm(bad), "TdxInitVm"),
    ("tdx_init_mem_region", uapi.KVM_X86_TDX_VM, lambda vm, vcpu, bad: vcpu.tdx_init_mem_region(bad),
     "TdxInitMemRegion"),
    ("tdx_get_cpuid", uapi.KVM_X86_TDX_VM, lambda vm, vcpu, bad: vcpu.tdx_get_cpuid(bad), "Cpuid2"),
    ("snp_launch_start", uapi.KVM_X86_SNP_VM, lambda vm, vcpu, bad: vm.snp_launch_start(bad), "SevSnpLaunchStart"),
    ("snp_launch_update", uapi.KVM_X86_SNP_VM, lambda vm, vcpu, bad: vm.snp_launch_update(bad), "SevSnpLaunchUpdate"),
    ("snp_launch_finish", uapi.KVM_X86_SNP_VM, lambda vm, vcpu, bad: vm.snp_launch_finish(bad), "SevSnpLaunchFinish"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "vm_type", "call", "expected"), WRONG_STRUCT, ids=[w[0] for w in WRONG_STRUCT])
@pytest.mark.parametrize("bad", [(0, 4096, 0), uapi.PreFaultMemory(0, 4096), None], ids=["tuple", "other", "None"])
def test_an_ioctl_given_the_wrong_struct_names_the_struct_it_expects(
    name: str, vm_type: int, call: Call, expected: str, bad: object
) -> None:
    if expected == "PreFaultMemory" and isinstance(bad, uapi.PreFaultMemory):
        bad = uapi.MemoryAttributes(0, 4096, 0)
    if bad is None and name in ("tdx_init_vm", "snp_launch_finish", "create_guest_memfd"):
        pytest.skip("None is the documented default of this argument")

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        vcpu = None
        if name in ("pre_fault_memory", "tdx_init_mem_region", "tdx_get_cpuid"):
            if vm_type == uapi.KVM_X86_TDX_VM:
                await vm.tdx_init_vm()
            vcpu = await vm.create_vcpu(0)
        with pytest.raises(TypeError) as info:
            await call(vm, vcpu, bad)
        assert f"uapi.{expected}," in str(info.value), str(info.value)
        assert not vm.dead

    run_once(body)


@pytest.mark.parametrize(
    "call",
    [
        lambda kvm: kvm.create_vm(5.0),
        lambda kvm: kvm.create_vm("KVM_X86_TDX_VM"),
    ],
)
def test_scalar_ioctl_arguments_must_be_ints(call: Callable[[asyncvm.Kvm], Awaitable[Any]]) -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        await _expect_type_error(call(kvm), "kvm.create_vm", "'vm_type'")
        vm = await kvm.create_vm()
        await _expect_type_error(vm.create_vcpu(0.0), "vm.create_vcpu", "'vcpu_id'")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'cap'"):
            vm.check_extension(None)  # type: ignore[arg-type]

    run_once(body)


def test_tdx_command_flags_must_be_ints() -> None:
    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
        await _expect_type_error(vm.tdx_init_vm(flags=0.0), "TdxCmd.flags")  # type: ignore[arg-type]
        await vm.tdx_init_vm()
        vcpu = await vm.create_vcpu(0)
        await _expect_type_error(vcpu.tdx_init_vcpu(data=None), "TdxCmd.data")  # type: ignore[arg-type]
        await vcpu.tdx_init_vcpu()

    run_once(body)


# -- embedded structs and the int spellings C accepts -------------------------------------------


def test_embedded_structs_are_type_checked() -> None:
    with pytest.raises(TypeError, match=r"TdxInitVm\.cpuid must be a Cpuid2, not int"):
        uapi.TdxInitVm(cpuid=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Cpuid2\.entries must be a list of CpuidEntry2"):
        uapi.Cpuid2(1, [3])  # type: ignore[list-item]
    assert uapi.Cpuid2(1, (uapi.CpuidEntry2(),)).entries == [uapi.CpuidEntry2()]  # type: ignore[arg-type]


class _Flag(enum.IntEnum):
    ONE = 1


def test_bools_and_int_enums_are_stored_as_the_plain_int_c_copies() -> None:
    finish = uapi.SevSnpLaunchFinish(id_block_en=True, flags=_Flag.ONE)  # type: ignore[arg-type]
    assert type(finish.id_block_en) is int and finish.id_block_en == 1
    assert type(finish.flags) is int and finish.flags == 1
    assert uapi.check_int(True, "x", "f") == 1 and type(uapi.check_int(_Flag.ONE, "x", "f")) is int


def test_out_of_range_ints_are_read_modulo_the_c_field_width() -> None:
    """Not a ValueError: the struct holds what C would, and the ioctl reads __u64 fields modulo
    2**64 (virt/kvm/kvm_main.c: kvm_vcpu_pre_fault_memory() sees gpa + 2**64 as gpa)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm()
        addr = await kvm.mm.mmap(4 * PAGE)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 4 * PAGE, addr))
        vcpu = await vm.create_vcpu(0)
        r = uapi.PreFaultMemory((1 << 64) + PAGE, PAGE)
        await vcpu.pre_fault_memory(r)
        assert (r.gpa, r.size) == (2 * PAGE, 0)  # copied back as the u64 the kernel worked on
        with pytest.raises(KvmError) as err:
            await vcpu.pre_fault_memory(uapi.PreFaultMemory(-PAGE, 2 * PAGE))  # 2**64 - 4096: wraps
        assert err.value.errno == uapi.EINVAL

    run_once(body)
