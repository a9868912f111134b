"""What `asyncvm fuzz` may call: each call's arguments, preconditions and legal errnos.

In the spirit of syzkaller's syscall descriptions, but for a controlled scheduler: a description
says when a call makes sense (which VM types, before or after the launch, whether the actor owns a
vCPU), how its arguments are drawn (ranges over a small guest, so that actors collide) and which
errnos the kernel may return for it in a legal program. A program file calls the helpers of
`HELPERS` (public API only), so the same text runs under `asyncvm fuzz` and as a written file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .generate import Gen

#: VM types by the name the command line uses, in the order a draw shrinks toward (0 first)
VM_TYPES: dict[str, str] = {
    "sw": "KVM_X86_SW_PROTECTED_VM",
    "default": "KVM_X86_DEFAULT_VM",
    "tdx": "KVM_X86_TDX_VM",
    "snp": "KVM_X86_SNP_VM",
    # a default VM whose slot 0 is an MMAP|INIT_SHARED guest_memfd the VMM maps (6.18): last, so
    # the draws of the others keep their meaning
    "gmem": "KVM_X86_DEFAULT_VM",
}


@dataclass(frozen=True)
class Ctx:
    """What a precondition looks at: the VM, how far set-up took it, what the actor holds."""

    vm_type: str
    launched: bool
    vcpu: str | None
    slot1: bool
    g1: bool
    #: the profile converts in place through guest_memfd (design gmem-inplace-conversion)
    convertible: bool = False

    @property
    def private(self) -> bool:
        return self.vm_type not in ("default", "gmem")

    @property
    def has_gmem(self) -> bool:
        """Slot 0 is in guest_memfd g0 (private memory, or the host-mappable file of "gmem")."""
        return self.vm_type != "default"

    @property
    def coco(self) -> bool:
        return self.vm_type in ("tdx", "snp")


@dataclass(frozen=True)
class Call:
    """One callable of an actor: `args` draws its arguments and returns them as source text."""

    name: str
    when: Callable[[Ctx], bool]
    args: Callable[[Gen, Ctx], str]


def _range(g: Gen, ctx: Ctx, span: int | None = None) -> str:
    first, count = g.range(span or g.pages)
    return f"{first}, {count}"


def _guest_range(g: Gen, ctx: Ctx) -> str:
    # slot 1 (when there is one) lies right above slot 0: a range may cross into it
    return _range(g, ctx, g.pages + (g.slot1_pages if ctx.slot1 else 0))


def _gmem_range(g: Gen, ctx: Ctx) -> str:
    if ctx.g1 and g.pick("fuzz.file", 2):
        return f"g1, {_range(g, ctx, g.g1_pages)}"
    return f"g0, {_range(g, ctx)}"


def _prefault(g: Gen, ctx: Ctx) -> str:
    return f"{ctx.vcpu}, {_guest_range(g, ctx)}"


def _attributes(g: Gen, ctx: Ctx) -> str:
    rng = _range(g, ctx)
    return f"vm, {rng}, private={bool(g.pick('fuzz.private', 2))}"


def _run(g: Gen, ctx: Ctx) -> str:
    accesses = []
    for _ in range(1 + g.pick("fuzz.accesses", 3)):
        page = g.pick("fuzz.page", g.pages + (g.slot1_pages if ctx.slot1 else 0))
        write = g.pick("fuzz.write", 2)
        # a VM without private memory has only one kind of access
        how = ("None", "True", "False")[g.pick("fuzz.how", 3)] if ctx.private else "None"
        accesses.append(f"({page}, {bool(write)}, {how})")
    convert = ctx.private and not g.pick("fuzz.no_convert", 2)
    return f"vm, {ctx.vcpu}, [{', '.join(accesses)}], convert={convert}"


def _set_slot(g: Gen, ctx: Ctx) -> str:
    """Re-create slot 0 (deleted by someone), create/move/flag slot 1, or bind g1 as slot 2."""
    choices = ["vm, 0, 0, PAGES, h0" + (", g0" if ctx.has_gmem else "")]
    if ctx.slot1:
        base = g.pages
        moved = (base, base + 2, base + g.slot1_pages, 0)[g.pick("fuzz.move", 4)]
        dirty = bool(g.pick("fuzz.dirty_log", 2))
        choices.append(f"vm, 1, {moved}, SLOT1, h1" + (", dirty_log=True" if dirty else ""))
    if ctx.g1:
        choices.append("vm, 2, PAGES + SLOT1 + 1, G1, h2, g1")
    return choices[g.pick("fuzz.slot", len(choices))]


def _delete_slot(g: Gen, ctx: Ctx) -> str:
    slots = [0] + ([1] if ctx.slot1 else []) + ([2] if ctx.g1 else [])
    return f"vm, {slots[g.pick('fuzz.slot', len(slots))]}"


def _mm_range(g: Gen, ctx: Ctx) -> str:
    if ctx.slot1 and g.pick("fuzz.mapping", 2):
        return f"kvm, h1, {_range(g, ctx, g.slot1_pages)}"
    return f"kvm, h0, {_range(g, ctx)}"


def _convert(g: Gen, ctx: Ctx) -> str:
    return f"{_gmem_range(g, ctx)}, private={bool(g.pick('fuzz.private', 2))}"


def _init_mem_region(g: Gen, ctx: Ctx) -> str:
    return f"{ctx.vcpu}, src, {_range(g, ctx)}, measure={bool(1 - g.pick('fuzz.unmeasured', 2))}"


CALLS: list[Call] = [
    Call("pre_fault", lambda c: c.vcpu is not None, _prefault),
    Call("punch_hole", lambda c: c.has_gmem, _gmem_range),
    Call("allocate", lambda c: c.has_gmem, _gmem_range),
    Call("set_attributes", lambda c: c.private, _attributes),
    Call("set_slot", lambda c: True, _set_slot),
    Call("delete_slot", lambda c: True, _delete_slot),
    Call("munmap", lambda c: True, _mm_range),
    Call("madvise_dontneed", lambda c: True, _mm_range),
    Call("run", lambda c: c.vcpu is not None and (c.launched or not c.coco), _run),
    Call("init_vcpu", lambda c: c.vm_type == "tdx" and c.vcpu is not None, lambda g, c: f"{c.vcpu}"),
    Call("init_mem_region", lambda c: c.vm_type == "tdx" and c.vcpu is not None, _init_mem_region),
    Call("finalize", lambda c: c.vm_type == "tdx", lambda g, c: "vm"),
    Call("launch_update", lambda c: c.vm_type == "snp", lambda g, c: f"vm, src, {_range(g, c)}"),
    Call("launch_finish", lambda c: c.vm_type == "snp", lambda g, c: "vm"),
    Call("close", lambda c: c.has_gmem, lambda g, c: "g1" if c.g1 and g.pick("fuzz.file", 2) else "g0"),
    # the VMM's loads and stores through its guest_memfd mapping (only "gmem": the other kinds'
    # call lists, and so their recorded draws, stay as they were)
    Call("host_write", lambda c: c.vm_type == "gmem", _mm_range),
    Call("host_read", lambda c: c.vm_type == "gmem", _mm_range),
    # in-place conversion through the guest_memfd (only where the profile has it: the other
    # programs' draws stay as they were)
    Call("convert", lambda c: c.vm_type == "gmem" and c.convertible, _convert),
]

# Where prelude.ALLOWED's errnos come from (kernel functions):
# kvm_arch_vcpu_pre_fault_memory(), kvm_tdp_map_page(): no slot / emulated (ENOENT), no
# memory behind it or a private/shared mismatch (EFAULT), INVALID slot (EAGAIN), a TD before
# FINALIZE or an SNP guest before LAUNCH_FINISH (EOPNOTSUPP)
# kvm_gmem_fallocate(): a closed fd (EBADF), a signal while allocating (EINTR)
# kvm_vm_ioctl_set_mem_attributes(): EINTR/EAGAIN from the xarray and a signal
# kvm_set_memory_region(): overlap (EEXIST), a change KVM refuses or a missing slot (EINVAL),
# a closed guest_memfd (EBADF), a guest_memfd range already bound (EINVAL/EEXIST)
# madvise(): nothing mapped there (ENOMEM)
# host_write/host_read: nothing mapped there, or SIGBUS from a guest_memfd mapping (EFAULT: SigBus
# is a KvmError(EFAULT))
# KVM_RUN: a memory fault exit the VMM does not convert (EFAULT), a poisoned page, no memslot
# tdx_vcpu_init(): twice or after FINALIZE (EINVAL)
# tdx_vcpu_init_mem_region(), kvm_gmem_populate(): not private / not bound / not building
# (EINVAL), an uptodate folio (EEXIST), no source page (EFAULT), a hole (ENOENT), a mapping
# that is not there (EIO from the S-EPT), a contended TDX module lock (EBUSY)
# tdx_td_finalize(): twice, or pages premapped without PAGE.ADD (EINVAL)
# kvm_gmem_set_attributes() [design gmem-inplace-conversion]: a page the host maps or pins
# (EAGAIN), a closed fd (EBADF), a range beyond the file (EINVAL)
# snp_launch_update(): EINTR on the first page becomes EIO; firmware refusals (EIO), an
# uptodate folio (EEXIST), a range that is not private guest_memfd (EINVAL), no source (EFAULT)


def applicable(ctx: Ctx) -> list[Call]:
    return [c for c in CALLS if c.when(ctx)]
