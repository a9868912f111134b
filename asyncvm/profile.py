"""Profiles: the named behaviours the model switches between.

A *kernel* profile is a released version (6.10, 6.18, 7.0). A *design* profile is a proposal that
was argued on the mailing lists, merged or not, made runnable so a debate can be settled with
schedules: it starts from the kernel profile it was proposed against and flips the switches where
the proposal differs, and its `description` says what was proposed, by whom (in words) and which
parts the model carries. A named bug (bugs.py) is a mistake against a design; a design profile is
a coherent alternative. `asyncvm profiles` lists both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    """One kernel version's (or one design's) behaviour, as named switches (each says where it changed)."""

    name: str
    #: "kernel" (a released version) or "design" (a proposal argued on the lists)
    kind: str = "kernel"
    #: what the profile is; for a design: the proposal, who argued it (in words), what is modeled
    description: str = ""
    #: [6.8-6.10] fallocate(allocate) zeroes new folios and marks them uptodate; [6.10] it also
    #: runs the arch prepare hook (the behaviour that broke SNP launch). [>=6.11] it does neither.
    gmem_fallocate_prepares: bool = False
    #: [6.11-6.19] folio uptodate == zeroed *and* prepared: get_pfn prepares once, populate of an
    #: uptodate folio is -EEXIST. [>=7.0] uptodate only tracks zeroing; prepare runs every fault.
    gmem_prepare_tracking: bool = True
    #: [6.11-6.19] kvm_gmem_populate() returns -EEXIST on an uptodate folio.
    gmem_populate_eexist: bool = True
    #: [>=7.0] populate takes the invalidate lock per page and GUPs the source before it.
    gmem_populate_per_page_lock: bool = False
    #: guest_memfd flags the kernel knows ([>=6.18] GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
    #: per VM, kvm_gmem_get_supported_flags() drops INIT_SHARED where the arch refuses it (x86: VMs
    #: with private memory), and KVM_CAP_GUEST_MEMFD_FLAGS reports the result.
    gmem_supported_flags: int = 3
    #: [>=6.18] KVM_MEM_GUEST_MEMFD and KVM_CAP_GUEST_MEMFD for every VM type (CONFIG_KVM_GUEST_MEMFD),
    #: not only those with private memory (a default VM can run on guest_memfd alone).
    gmem_all_vm_types: bool = True
    #: errno for binding a guest_memfd page that is already bound ([<=7.1] EINVAL, [7.2] EEXIST).
    gmem_bind_overlap_errno: str = "EINVAL"
    #: [~6.18] KVM_PRE_FAULT_MEMORY returns -EAGAIN on a KVM_MEMSLOT_INVALID slot (else it retries).
    prefault_eagain_on_invalid_slot: bool = True
    #: [~6.18] kvm_tdp_map_page() checks signals and VM-dead before every attempt.
    prefault_checks_before_each_attempt: bool = True
    #: [~6.15] kvm_mmu_reload() handles KVM_REQ_MMU_FREE_OBSOLETE_ROOTS.
    mmu_reload_frees_obsolete_roots: bool = True
    #: [~6.16] pre-fault rejects gfns with the TDX shared bit (aliases) with -EINVAL.
    prefault_rejects_alias: bool = True
    #: TDX flow: "T16" (6.16-6.18: nr_premapped, PAGE.ADD in post-populate) or "T19" (6.19+).
    tdx_flow: str = "T16"

    # -- design switches: every kernel profile leaves them off -----------------------------------
    #: [design map-memory-v2] KVM_PRE_FAULT_MEMORY behaves as the KVM_MAP_MEMORY RFC v2 did
    map_memory_v2: bool = False
    #: [design tdx-init-mem-region-vcpu0*] INIT_MEM_REGION maps through vCPU 0 with a per-VM source
    #: field: "" (off), "caller-mutex" (each thread's vCPU fd, its own mutex) or "vm-ioctl" (as
    #: posted: kvm->lock, then vCPU 0's mutex)
    tdx_init_mem_region_vcpu0: str = ""
    #: [design prefault-before-finalize] pre-fault is allowed on a TD from INIT_VM on
    prefault_before_finalize: bool = False
    #: [design populate-zeroes-at-fallocate] fallocate(allocate) clears new folios and marks them
    #: uptodate (uptodate = cleared), without the arch prepare hook
    gmem_fallocate_zeroes: bool = False
    #: [design gmem-*] what a guest_memfd is before it is bound: "" (mainline: private from creation),
    #: "shared" (starts shared, keeps data written before binding) or "unbound" (only bind or close)
    gmem_initial_state: str = ""
    #: [design gmem-inplace-conversion] per-page shareability lives in guest_memfd and changes
    #: through KVM_SET_MEMORY_ATTRIBUTES2 on the file; INIT_SHARED is allowed on every VM type.
    gmem_in_place_conversion: bool = False
    #: [design gmem-inplace-conversion, settled in the series] the host fault checks shareability
    #: and takes the folio under filemap_invalidate_lock_shared() (mmap_lock -> invalidate_lock),
    #: so a conversion, which holds it for write, cannot pass between the check and the mapping.
    gmem_fault_takes_invalidate_lock: bool = True
    #: [design, under discussion] shared->private first unmaps every host mapping of the range
    #: (unmap_mapping_pages), so only pins block it; off: a page the host still maps refuses the
    #: conversion too (userspace must munmap first), as earlier revisions asked of the VMM.
    gmem_conversion_unmaps_host: bool = True
    #: [design, under discussion] shared->private is refused with -EAGAIN (error_offset set) while a
    #: folio holds references beyond the page cache's (host mapping, GUP pin, a fault in flight);
    #: off: nothing stops the conversion (the "just convert, the host will SIGBUS" position).
    gmem_conversion_checks_refcount: bool = True

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def summary(self) -> str:
        """The description's first sentence, on one line."""
        text = " ".join(self.description.split())
        end = text.find(". ")
        return text if end < 0 else text[: end + 1]


PROFILES: dict[str, Profile] = {
    "6.10": Profile(
        "6.10",
        gmem_supported_flags=0,
        gmem_all_vm_types=False,
        description="Linux 6.10: fallocate() prepares guest_memfd folios; no -EEXIST from populate.",
        gmem_fallocate_prepares=True,
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
        prefault_eagain_on_invalid_slot=False,
        prefault_checks_before_each_attempt=False,
        mmu_reload_frees_obsolete_roots=False,
        prefault_rejects_alias=False,
    ),
    "6.18": Profile(
        "6.18",
        description="Linux 6.18: TDX populate through kvm_tdp_map_page() (nr_premapped); uptodate = prepared.",
    ),
    "7.0": Profile(
        "7.0",
        description="Linux 7.0: TDX state ioctls take all the locks, PAGE.ADD in the S-EPT hook; per-page populate.",
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
        gmem_populate_per_page_lock=True,
        tdx_flow="T19",
    ),
}

DEFAULT_PROFILE = "6.18"


def design(name: str, base: str, description: str, **switches: Any) -> Profile:
    """A design profile: kernel profile `base` with the switches where the proposal differs."""
    return replace(PROFILES[base], name=name, kind="design", description=description, **switches)


def register(profile: Profile) -> Profile:
    """Add a profile to PROFILES (design profiles register themselves this way, one each)."""
    PROFILES[profile.name] = profile
    return profile


register(
    design(
        "gmem-inplace-conversion",
        "7.0",
        """In-place shared/private conversion through guest_memfd (the guest_memfd conversion series
of 2025-26, built on 6.18's mmap-able guest_memfd): shareability is tracked per page in the
guest_memfd inode and changed with KVM_SET_MEMORY_ATTRIBUTES2 on the file; host faults on private
pages get SIGBUS; shared->private unmaps the host and is refused (-EAGAIN, error_offset) while a
page is still mapped or pinned. Based on 7.0 because the series relies on populate pinning its
source before the invalidate lock (else mmap_lock and the invalidate lock are taken in both
orders). Modeled: per-page shareability, the fault and conversion locking, the refcount check,
invalidation of both mapping kinds, guest faults following the file (the VM's attribute map of
bound gfns is kept in step with it). Not modeled: KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES and the
VM ioctl being withdrawn (vm_memory_attributes=false), huge folios and their splitting. Model gap:
SNP and TDX post-populate still read their source through the VMM's mm under the invalidate lock
(7.0 hands them the page pinned before it), so a launch plus a host fault under this profile shows
the mmap_lock / invalidate_lock cycle the series avoids.""",
        gmem_in_place_conversion=True,
    )
)


register(
    design(
        "map-memory-v2",
        "6.18",
        """The KVM_MAP_MEMORY RFC v2 (April 2024), before it became KVM_PRE_FAULT_MEMORY in 6.11.
Proposed by the TDX KVM authors and reworked by the KVM maintainers (kvm-core.md section 8): the
arch hook maps one range per call with no retry loop of its own, so RET_PF_RETRY (an invalidation
in flight, a frozen SPTE) goes back to userspace as -EAGAIN and RET_PF_EMULATE (no memslot, MMIO)
as -EINVAL; the generic loop stops at the first error and returns it even after progress (the
struct says how far it got). The merged ioctl retries internally (only a signal ends it) and
reports any progress as success. Modeled: the -EAGAIN/-EINVAL mapping, the error-after-progress
return, and the struct moved to the end of the mapping made (a huge page larger than the request
wraps the __u64 size and the call maps on past it; a reviewer asked for a min()). Not modeled: the
struct's own field names, the padding, the v2 patch that mapped L1 GPAs in guest mode (dropped).""",
        map_memory_v2=True,
    )
)

register(
    design(
        "tdx-init-mem-region-vcpu0",
        "6.18",
        """The TDX KVM series' INIT_MEM_REGION (v18/v19, 2024), reached from each thread's vCPU fd.
The TDX KVM authors faulted each page in through vCPU 0's MMU after leaving the source page in a
per-VM scratch field (kvm_tdx->source_pa) that the S-EPT hook PAGE.ADDed and MR.EXTENDed from;
a comment said vCPU 0's mutex made the field safe, and the maintainers asked why races were
possible at all and wanted the lock asserted. Here the call holds only the caller's vcpu->mutex,
as a vCPU-scoped ioctl does, so threads populating from several vCPUs share the field: a page can
be added with another thread's contents (the copy and MRTD are wrong), or the hook finds the
field already consumed (KVM_BUG_ON). The lock the design needed is modeled by
tdx-init-mem-region-vcpu0-locked. The merged design (6.16+) passes the source per call through
kvm_gmem_populate() instead.""",
        tdx_init_mem_region_vcpu0="caller-mutex",
    )
)

register(
    design(
        "tdx-init-mem-region-vcpu0-locked",
        "6.18",
        """The same scratch-field INIT_MEM_REGION with the lock it needed: a VM ioctl under kvm->lock
that also takes vCPU 0's mutex, as the v18/v19 series posted it, so each page's set-map-consume
of kvm_tdx->source_pa is one critical section. Concurrent calls from several threads serialize
(no parallel population) and the image comes out right. Modeled: kvm->lock and vCPU 0's mutex
around the whole call, the same scratch field and S-EPT hook as tdx-init-mem-region-vcpu0.""",
        tdx_init_mem_region_vcpu0="vm-ioctl",
    )
)

register(
    design(
        "prefault-before-finalize",
        "6.18",
        """KVM_PRE_FAULT_MEMORY allowed on a TD before KVM_TDX_FINALIZE_VM, as the pre-fault and TDX
MMU threads of 2024-25 discussed before pre_fault_allowed was tied to finalization (6.16). A
pre-fault of a private GPA installs the mirror SPTE; the S-EPT hook only counts it in
nr_premapped (no source page, so no PAGE.ADD): the mirror has a present leaf, the S-EPT has none,
and the fault prepared the guest_memfd folio. A later INIT_MEM_REGION of that GPA then finds the
folio uptodate and fails -EEXIST (6.11-6.19 populate; were it let through, the mirror leaf is
already present and tdp_mmu_map_handle_target_level() would only say RET_PF_SPURIOUS), so the page
never reaches the image; FINALIZE refuses with -EINVAL (nr_premapped != 0). Modeled on the 6.18
flow without the KVM_BUG_ON 6.18 has for exactly this; the TDX premap oracle reports the leaf.""",
        prefault_before_finalize=True,
    )
)


register(
    design(
        "populate-no-uptodate-check",
        "6.18",
        """guest_memfd without preparation tracking: populate never refuses an uptodate folio.
The position of the "Remove preparation tracking" series (an SNP maintainer, late 2025, argued
with the TDX MMU reviewers): the uptodate flag only says a folio was cleared, the arch prepare hook
runs on every fault and each architecture tracks its own state (SNP through the RMP), so
kvm_gmem_populate() drops its -EEXIST and a second population of a page reaches the arch, which
must refuse it. Modeled on 6.18 (the TDX flow with PAGE.ADD after the map): no uptodate check in
populate, prepare on every fault. fallocate then LAUNCH_UPDATE or INIT_MEM_REGION works; two
overlapping INIT_MEM_REGIONs reach the TDX module twice for the shared page (the double-add the
check was added for). 7.0 merged this position with the T19 TDX flow, which refuses the second
mapping itself.""",
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
    )
)

register(
    design(
        "populate-zeroes-at-fallocate",
        "6.18",
        """guest_memfd clears folios when fallocate() allocates them and marks them uptodate, once.
The alternative the same thread discussed (clear the whole folio at initial allocation and never
touch it again; uptodate means cleared, preparation is the arch's business): unlike 6.8-6.10,
fallocate() does not call the arch prepare hook, so a pre-allocated folio can still be populated.
Modeled on populate-no-uptodate-check plus fallocate(allocate) zeroing new folios and marking them
uptodate; faults and populate do not clear uptodate folios again. fallocate then LAUNCH_UPDATE or
INIT_MEM_REGION works (only 6.10's preparing fallocate breaks it), and so does fallocate,
PUNCH_HOLE, populate (the punched folio is gone; populate allocates a new one).""",
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
        gmem_fallocate_zeroes=True,
    )
)


register(
    design(
        "gmem-bind-preserves-data",
        "6.18",
        """The fd-based private memory proposal (2021-22): a memfile starts as ordinary shared memory.
Its authors (the TDX memory-management developers) let the VMM create the file, mmap and fill it,
then bind it to a private memslot, at which point it becomes inaccessible to the host and keeps
what was written; the thread asked what TDX and SNP then make of data written before binding.
Modeled on 6.18's mmap-able guest_memfd (GUEST_MEMFD_FLAG_MMAP): until the first binding every
page is host-faultable as if INIT_SHARED, binding zaps the host's PTEs and keeps the folios
(uptodate, with their data); afterwards 6.18 rules. A SW-protected guest then reads the data
written before binding through its private mapping; on SNP the folio counts as prepared without
ever being RMP-assigned or measured; on TDX the data never reaches the TD (PAGE.ADD copies from a
source page, PAGE.AUG pages are zeroed by the module).""",
        gmem_initial_state="shared",
    )
)

register(
    design(
        "gmem-unbound-state",
        "6.18",
        """The reply to the fd-based proposal: a private memfile starts UNBOUND, where only binding
(or closing) is allowed, so nothing can be written into it before it is private and the TDX/SNP
question of pre-binding data does not arise. Modeled on 6.18: mmap and fallocate of a guest_memfd
no memslot has bound yet fail (-EBADF; the reply named no errno), and work as in 6.18 after the
first binding.""",
        gmem_initial_state="unbound",
    )
)


def get_profile(profile: str | Profile | None) -> Profile:
    """Look a profile up by name; unknown names are a one-line error."""
    if isinstance(profile, Profile):
        return profile
    name = profile or DEFAULT_PROFILE
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown kernel profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
