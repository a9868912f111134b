"""Kernel profiles: the named, version-dependent behaviours the model switches between."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Profile:
    """One kernel version's behaviour, as named switches (each says where it changed)."""

    name: str
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
    #: guest_memfd flags KVM_CREATE_GUEST_MEMFD accepts (mmap-able guest_memfd is not modeled).
    gmem_supported_flags: int = 0
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

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PROFILES: dict[str, Profile] = {
    "6.10": Profile(
        "6.10",
        gmem_fallocate_prepares=True,
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
        prefault_eagain_on_invalid_slot=False,
        prefault_checks_before_each_attempt=False,
        mmu_reload_frees_obsolete_roots=False,
        prefault_rejects_alias=False,
    ),
    "6.18": Profile("6.18"),
    "7.0": Profile(
        "7.0",
        gmem_prepare_tracking=False,
        gmem_populate_eexist=False,
        gmem_populate_per_page_lock=True,
        tdx_flow="T19",
    ),
}

DEFAULT_PROFILE = "6.18"


def get_profile(profile: str | Profile | None) -> Profile:
    """Look a profile up by name; unknown names are a one-line error."""
    if isinstance(profile, Profile):
        return profile
    name = profile or DEFAULT_PROFILE
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown kernel profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
