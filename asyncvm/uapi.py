"""Mirror of the Linux KVM user-space API (uAPI) that the asyncvm emulator exposes.

Everything a VMM hands to the emulated ``/dev/kvm`` lives here: constants with their
kernel names and values; the ioctl argument structs, as mutable dataclasses named after
the kernel struct in CamelCase without the ``kvm_`` prefix, with the kernel's field
names and field order; the errno-carrying exception :class:`KvmError`; page helpers.

Sources followed (values checked against the headers, not copied from them):

- ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h`` of Linux 6.18 and
  the kvm-x86 ``next`` branch of early 2026 (guest_memfd MMAP/INIT_SHARED flags, TDX and
  SEV-SNP launch commands, ``KVM_PRE_FAULT_MEMORY``);
- ``include/uapi/linux/falloc.h`` and ``include/uapi/asm-generic/mman-common.h`` for the
  ``FALLOC_FL_*``, ``MADV_*``, ``PROT_*`` and ``MAP_*`` values (x86);
- ``include/linux/kvm_host.h`` and ``arch/x86/include/asm/kvm_host.h`` for the few
  kernel-internal limits userspace can observe (memslots, pages per slot, vCPUs).

The structs check Python types only, on construction: an int field takes an int (a bool
or an ``IntEnum`` is stored as the plain int it is), a byte array takes bytes, an embedded
struct takes that struct; anything else is a ``TypeError`` naming the struct and field.
Semantic checks (alignment, flags, overflow) belong to the ioctl implementations, which
report them as the kernel does: by raising :class:`KvmError` with the kernel's errno.
Numbers are plain Python ints and are not range-checked: the kernel sees the value a C
``__u64``/``__u32`` field would hold, so an ioctl reads a negative or too-large int modulo
``2**64`` (``2**32``), with :func:`u64`/:func:`u32`, as ``copy_from_user()`` of the C
struct would give it (``-4096`` is ``2**64 - 4096``, which then wraps or fails alignment).
The ioctl methods check what they are handed the same way: the wrong struct, a tuple or
a float where an int belongs is a ``TypeError`` naming the struct or argument expected
(:func:`check_struct`, :func:`check_int`), raised before any lock is taken.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

# --------------------------------------------------------------------------------------
# errno values and KvmError
# --------------------------------------------------------------------------------------

#: Linux x86 value of EHWPOISON ("memory page has hardware error"); the ``errno``
#: module of older Pythons does not export it.
EHWPOISON: Final[int] = getattr(_errno, "EHWPOISON", 133)
#: include/linux/errno.h: kernel-internal "this handler does not do that ioctl" (never reaches userspace)
ENOIOCTLCMD: Final[int] = 515

EPERM: Final[int] = _errno.EPERM
ENOENT: Final[int] = _errno.ENOENT
EINTR: Final[int] = _errno.EINTR
EIO: Final[int] = _errno.EIO
ENXIO: Final[int] = _errno.ENXIO
E2BIG: Final[int] = _errno.E2BIG
EBADF: Final[int] = _errno.EBADF
EAGAIN: Final[int] = _errno.EAGAIN
ENOMEM: Final[int] = _errno.ENOMEM
EFAULT: Final[int] = _errno.EFAULT
EBUSY: Final[int] = _errno.EBUSY
EEXIST: Final[int] = _errno.EEXIST
ENODEV: Final[int] = _errno.ENODEV
EINVAL: Final[int] = _errno.EINVAL
ENOTTY: Final[int] = _errno.ENOTTY
EFBIG: Final[int] = _errno.EFBIG
ENOSPC: Final[int] = _errno.ENOSPC
ERANGE: Final[int] = _errno.ERANGE
ENOSYS: Final[int] = _errno.ENOSYS
EOVERFLOW: Final[int] = _errno.EOVERFLOW
EOPNOTSUPP: Final[int] = _errno.EOPNOTSUPP

# Where several symbolic names share one number, prefer the spelling the kernel uses.
_PREFERRED_ERRNO_NAMES: Final[dict[int, str]] = {
    _errno.EAGAIN: "EAGAIN",  # not EWOULDBLOCK
    _errno.EOPNOTSUPP: "EOPNOTSUPP",  # not ENOTSUP
    _errno.EDEADLK: "EDEADLK",  # not EDEADLOCK
    EHWPOISON: "EHWPOISON",
}


def errno_name(n: int) -> str:
    """Symbolic name of errno ``n``, sign ignored: ``errno_name(-22) == "EINVAL"``.

    Unknown numbers give a placeholder such as ``"EUNKNOWN_4242"``.
    """
    code = -n if n < 0 else n
    name = _PREFERRED_ERRNO_NAMES.get(code) or _errno.errorcode.get(code)
    return name if name is not None else f"EUNKNOWN_{code}"


def _strerror(code: int) -> str:
    if code == EHWPOISON:
        return "Memory page has hardware error"
    return os.strerror(code)


class KvmError(OSError):
    """An ioctl failure: the kernel returned ``-errno``.

    ``KvmError(errno.EINVAL)`` or ``KvmError(errno.EINVAL, "gpa not page aligned")``.
    A negative value (the raw kernel return) is accepted and stored positive. ``.errno``
    is the positive kernel errno, ``.name`` its symbolic name, ``.detail`` the optional
    explanation, and ``str()`` a one-liner such as
    ``[Errno 22] EINVAL: gpa not page aligned``.
    """

    detail: str | None

    def __init__(self, errno_value: int, detail: str | None = None) -> None:
        if isinstance(errno_value, bool) or not isinstance(errno_value, int):
            raise TypeError(f"KvmError needs an int errno, not {type(errno_value).__name__}")
        code = -errno_value if errno_value < 0 else errno_value
        if code == 0:
            raise ValueError("KvmError needs a nonzero errno")
        super().__init__(code, detail if detail else _strerror(code))
        self.detail = detail

    @property
    def name(self) -> str:
        """Symbolic errno name, e.g. ``"EINVAL"``."""
        return errno_name(self.errno or 0)

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.name}: {self.strerror}"

    def __repr__(self) -> str:
        if self.detail is None:
            return f"KvmError({self.name})"
        return f"KvmError({self.name}, {self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.detail))


# --------------------------------------------------------------------------------------
# Pages, gfns and u64 arithmetic
# --------------------------------------------------------------------------------------

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
#: Kernel-style mask: ``x & PAGE_MASK`` rounds a non-negative ``x`` down to a page.
PAGE_MASK: Final = ~(PAGE_SIZE - 1)

U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1


def u64(x: int) -> int:
    """Truncate ``x`` to an unsigned 64-bit value, as C ``u64`` arithmetic would."""
    return x & U64_MAX


def u32(x: int) -> int:
    """Truncate ``x`` to an unsigned 32-bit value (a ``__u32`` struct field)."""
    return x & U32_MAX


def s64(x: int) -> int:
    """``x`` as a C ``s64``/``loff_t`` holds it: truncated to 64 bits, two's complement."""
    x &= U64_MAX
    return x - (1 << 64) if x >> 63 else x


def s32(x: int) -> int:
    """``x`` as a C ``int`` holds it: truncated to 32 bits, two's complement."""
    x &= U32_MAX
    return x - (1 << 32) if x >> 31 else x


def gpa_to_gfn(gpa: int) -> int:
    """Guest physical address -> guest frame number (``gpa >> PAGE_SHIFT``)."""
    return gpa >> PAGE_SHIFT


def gfn_to_gpa(gfn: int) -> int:
    """Guest frame number -> guest physical address (``gfn << PAGE_SHIFT``)."""
    return gfn << PAGE_SHIFT


def page_aligned(x: int) -> bool:
    """``PAGE_ALIGNED(x)``: true if ``x`` is a multiple of :data:`PAGE_SIZE`."""
    return (x & (PAGE_SIZE - 1)) == 0


def page_align(x: int) -> int:
    """``PAGE_ALIGN(x)``: round ``x`` up to the next page boundary."""
    return (x + PAGE_SIZE - 1) & PAGE_MASK


# --------------------------------------------------------------------------------------
# Limits userspace can observe (x86)
# --------------------------------------------------------------------------------------

KVM_API_VERSION: Final = 12
#: ``CONFIG_KVM_MAX_NR_VCPUS``, whose default is 1024 (4096 with MAXSMP).
KVM_MAX_VCPUS: Final = 1024
#: Two address spaces on x86: normal and SMM.
KVM_MAX_NR_ADDRESS_SPACES: Final = 2
KVM_MEM_SLOTS_NUM: Final = 32767  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS: Final = 3  # x86: TSS, identity map, APIC access page
KVM_USER_MEM_SLOTS: Final = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
#: A memslot may span at most this many pages.
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1
KVM_MAX_CPUID_ENTRIES: Final = 256

# --------------------------------------------------------------------------------------
# VM types (KVM_CREATE_VM argument on x86)
# --------------------------------------------------------------------------------------

KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5

# --------------------------------------------------------------------------------------
# Memslots, memory attributes, guest_memfd
# --------------------------------------------------------------------------------------

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2

KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3

GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1

# --------------------------------------------------------------------------------------
# fallocate(2) modes (include/uapi/linux/falloc.h)
# --------------------------------------------------------------------------------------

FALLOC_FL_ALLOCATE_RANGE: Final = 0x00
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_NO_HIDE_STALE: Final = 0x04
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20
FALLOC_FL_UNSHARE_RANGE: Final = 0x40
FALLOC_FL_WRITE_ZEROES: Final = 0x80

# --------------------------------------------------------------------------------------
# mmap(2) / madvise(2) (asm-generic/mman-common.h, x86)
# --------------------------------------------------------------------------------------

PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_SHARED_VALIDATE: Final = 0x03
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
MAP_POPULATE: Final = 0x8000
MAP_FIXED_NOREPLACE: Final = 0x100000

MADV_NORMAL: Final = 0
MADV_RANDOM: Final = 1
MADV_SEQUENTIAL: Final = 2
MADV_WILLNEED: Final = 3
MADV_DONTNEED: Final = 4
MADV_FREE: Final = 8
MADV_REMOVE: Final = 9
MADV_DONTFORK: Final = 10
MADV_DOFORK: Final = 11
MADV_MERGEABLE: Final = 12
MADV_UNMERGEABLE: Final = 13
MADV_HUGEPAGE: Final = 14
MADV_NOHUGEPAGE: Final = 15
MADV_DONTDUMP: Final = 16
MADV_DODUMP: Final = 17
MADV_COLD: Final = 20
MADV_PAGEOUT: Final = 21
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23
MADV_DONTNEED_LOCKED: Final = 24
MADV_COLLAPSE: Final = 25
MADV_HWPOISON: Final = 100
MADV_SOFT_OFFLINE: Final = 101

# --------------------------------------------------------------------------------------
# KVM_RUN exit reasons and memory-fault exit flags
# --------------------------------------------------------------------------------------

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_AP_RESET_HOLD: Final = 32
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_XEN: Final = 34
KVM_EXIT_NOTIFY: Final = 37
KVM_EXIT_MEMORY_FAULT: Final = 39
KVM_EXIT_TDX: Final = 40

KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3

# --------------------------------------------------------------------------------------
# Capabilities (KVM_CHECK_EXTENSION)
# --------------------------------------------------------------------------------------

KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_X86_SMM: Final = 117
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_VM_GPA_BITS: Final = 207
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_X86_APIC_BUS_CYCLES_NS: Final = 237
KVM_CAP_X86_GUEST_MODE: Final = 238
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

# --------------------------------------------------------------------------------------
# Intel TDX (KVM_MEMORY_ENCRYPT_OP sub-commands, enum kvm_tdx_cmd_id)
# --------------------------------------------------------------------------------------

KVM_TDX_CAPABILITIES: Final = 0
KVM_TDX_INIT_VM: Final = 1
KVM_TDX_INIT_VCPU: Final = 2
KVM_TDX_INIT_MEM_REGION: Final = 3
KVM_TDX_FINALIZE_VM: Final = 4
KVM_TDX_GET_CPUID: Final = 5
KVM_TDX_CMD_NR_MAX: Final = 6

#: The only flag of KVM_TDX_INIT_MEM_REGION: extend the TD measurement (MRTD).
KVM_TDX_MEASURE_MEMORY_REGION: Final = 1 << 0

# --------------------------------------------------------------------------------------
# AMD SEV / SEV-SNP (KVM_MEMORY_ENCRYPT_OP sub-commands, enum sev_cmd_id)
# --------------------------------------------------------------------------------------

KVM_SEV_INIT: Final = 0
KVM_SEV_ES_INIT: Final = 1
KVM_SEV_LAUNCH_START: Final = 2
KVM_SEV_LAUNCH_UPDATE_DATA: Final = 3
KVM_SEV_LAUNCH_UPDATE_VMSA: Final = 4
KVM_SEV_LAUNCH_SECRET: Final = 5
KVM_SEV_LAUNCH_MEASURE: Final = 6
KVM_SEV_LAUNCH_FINISH: Final = 7
KVM_SEV_SEND_START: Final = 8
KVM_SEV_SEND_UPDATE_DATA: Final = 9
KVM_SEV_SEND_UPDATE_VMSA: Final = 10
KVM_SEV_SEND_FINISH: Final = 11
KVM_SEV_RECEIVE_START: Final = 12
KVM_SEV_RECEIVE_UPDATE_DATA: Final = 13
KVM_SEV_RECEIVE_UPDATE_VMSA: Final = 14
KVM_SEV_RECEIVE_FINISH: Final = 15
KVM_SEV_GUEST_STATUS: Final = 16
KVM_SEV_DBG_DECRYPT: Final = 17
KVM_SEV_DBG_ENCRYPT: Final = 18
KVM_SEV_CERT_EXPORT: Final = 19
KVM_SEV_GET_ATTESTATION_REPORT: Final = 20
KVM_SEV_SEND_CANCEL: Final = 21
KVM_SEV_INIT2: Final = 22
KVM_SEV_SNP_LAUNCH_START: Final = 100
KVM_SEV_SNP_LAUNCH_UPDATE: Final = 101
KVM_SEV_SNP_LAUNCH_FINISH: Final = 102

# Page types of KVM_SEV_SNP_LAUNCH_UPDATE (same numbers as the firmware's; 2 = VMSA is
# reserved for KVM itself and not accepted from userspace).
KVM_SEV_PAGE_TYPE_INVALID: Final = 0x0
KVM_SEV_SNP_PAGE_TYPE_NORMAL: Final = 0x1
KVM_SEV_SNP_PAGE_TYPE_ZERO: Final = 0x3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED: Final = 0x4
KVM_SEV_SNP_PAGE_TYPE_SECRETS: Final = 0x5
KVM_SEV_SNP_PAGE_TYPE_CPUID: Final = 0x6

KVM_SEV_SNP_ID_BLOCK_SIZE: Final = 96
KVM_SEV_SNP_ID_AUTH_SIZE: Final = 4096
KVM_SEV_SNP_FINISH_DATA_SIZE: Final = 32

# --------------------------------------------------------------------------------------
# ioctl request numbers (for traces; the emulator dispatches by method, not by number)
# --------------------------------------------------------------------------------------

KVMIO: Final = 0xAE

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION: Final = _ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM: Final = _ioc(_IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION: Final = _ioc(_IOC_NONE, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE: Final = _ioc(_IOC_NONE, 0x04, 0)
KVM_CREATE_VCPU: Final = _ioc(_IOC_NONE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION: Final = _ioc(_IOC_WRITE, 0x46, 32)
KVM_SET_USER_MEMORY_REGION2: Final = _ioc(_IOC_WRITE, 0x49, 160)
KVM_RUN: Final = _ioc(_IOC_NONE, 0x80, 0)
KVM_MEMORY_ENCRYPT_OP: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xBA, 8)
KVM_SET_MEMORY_ATTRIBUTES: Final = _ioc(_IOC_WRITE, 0xD2, 32)
KVM_CREATE_GUEST_MEMFD: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xD4, 64)
KVM_PRE_FAULT_MEMORY: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xD5, 64)


# --------------------------------------------------------------------------------------
# Name lookups for logs
# --------------------------------------------------------------------------------------


def _names(prefix: str) -> dict[int, str]:
    table: dict[int, str] = {}
    for key, value in globals().items():
        if key.startswith(prefix) and type(value) is int:
            table.setdefault(value, key)
    return table


_VM_TYPE_NAMES: Final = _names("KVM_X86_")
_EXIT_REASON_NAMES: Final = _names("KVM_EXIT_")


def vm_type_name(vm_type: int) -> str:
    """``KVM_X86_TDX_VM`` for 5, and so on; unknown types give ``"KVM_X86_<n>?"``."""
    return _VM_TYPE_NAMES.get(vm_type, f"KVM_X86_{vm_type}?")


def exit_reason_name(reason: int) -> str:
    """``KVM_EXIT_MEMORY_FAULT`` for 39, etc.; unknown ones give ``"KVM_EXIT_<n>?"``."""
    return _EXIT_REASON_NAMES.get(reason, f"KVM_EXIT_{reason}?")


# --------------------------------------------------------------------------------------
# Struct base: Python type sanity only
# --------------------------------------------------------------------------------------

_Check = Callable[[object, str, object], object]
_S = TypeVar("_S")


def _as_int(owner: object, name: str, value: object) -> object:
    if not isinstance(value, int):
        raise TypeError(f"{type(owner).__name__}.{name} must be an int, not {type(value).__name__}")
    # A bool or IntEnum is the int it stands for, as C would copy it; store that, so logs,
    # schedule files and equality see one spelling.
    return int(value)


def _as_bytes(owner: object, name: str, value: object) -> object:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{type(owner).__name__}.{name} must be bytes, not {type(value).__name__}")


def _as_int_tuple(owner: object, name: str, value: object) -> object:
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise TypeError(f"{type(owner).__name__}.{name} must be a tuple of ints, not {value!r}")


_CHECKS_BY_TYPE: Final[dict[str, _Check]] = {
    "int": _as_int,
    "bytes": _as_bytes,
    "tuple[int, ...]": _as_int_tuple,
}
_CHECK_CACHE: dict[type, tuple[tuple[str, _Check], ...]] = {}


def _struct_field_check(annotation: str) -> _Check | None:
    """The check of a field whose type is another uAPI struct (``Cpuid2``) or a list of them."""
    inner = annotation[5:-1] if annotation.startswith("list[") else annotation
    cls = globals().get(inner)
    if not (isinstance(cls, type) and issubclass(cls, _UapiStruct)):
        return None
    want: type = cls
    if inner is annotation:

        def as_struct(owner: object, name: str, value: object) -> object:
            if not isinstance(value, want):
                raise TypeError(f"{type(owner).__name__}.{name} must be a {want.__name__}, not {type(value).__name__}")
            return value

        return as_struct

    def as_struct_list(owner: object, name: str, value: object) -> object:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, want) for v in value):
            raise TypeError(f"{type(owner).__name__}.{name} must be a list of {want.__name__}, not {value!r}")
        return list(value)

    return as_struct_list


def _field_checks(cls: type) -> tuple[tuple[str, _Check], ...]:
    """The precomputed (field name, check) table of a struct class, built on first use."""
    checks = []
    for f in dataclasses.fields(cls):
        annotation = str(f.type)
        check = _CHECKS_BY_TYPE.get(annotation) or _struct_field_check(annotation)
        if check is not None:
            checks.append((f.name, check))
    table = tuple(checks)
    _CHECK_CACHE[cls] = table
    return table


def check_struct(value: Any, cls: type[_S], call: str) -> _S:
    """`value` if it is a `cls` struct, else the ``TypeError`` an ioctl method raises for it
    (a tuple or another struct handed to ``call``)."""
    if isinstance(value, cls):
        return value
    raise TypeError(f"{call}() needs a uapi.{cls.__name__}, not {type(value).__name__}")


def check_int(value: Any, name: str, call: str) -> int:
    """`value` as a plain int, or the ``TypeError`` naming argument `name` of ``call``."""
    if type(value) is int:
        return value
    if isinstance(value, int):
        return int(value)
    raise TypeError(f"{call}() argument {name!r} must be an int, not {type(value).__name__}")


class _UapiStruct:
    """Base of the uAPI dataclasses: checks and normalises field types after init."""

    __slots__ = ()

    def __post_init__(self) -> None:
        cls = type(self)
        checks = _CHECK_CACHE.get(cls)
        if checks is None:
            checks = _field_checks(cls)
        for name, check in checks:
            value = getattr(self, name)
            if check is _as_int and type(value) is int:
                continue  # the common case, without a call
            checked = check(self, name, value)
            if checked is not value:
                setattr(self, name, checked)


# --------------------------------------------------------------------------------------
# Generic KVM structs (include/uapi/linux/kvm.h)
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class PreFaultMemory(_UapiStruct):
    """struct kvm_pre_fault_memory (include/uapi/linux/kvm.h); gpa/size are in/out."""

    gpa: int
    size: int
    flags: int = 0
    padding: tuple[int, ...] = field(default=(0,) * 5, kw_only=True)


@dataclass(slots=True)
class MemoryAttributes(_UapiStruct):
    """struct kvm_memory_attributes (include/uapi/linux/kvm.h)."""

    address: int
    size: int
    attributes: int
    flags: int = 0


@dataclass(slots=True)
class MemoryAttributes2(_UapiStruct):
    """struct kvm_memory_attributes2 as the in-place conversion series proposes it (not in a
    released kernel): on a guest_memfd, `offset` is the file offset (a union with `address`);
    `error_offset` is out: where a conversion refused with -EAGAIN stopped."""

    offset: int
    size: int
    attributes: int
    flags: int = 0
    error_offset: int = 0


@dataclass(slots=True)
class UserspaceMemoryRegion(_UapiStruct):
    """struct kvm_userspace_memory_region (include/uapi/linux/kvm.h), memslot v1."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int

    def as_region2(self) -> UserspaceMemoryRegion2:
        """The v2 struct KVM builds from a v1 request (guest_memfd fields zeroed)."""
        return UserspaceMemoryRegion2(
            self.slot,
            self.flags,
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
        )


@dataclass(slots=True)
class UserspaceMemoryRegion2(_UapiStruct):
    """struct kvm_userspace_memory_region2 (include/uapi/linux/kvm.h).

    ``guest_memfd`` holds the guest_memfd file object that ``vm.create_guest_memfd``
    returned (an int fd or ``None`` are accepted too; the memslot code decides what is
    valid, as the kernel does with the u32 fd).
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: object | None = None
    pad1: int = field(default=0, kw_only=True)
    pad2: tuple[int, ...] = field(default=(0,) * 14, kw_only=True)


@dataclass(slots=True)
class CreateGuestMemfd(_UapiStruct):
    """struct kvm_create_guest_memfd (include/uapi/linux/kvm.h)."""

    size: int
    flags: int = 0
    reserved: tuple[int, ...] = field(default=(0,) * 6, kw_only=True)


@dataclass(slots=True)
class MemoryFaultExit(_UapiStruct):
    """run->memory_fault in struct kvm_run (include/uapi/linux/kvm.h)."""

    flags: int = 0
    gpa: int = 0
    size: int = 0

    @property
    def is_private(self) -> bool:
        """True if KVM_MEMORY_EXIT_FLAG_PRIVATE is set (a private access faulted)."""
        return bool(self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)


@dataclass(slots=True)
class Run(_UapiStruct):
    """struct kvm_run (include/uapi/linux/kvm.h), the parts the emulator fills in."""

    exit_reason: int = KVM_EXIT_UNKNOWN
    memory_fault: MemoryFaultExit = field(default_factory=MemoryFaultExit)
    immediate_exit: int = field(default=0, kw_only=True)
    flags: int = field(default=0, kw_only=True)

    def prepare_memory_fault_exit(self, gpa: int, size: int, is_private: bool) -> None:
        """Fill in a KVM_EXIT_MEMORY_FAULT, like ``kvm_prepare_memory_fault_exit()``."""
        self.exit_reason = KVM_EXIT_MEMORY_FAULT
        self.memory_fault.flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0
        self.memory_fault.gpa = gpa
        self.memory_fault.size = size


# --------------------------------------------------------------------------------------
# x86 CPUID (arch/x86/include/uapi/asm/kvm.h), embedded in the TDX structs
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class CpuidEntry2(_UapiStruct):
    """struct kvm_cpuid_entry2 (arch/x86/include/uapi/asm/kvm.h)."""

    function: int = 0
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    padding: tuple[int, ...] = field(default=(0,) * 3, kw_only=True)


@dataclass(slots=True)
class Cpuid2(_UapiStruct):
    """struct kvm_cpuid2 (arch/x86/include/uapi/asm/kvm.h); ``nent`` is explicit."""

    nent: int = 0
    entries: list[CpuidEntry2] = field(default_factory=list)
    padding: int = field(default=0, kw_only=True)


# --------------------------------------------------------------------------------------
# Intel TDX structs (arch/x86/include/uapi/asm/kvm.h)
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class TdxCmd(_UapiStruct):
    """struct kvm_tdx_cmd (arch/x86/include/uapi/asm/kvm.h); hw_error is output."""

    id: int
    flags: int = 0
    data: int = 0
    hw_error: int = 0


@dataclass(slots=True)
class TdxCapabilities(_UapiStruct):
    """struct kvm_tdx_capabilities (arch/x86/include/uapi/asm/kvm.h), filled by KVM."""

    supported_attrs: int = 0
    supported_xfam: int = 0
    kernel_tdvmcallinfo_1_r11: int = 0
    user_tdvmcallinfo_1_r11: int = 0
    kernel_tdvmcallinfo_1_r12: int = 0
    user_tdvmcallinfo_1_r12: int = 0
    reserved: tuple[int, ...] = field(default=(0,) * 250, kw_only=True)
    cpuid: Cpuid2 = field(default_factory=Cpuid2)


@dataclass(slots=True)
class TdxInitVm(_UapiStruct):
    """struct kvm_tdx_init_vm (arch/x86/include/uapi/asm/kvm.h).

    The three SHA-384 digests are ``__u64[6]`` in C and 48-byte ``bytes`` here.
    """

    attributes: int = 0
    xfam: int = 0
    mrconfigid: bytes = bytes(48)
    mrowner: bytes = bytes(48)
    mrownerconfig: bytes = bytes(48)
    reserved: tuple[int, ...] = field(default=(0,) * 12, kw_only=True)
    cpuid: Cpuid2 = field(default_factory=Cpuid2)


@dataclass(slots=True)
class TdxInitMemRegion(_UapiStruct):
    """struct kvm_tdx_init_mem_region (arch/x86/include/uapi/asm/kvm.h); in/out."""

    source_addr: int
    gpa: int
    nr_pages: int


# --------------------------------------------------------------------------------------
# AMD SEV / SEV-SNP structs (arch/x86/include/uapi/asm/kvm.h)
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class SevCmd(_UapiStruct):
    """struct kvm_sev_cmd (arch/x86/include/uapi/asm/kvm.h); error = firmware code."""

    id: int
    data: int = 0
    error: int = 0
    sev_fd: int = 0
    pad0: int = field(default=0, kw_only=True)


@dataclass(slots=True)
class SevInit(_UapiStruct):
    """struct kvm_sev_init (arch/x86/include/uapi/asm/kvm.h), for KVM_SEV_INIT2."""

    vmsa_features: int = 0
    flags: int = 0
    ghcb_version: int = 0
    pad1: int = field(default=0, kw_only=True)
    pad2: tuple[int, ...] = field(default=(0,) * 8, kw_only=True)


@dataclass(slots=True)
class SevSnpLaunchStart(_UapiStruct):
    """struct kvm_sev_snp_launch_start (arch/x86/include/uapi/asm/kvm.h)."""

    policy: int
    gosvw: bytes = bytes(16)
    flags: int = 0
    pad0: bytes = field(default=bytes(6), kw_only=True)
    pad1: tuple[int, ...] = field(default=(0,) * 4, kw_only=True)


@dataclass(slots=True)
class SevSnpLaunchUpdate(_UapiStruct):
    """struct kvm_sev_snp_launch_update (arch/x86/include/uapi/asm/kvm.h).

    gfn_start/uaddr/len are written back (advanced) only when the ioctl succeeds.
    """

    gfn_start: int
    uaddr: int
    len: int
    type: int
    pad0: int = field(default=0, kw_only=True)
    flags: int = 0
    pad1: int = field(default=0, kw_only=True)
    pad2: tuple[int, ...] = field(default=(0,) * 4, kw_only=True)


@dataclass(slots=True)
class SevSnpLaunchFinish(_UapiStruct):
    """struct kvm_sev_snp_launch_finish (arch/x86/include/uapi/asm/kvm.h)."""

    id_block_uaddr: int = 0
    id_auth_uaddr: int = 0
    id_block_en: int = 0
    auth_key_en: int = 0
    vcek_disabled: int = 0
    host_data: bytes = bytes(KVM_SEV_SNP_FINISH_DATA_SIZE)
    pad0: bytes = field(default=bytes(3), kw_only=True)
    flags: int = 0
    pad1: tuple[int, ...] = field(default=(0,) * 4, kw_only=True)


#: Kernel struct name -> dataclass, for tools that render or parse uAPI structs.
STRUCTS: Final[dict[str, type[_UapiStruct]]] = {
    "kvm_pre_fault_memory": PreFaultMemory,
    "kvm_memory_attributes": MemoryAttributes,
    "kvm_userspace_memory_region": UserspaceMemoryRegion,
    "kvm_userspace_memory_region2": UserspaceMemoryRegion2,
    "kvm_create_guest_memfd": CreateGuestMemfd,
    "kvm_run": Run,
    "kvm_cpuid_entry2": CpuidEntry2,
    "kvm_cpuid2": Cpuid2,
    "kvm_tdx_cmd": TdxCmd,
    "kvm_tdx_capabilities": TdxCapabilities,
    "kvm_tdx_init_vm": TdxInitVm,
    "kvm_tdx_init_mem_region": TdxInitMemRegion,
    "kvm_sev_cmd": SevCmd,
    "kvm_sev_init": SevInit,
    "kvm_sev_snp_launch_start": SevSnpLaunchStart,
    "kvm_sev_snp_launch_update": SevSnpLaunchUpdate,
    "kvm_sev_snp_launch_finish": SevSnpLaunchFinish,
}
