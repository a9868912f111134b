"""Named, injectable bugs: each turns a real code path of the model into the buggy one.

A bug never fakes a failure. Enabling one changes what the model does at the named place (a check
skipped, a lock not taken, a flag set too early), and the oracles have to notice the consequences
on their own. Each entry names the kernel function whose protection it removes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    changes: str
    kernel: str
    scenario: str
    #: found only by the data-race detector (check/races.py): campaigns with it turn the detector on
    detect_races: bool = False
    #: the profile the bug is a mistake against (a design's own bugs need that design)
    profile: str = "6.18"


BUGS: dict[str, Bug] = {
    b.name: b
    for b in [
        Bug(
            "drop_invalidate_retry",
            "the fault path skips mmu_invalidate_retry_gfn() in is_page_fault_stale() and the two "
            "lockless pre-checks, so a pfn resolved before an invalidation is installed after it",
            "arch/x86/kvm/mmu/mmu.c: is_page_fault_stale(), kvm_mmu_faultin_pfn()",
            "prefault_vs_punch_hole",
        ),
        Bug(
            "populate_without_invalidate_lock",
            "kvm_gmem_populate() runs without filemap_invalidate_lock, so PUNCH_HOLE can truncate the "
            "folio being added",
            "virt/kvm/guest_memfd.c: kvm_gmem_populate()",
            "tdx_init_mem_region_vs_punch_hole",
        ),
        Bug(
            "populate_skips_uptodate_check",
            "kvm_gmem_populate() does not return -EEXIST for an uptodate folio (double add / double measure)",
            "virt/kvm/guest_memfd.c: kvm_gmem_populate() [6.11-6.19]",
            "tdx_init_mem_region_overlap",
        ),
        Bug(
            "mark_uptodate_before_prepare",
            "kvm_gmem_get_pfn() marks the folio uptodate before the arch prepare hook succeeded",
            "virt/kvm/guest_memfd.c: kvm_gmem_prepare_folio() [6.11-6.19]",
            "snp_post_launch_faults",
        ),
        Bug(
            "prefault_allowed_before_finalize",
            "KVM_PRE_FAULT_MEMORY is allowed on a TD before KVM_TDX_FINALIZE_VM (pre_fault_allowed "
            "set at INIT_VM), so pages land in the S-EPT without PAGE.ADD",
            "arch/x86/kvm/vmx/tdx.c: tdx_td_finalize(); arch/x86/kvm/mmu/mmu.c: kvm_arch_vcpu_pre_fault_memory()",
            "tdx_prefault_before_finalize",
        ),
        Bug(
            "invalidate_range_add_no_widen",
            "kvm_mmu_invalidate_range_add() replaces the accumulated range instead of widening it, so an "
            "overlapping invalidation's range is forgotten while it is still in flight",
            "virt/kvm/kvm_main.c: kvm_mmu_invalidate_range_add()",
            "prefault_vs_munmap",
        ),
        Bug(
            "plain_spte_store",
            "tdp_mmu_set_spte_atomic() stores the new SPTE with a plain write instead of try_cmpxchg64(), "
            "so a concurrent fault's update of the same SPTE is silently overwritten (only the race "
            "detector sees it: the campaign turns it on)",
            "arch/x86/kvm/mmu/tdp_mmu.c: tdp_mmu_set_spte_atomic() / __tdp_mmu_set_spte_atomic()",
            "prefault_vs_punch_hole",
            detect_races=True,
        ),
        Bug(
            "fault_ignores_invalid_root",
            "is_page_fault_stale() does not treat an invalid root as obsolete, so a fault that raced "
            "kvm_mmu_zap_all_fast() installs into a root whose zap has already run",
            "arch/x86/kvm/mmu/mmu.c: is_page_fault_stale() -> is_obsolete_root()",
            "fault_vs_zap_all",
        ),
        Bug(
            "gmem_fault_ignores_init_shared",
            "the guest_memfd user-mapping fault hands out pages of a file created without "
            "GUEST_MEMFD_FLAG_INIT_SHARED (private memory) instead of answering SIGBUS",
            "virt/kvm/guest_memfd.c: kvm_gmem_fault_user_mapping() (6.18)",
            "gmem_mmap_coco_refuses",
        ),
        Bug(
            "punch_hole_skips_unmap_mapping",
            "PUNCH_HOLE truncates guest_memfd folios without unmapping them from the host first, so "
            "the VMM keeps accessing a folio the file has dropped while the guest gets a new one",
            "mm/truncate.c: truncate_inode_folio() -> unmap_mapping_folio(), via kvm_gmem_punch_hole()",
            "gmem_host_write_vs_prefault_vs_punch_hole",
        ),
        Bug(
            "gmem_fault_unlocks_early",
            "the guest_memfd user-mapping fault unlocks the folio before the host PTE is set "
            "(VM_FAULT_LOCKED not returned), so a PUNCH_HOLE in between leaves the host mapping a "
            "truncated folio",
            "virt/kvm/guest_memfd.c: kvm_gmem_fault_user_mapping(); mm/memory.c: finish_fault()",
            "gmem_host_write_vs_prefault_vs_punch_hole",
        ),
        Bug(
            "gmem_fault_skips_invalidate_lock",
            "[design gmem-inplace-conversion] the host fault reads the page's shareability without "
            "filemap_invalidate_lock_shared(), so a conversion to private can pass between the "
            "check and the mapping",
            "virt/kvm/guest_memfd.c: kvm_gmem_fault_user_mapping() (in-place conversion series)",
            "gmem_conversion_vs_host_fault",
            profile="gmem-inplace-conversion",
        ),
        Bug(
            "gmem_convert_skips_unmap",
            "[design gmem-inplace-conversion] shared->private conversion does not unmap the host "
            "mappings of the range (and does not check refcounts), leaving the VMM mapping a private page",
            "virt/kvm/guest_memfd.c: __kvm_gmem_set_attributes() (in-place conversion series)",
            "gmem_conversion_vs_host_fault",
            profile="gmem-inplace-conversion",
        ),
        Bug(
            "gmem_convert_skips_invalidate_end",
            "[design gmem-inplace-conversion] shared->private conversion begins the MMU invalidation "
            "but never ends it (an exit path that forgets kvm_gmem_invalidate_end()), so every later "
            "fault of the VM retries forever",
            "virt/kvm/guest_memfd.c: __kvm_gmem_set_attributes() (in-place conversion series)",
            "gmem_conversion_vs_host_fault",
            profile="gmem-inplace-conversion",
        ),
    ]
}


def unknown_bug(name: str) -> str:
    """The one-line error for an unknown bug name: the closest known names, then all of them."""
    near = difflib.get_close_matches(name, list(BUGS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown bug {name!r}{hint} (known bugs: {', '.join(sorted(BUGS))}; see asyncvm bugs)"


def check_bug_names(names: Iterable[str]) -> None:
    """Unknown bug names are a one-line error suggesting the closest known ones."""
    unknown = sorted(set(names) - set(BUGS))
    if unknown:
        raise ValueError(unknown_bug(unknown[0]))


def needs_race_detector(names: Iterable[str]) -> bool:
    """Whether one of these bugs is visible only to the data-race detector."""
    return any(BUGS[n].detect_races for n in names if n in BUGS)
