"""Tests for asyncvm.uapi: struct signatures, KvmError, constant values, helpers."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvm import uapi
from asyncvm.uapi import (
    CreateGuestMemfd,
    KvmError,
    MemoryAttributes,
    MemoryFaultExit,
    PreFaultMemory,
    Run,
    SevSnpLaunchFinish,
    SevSnpLaunchStart,
    SevSnpLaunchUpdate,
    TdxCapabilities,
    TdxCmd,
    TdxInitMemRegion,
    TdxInitVm,
    UserspaceMemoryRegion,
    UserspaceMemoryRegion2,
)

_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _positional(cls: type) -> list[tuple[str, object]]:
    """(name, default) of the parameters that can be passed positionally."""
    return [(p.name, p.default) for p in inspect.signature(cls).parameters.values() if p.kind is _POS]


_EMPTY = inspect.Parameter.empty

# ---------------------------------------------------------------------------------------
# Constructor signatures: the DESIGN.md "Public API" contract
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (PreFaultMemory, [("gpa", _EMPTY), ("size", _EMPTY), ("flags", 0)]),
        (
            MemoryAttributes,
            [
                ("address", _EMPTY),
                ("size", _EMPTY),
                ("attributes", _EMPTY),
                ("flags", 0),
            ],
        ),
        (
            UserspaceMemoryRegion2,
            [
                ("slot", _EMPTY),
                ("flags", _EMPTY),
                ("guest_phys_addr", _EMPTY),
                ("memory_size", _EMPTY),
                ("userspace_addr", _EMPTY),
                ("guest_memfd_offset", 0),
                ("guest_memfd", None),
            ],
        ),
        (
            UserspaceMemoryRegion,
            [
                ("slot", _EMPTY),
                ("flags", _EMPTY),
                ("guest_phys_addr", _EMPTY),
                ("memory_size", _EMPTY),
                ("userspace_addr", _EMPTY),
            ],
        ),
        (CreateGuestMemfd, [("size", _EMPTY), ("flags", 0)]),
        (
            TdxInitMemRegion,
            [("source_addr", _EMPTY), ("gpa", _EMPTY), ("nr_pages", _EMPTY)],
        ),
        (
            SevSnpLaunchUpdate,
            [
                ("gfn_start", _EMPTY),
                ("uaddr", _EMPTY),
                ("len", _EMPTY),
                ("type", _EMPTY),
                ("flags", 0),
            ],
        ),
        (
            SevSnpLaunchStart,
            [("policy", _EMPTY), ("gosvw", bytes(16)), ("flags", 0)],
        ),
        (
            SevSnpLaunchFinish,
            [
                ("id_block_uaddr", 0),
                ("id_auth_uaddr", 0),
                ("id_block_en", 0),
                ("auth_key_en", 0),
                ("vcek_disabled", 0),
                ("host_data", bytes(32)),
                ("flags", 0),
            ],
        ),
        (TdxCmd, [("id", _EMPTY), ("flags", 0), ("data", 0), ("hw_error", 0)]),
        (MemoryFaultExit, [("flags", 0), ("gpa", 0), ("size", 0)]),
    ],
)
def test_positional_signature(cls: type, expected: list[tuple[str, object]]) -> None:
    assert _positional(cls) == expected


def test_padding_fields_are_keyword_only() -> None:
    params = inspect.signature(PreFaultMemory).parameters
    assert params["padding"].kind is inspect.Parameter.KEYWORD_ONLY
    assert PreFaultMemory(0, 4096).padding == (0, 0, 0, 0, 0)
    r2 = inspect.signature(UserspaceMemoryRegion2).parameters
    assert r2["pad1"].kind is inspect.Parameter.KEYWORD_ONLY
    assert r2["pad2"].kind is inspect.Parameter.KEYWORD_ONLY
    assert UserspaceMemoryRegion2(0, 0, 0, 0, 0).pad2 == (0,) * 14
    assert CreateGuestMemfd(4096).reserved == (0,) * 6


def test_design_md_example_constructs() -> None:
    gmem = object()  # stands in for the guest_memfd file object
    region = UserspaceMemoryRegion2(
        slot=0,
        flags=uapi.KVM_MEM_GUEST_MEMFD,
        guest_phys_addr=0,
        memory_size=64 << 12,
        userspace_addr=0x7F00_0000_0000,
        guest_memfd=gmem,
        guest_memfd_offset=0,
    )
    assert region.guest_memfd is gmem
    attrs = MemoryAttributes(0, 64 << 12, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert (attrs.address, attrs.size, attrs.flags) == (0, 64 << 12, 0)
    r = PreFaultMemory(gpa=0, size=64 << 12)
    assert (r.gpa, r.size, r.flags) == (0, 64 << 12, 0)


def test_positional_and_keyword_construction_agree() -> None:
    assert PreFaultMemory(4096, 8192, 0) == PreFaultMemory(gpa=4096, size=8192, flags=0)
    assert MemoryAttributes(1, 2, 8, 0) == MemoryAttributes(address=1, size=2, attributes=8, flags=0)
    assert UserspaceMemoryRegion2(1, 4, 0x1000, 0x2000, 0x3000, 0x4000, 7) == (
        UserspaceMemoryRegion2(
            slot=1,
            flags=4,
            guest_phys_addr=0x1000,
            memory_size=0x2000,
            userspace_addr=0x3000,
            guest_memfd_offset=0x4000,
            guest_memfd=7,
        )
    )
    assert CreateGuestMemfd(1 << 20, 1) == CreateGuestMemfd(size=1 << 20, flags=1)
    assert TdxInitMemRegion(0x1000, 0x2000, 3) == TdxInitMemRegion(source_addr=0x1000, gpa=0x2000, nr_pages=3)
    upd = SevSnpLaunchUpdate(0x10, 0x7000, 0x3000, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert upd == SevSnpLaunchUpdate(gfn_start=0x10, uaddr=0x7000, len=0x3000, type=1)
    assert upd.flags == 0 and upd.pad0 == 0 and upd.pad2 == (0, 0, 0, 0)
    assert TdxCmd(uapi.KVM_TDX_INIT_VM, 0, 0x1234) == TdxCmd(id=1, data=0x1234)


def test_field_order_follows_kernel_structs() -> None:
    # include/uapi/linux/kvm.h
    assert [f.name for f in dataclasses.fields(UserspaceMemoryRegion2)] == [
        "slot",
        "flags",
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
        "guest_memfd_offset",
        "guest_memfd",
        "pad1",
        "pad2",
    ]
    assert [f.name for f in dataclasses.fields(PreFaultMemory)] == [
        "gpa",
        "size",
        "flags",
        "padding",
    ]
    # arch/x86/include/uapi/asm/kvm.h
    assert [f.name for f in dataclasses.fields(SevSnpLaunchUpdate)] == [
        "gfn_start",
        "uaddr",
        "len",
        "type",
        "pad0",
        "flags",
        "pad1",
        "pad2",
    ]
    assert [f.name for f in dataclasses.fields(SevSnpLaunchFinish)] == [
        "id_block_uaddr",
        "id_auth_uaddr",
        "id_block_en",
        "auth_key_en",
        "vcek_disabled",
        "host_data",
        "pad0",
        "flags",
        "pad1",
    ]
    assert [f.name for f in dataclasses.fields(SevSnpLaunchStart)] == [
        "policy",
        "gosvw",
        "flags",
        "pad0",
        "pad1",
    ]
    assert [f.name for f in dataclasses.fields(TdxInitVm)] == [
        "attributes",
        "xfam",
        "mrconfigid",
        "mrowner",
        "mrownerconfig",
        "reserved",
        "cpuid",
    ]
    caps = TdxCapabilities()
    assert caps.supported_attrs == 0 and caps.supported_xfam == 0
    assert len(caps.reserved) == 250


def test_struct_names_follow_kernel_names() -> None:
    for kernel_name, cls in uapi.STRUCTS.items():
        assert kernel_name.startswith("kvm_")
        camel = "".join(p.capitalize() for p in kernel_name[len("kvm_") :].split("_"))
        assert cls.__name__ == camel
        assert kernel_name in (cls.__doc__ or "").splitlines()[0]


# ---------------------------------------------------------------------------------------
# Struct behaviour: mutable in place, type sanity only
# ---------------------------------------------------------------------------------------


def test_structs_are_mutable_in_place() -> None:
    r = PreFaultMemory(0, 8192)
    r.gpa += 4096
    r.size -= 4096
    assert (r.gpa, r.size) == (4096, 4096)
    region = TdxInitMemRegion(0x1000, 0x2000, 2)
    region.nr_pages = 0
    assert region.nr_pages == 0


def test_slots_reject_misspelled_fields() -> None:
    r = PreFaultMemory(0, 4096)
    with pytest.raises(AttributeError):
        r.gps = 1  # type: ignore[attr-defined]


def test_semantically_bad_values_are_accepted() -> None:
    # Alignment, wrap-around and unknown flags are the ioctl's business (errnos), not ours.
    r = PreFaultMemory(gpa=1, size=3, flags=0xDEAD)
    assert (r.gpa, r.size, r.flags) == (1, 3, 0xDEAD)
    assert PreFaultMemory(-4096, uapi.U64_MAX).gpa == -4096
    assert CreateGuestMemfd(size=0, flags=1 << 63).size == 0
    assert SevSnpLaunchUpdate(0, 0, 1, type=2).type == 2


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"),
    [
        (PreFaultMemory, ("0", 4096), {}),
        (PreFaultMemory, (0, 4096.0), {}),
        (MemoryAttributes, (0, 4096, None), {}),
        (UserspaceMemoryRegion2, (0, 0, 0, 0, 0), {"guest_memfd_offset": "x"}),
        (TdxInitMemRegion, (0, 0, [1]), {}),
        (SevSnpLaunchStart, (), {"policy": 0, "gosvw": "not bytes"}),
        (PreFaultMemory, (0, 4096), {"padding": (0, "x")}),
    ],
)
def test_wrong_python_types_raise_type_error(cls: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        cls(*args, **kwargs)


def test_byte_and_tuple_fields_are_normalised() -> None:
    start = SevSnpLaunchStart(1, bytearray(16))  # type: ignore[arg-type]
    assert type(start.gosvw) is bytes
    r = PreFaultMemory(0, 4096, padding=[0] * 5)  # type: ignore[arg-type]
    assert r.padding == (0,) * 5


def test_guest_memfd_accepts_any_object() -> None:
    for value in (None, 3, object()):
        assert UserspaceMemoryRegion2(0, 0, 0, 0, 0, 0, value).guest_memfd is value


def test_region_v1_converts_to_v2() -> None:
    v1 = UserspaceMemoryRegion(1, uapi.KVM_MEM_READONLY, 0x1000, 0x2000, 0x3000)
    v2 = v1.as_region2()
    assert v2 == UserspaceMemoryRegion2(1, uapi.KVM_MEM_READONLY, 0x1000, 0x2000, 0x3000)
    assert v2.guest_memfd is None and v2.guest_memfd_offset == 0


def test_run_memory_fault_exit() -> None:
    run = Run()
    assert run.exit_reason == uapi.KVM_EXIT_UNKNOWN
    run.prepare_memory_fault_exit(gpa=0x5000, size=4096, is_private=True)
    assert run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
    assert run.memory_fault == MemoryFaultExit(uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x5000, 4096)
    assert run.memory_fault.is_private
    run.prepare_memory_fault_exit(gpa=0x6000, size=4096, is_private=False)
    assert run.memory_fault.flags == 0 and not run.memory_fault.is_private
    assert Run().memory_fault is not Run().memory_fault


def test_tdx_init_vm_defaults() -> None:
    init = TdxInitVm()
    assert init.mrconfigid == init.mrowner == init.mrownerconfig == bytes(48)
    assert init.reserved == (0,) * 12
    assert init.cpuid.nent == 0 and init.cpuid.entries == []
    assert TdxInitVm().cpuid is not init.cpuid


# ---------------------------------------------------------------------------------------
# KvmError
# ---------------------------------------------------------------------------------------


def test_kvm_error_is_os_error_with_kernel_errno() -> None:
    err = KvmError(errno.EINVAL)
    assert isinstance(err, OSError)
    assert err.errno == errno.EINVAL == 22
    assert err.name == "EINVAL"
    assert err.detail is None
    assert str(err) == "[Errno 22] EINVAL: Invalid argument"


def test_kvm_error_with_detail() -> None:
    err = KvmError(errno.ENOENT, "gpa 0x1000 is not in any memslot")
    assert err.errno == errno.ENOENT
    assert err.detail == "gpa 0x1000 is not in any memslot"
    assert str(err) == "[Errno 2] ENOENT: gpa 0x1000 is not in any memslot"
    assert "\n" not in str(err)
    assert repr(err) == "KvmError(ENOENT, 'gpa 0x1000 is not in any memslot')"


def test_kvm_error_accepts_negative_kernel_return() -> None:
    assert KvmError(-errno.EFAULT).errno == errno.EFAULT


def test_kvm_error_is_caught_as_os_error() -> None:
    with pytest.raises(OSError) as info:
        raise KvmError(uapi.EOPNOTSUPP, "pre-fault before TD finalization")
    assert info.value.errno == errno.EOPNOTSUPP
    assert isinstance(info.value, KvmError)
    assert info.value.name == "EOPNOTSUPP"


def test_kvm_error_pickles() -> None:
    err = KvmError(uapi.EHWPOISON, "poisoned")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is KvmError
    assert (copy.errno, copy.detail, str(copy)) == (err.errno, err.detail, str(err))


def test_kvm_error_rejects_non_errnos() -> None:
    with pytest.raises(TypeError):
        KvmError("EINVAL")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KvmError(0)


@pytest.mark.parametrize(
    "name",
    [
        "EOPNOTSUPP",
        "EHWPOISON",
        "EAGAIN",
        "EINTR",
        "EIO",
        "ENOENT",
        "EEXIST",
        "EFAULT",
        "EBADF",
        "EBUSY",
        "ENODEV",
        "E2BIG",
        "ENOMEM",
        "EFBIG",
        "EPERM",
        "ENOSPC",
        "ENXIO",
        "EINVAL",
        "ENOTTY",
    ],
)
def test_errno_constants_and_names(name: str) -> None:
    value = getattr(uapi, name)
    assert isinstance(value, int) and value > 0
    if hasattr(errno, name):
        assert value == getattr(errno, name)
    assert uapi.errno_name(value) == name
    assert uapi.errno_name(-value) == name
    assert KvmError(value).name == name
    assert str(KvmError(value, "x")) == f"[Errno {value}] {name}: x"


def test_ehwpoison_is_the_x86_value() -> None:
    # include/uapi/asm-generic/errno.h
    assert uapi.EHWPOISON == 133


def test_errno_name_of_unknown_number() -> None:
    assert uapi.errno_name(4242) == "EUNKNOWN_4242"


# ---------------------------------------------------------------------------------------
# Constant values (spot checks against the kernel headers named in each comment)
# ---------------------------------------------------------------------------------------


def test_vm_types() -> None:
    # arch/x86/include/uapi/asm/kvm.h
    assert [
        uapi.KVM_X86_DEFAULT_VM,
        uapi.KVM_X86_SW_PROTECTED_VM,
        uapi.KVM_X86_SEV_VM,
        uapi.KVM_X86_SEV_ES_VM,
        uapi.KVM_X86_SNP_VM,
        uapi.KVM_X86_TDX_VM,
    ] == [0, 1, 2, 3, 4, 5]
    assert uapi.vm_type_name(5) == "KVM_X86_TDX_VM"
    assert uapi.vm_type_name(99) == "KVM_X86_99?"


def test_memslot_attribute_and_gmem_flags() -> None:
    # include/uapi/linux/kvm.h
    assert uapi.KVM_MEM_LOG_DIRTY_PAGES == 1
    assert uapi.KVM_MEM_READONLY == 2
    assert uapi.KVM_MEM_GUEST_MEMFD == 4
    assert uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE == 8
    assert uapi.GUEST_MEMFD_FLAG_MMAP == 1
    assert uapi.GUEST_MEMFD_FLAG_INIT_SHARED == 2


def test_exit_codes_and_caps() -> None:
    # include/uapi/linux/kvm.h
    assert uapi.KVM_EXIT_MEMORY_FAULT == 39
    assert uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE == 1 << 3
    assert uapi.exit_reason_name(39) == "KVM_EXIT_MEMORY_FAULT"
    assert uapi.KVM_CAP_USER_MEMORY2 == 231
    assert uapi.KVM_CAP_MEMORY_ATTRIBUTES == 233
    assert uapi.KVM_CAP_GUEST_MEMFD == 234
    assert uapi.KVM_CAP_VM_TYPES == 235
    assert uapi.KVM_CAP_PRE_FAULT_MEMORY == 236
    assert uapi.KVM_CAP_GUEST_MEMFD_FLAGS == 244


def test_falloc_mman_values() -> None:
    # include/uapi/linux/falloc.h
    assert uapi.FALLOC_FL_KEEP_SIZE == 0x01
    assert uapi.FALLOC_FL_PUNCH_HOLE == 0x02
    assert uapi.FALLOC_FL_COLLAPSE_RANGE == 0x08
    assert uapi.FALLOC_FL_ZERO_RANGE == 0x10
    assert uapi.FALLOC_FL_INSERT_RANGE == 0x20
    assert uapi.FALLOC_FL_UNSHARE_RANGE == 0x40
    # include/uapi/asm-generic/mman-common.h
    assert uapi.MADV_DONTNEED == 4
    assert uapi.MADV_REMOVE == 9
    assert uapi.MADV_COLLAPSE == 25
    assert (uapi.PROT_READ, uapi.PROT_WRITE, uapi.PROT_EXEC) == (1, 2, 4)
    assert (uapi.MAP_SHARED, uapi.MAP_PRIVATE, uapi.MAP_FIXED) == (1, 2, 0x10)
    assert uapi.MAP_ANONYMOUS == 0x20  # x86 value


def test_tdx_and_snp_values() -> None:
    # arch/x86/include/uapi/asm/kvm.h
    assert [
        uapi.KVM_TDX_CAPABILITIES,
        uapi.KVM_TDX_INIT_VM,
        uapi.KVM_TDX_INIT_VCPU,
        uapi.KVM_TDX_INIT_MEM_REGION,
        uapi.KVM_TDX_FINALIZE_VM,
        uapi.KVM_TDX_GET_CPUID,
    ] == [0, 1, 2, 3, 4, 5]
    assert uapi.KVM_TDX_MEASURE_MEMORY_REGION == 1
    assert uapi.KVM_SEV_INIT2 == 22
    assert uapi.KVM_SEV_SNP_LAUNCH_START == 100
    assert uapi.KVM_SEV_SNP_LAUNCH_UPDATE == 101
    assert uapi.KVM_SEV_SNP_LAUNCH_FINISH == 102
    assert uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL == 1
    assert uapi.KVM_SEV_SNP_PAGE_TYPE_ZERO == 3
    assert uapi.KVM_SEV_SNP_PAGE_TYPE_UNMEASURED == 4
    assert uapi.KVM_SEV_SNP_PAGE_TYPE_SECRETS == 5
    assert uapi.KVM_SEV_SNP_PAGE_TYPE_CPUID == 6


def test_limits() -> None:
    # include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h
    assert uapi.KVM_MEM_MAX_NR_PAGES == 2**31 - 1
    assert uapi.KVM_USER_MEM_SLOTS == 32764
    assert uapi.KVM_MAX_NR_ADDRESS_SPACES == 2
    assert uapi.KVM_MAX_VCPUS == 1024
    assert (uapi.PAGE_SHIFT, uapi.PAGE_SIZE) == (12, 4096)


def test_ioctl_numbers() -> None:
    # _IO/_IOW/_IOWR encodings of include/uapi/linux/kvm.h with the x86 struct sizes
    assert uapi.KVM_CREATE_VM == 0xAE01
    assert uapi.KVM_RUN == 0xAE80
    assert uapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert uapi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert uapi.KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA
    assert uapi.KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2
    assert uapi.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    assert uapi.KVM_PRE_FAULT_MEMORY == 0xC040AED5


def test_constants_are_plain_ints() -> None:
    for name in dir(uapi):
        if name.startswith(("KVM_", "FALLOC_FL_", "MADV_", "GUEST_MEMFD_FLAG_")):
            assert type(getattr(uapi, name)) is int, name


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=uapi.U64_MAX >> uapi.PAGE_SHIFT))
def test_gfn_gpa_round_trip(gfn: int) -> None:
    gpa = uapi.gfn_to_gpa(gfn)
    assert uapi.page_aligned(gpa)
    assert uapi.gpa_to_gfn(gpa) == gfn
    assert uapi.gpa_to_gfn(gpa + uapi.PAGE_SIZE - 1) == gfn


@given(st.integers(min_value=0, max_value=uapi.U64_MAX))
def test_page_align(x: int) -> None:
    up = uapi.page_align(x)
    assert uapi.page_aligned(up)
    assert x <= up < x + uapi.PAGE_SIZE
    assert uapi.page_aligned(x) == (up == x)


def test_u64_wraps_like_c() -> None:
    assert uapi.u64(uapi.U64_MAX + 1) == 0
    assert uapi.u64(-1) == uapi.U64_MAX
    gpa, size = uapi.U64_MAX - 4095, 8192
    assert uapi.u64(gpa + size) <= gpa  # the kernel's "gpa + size <= gpa" overflow check
    assert not uapi.page_aligned(1)
    assert uapi.page_aligned(0)
