"""Generic KVM's tracepoints (include/trace/events/kvm.h and the points the model adds beside it).

Each is fired by the function named in its comment, with that function's own objects. The
invalidation protocol fires begin/range_add/end exactly where ``mmu_invalidate_*`` change; the
callers that start an invalidation (the MMU notifier, guest_memfd, memory attributes) announce
themselves first, so a listener knows which window is which without the protocol carrying it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime import traps
from ..runtime.tracepoint import Tracepoint

if TYPE_CHECKING:
    from .vm import Vm

#: kvm_create_vm(vm): the VM exists, its arch state included
trace_kvm_create_vm = Tracepoint("kvm_create_vm")
#: kvm_mmu_notifier_invalidate_range_start(vm, start, end): hva range, before the begin
trace_kvm_unmap_hva_range = Tracepoint("kvm_unmap_hva_range")
#: kvm_gmem_invalidate_begin(vm, start, end): guest_memfd page offsets, before the begin
trace_kvm_gmem_invalidate = Tracepoint("kvm_gmem_invalidate")
#: kvm_vm_set_mem_attributes(vm, start, end, attributes): gfns, before the begin
trace_kvm_vm_set_mem_attributes = Tracepoint("kvm_vm_set_mem_attributes")
#: kvm_mmu_invalidate_begin(vm)
trace_kvm_mmu_invalidate_begin = Tracepoint("kvm_mmu_invalidate_begin")
#: kvm_mmu_invalidate_range_add(vm, start, end)
trace_kvm_mmu_invalidate_range_add = Tracepoint("kvm_mmu_invalidate_range_add")
#: kvm_mmu_invalidate_end(vm)
trace_kvm_mmu_invalidate_end = Tracepoint("kvm_mmu_invalidate_end")
#: kvm_gmem_populate(vm, gfn): a PRIVATE gfn is about to be handed to post_populate
trace_kvm_gmem_populate = Tracepoint("kvm_gmem_populate")
#: kvm_gmem_populate(vm, gfn, pfn, r): post_populate returned r (0: the page is in the image)
trace_kvm_gmem_populated = Tracepoint("kvm_gmem_populated")
#: truncate_inode_pages_range() of a guest_memfd the host may map (inode, index, folio): the
#: folio has left the page cache (and, unless a bug skipped it, every host PTE of it is gone)
trace_kvm_gmem_truncate_folio = Tracepoint("kvm_gmem_truncate_folio")
#: [design gmem-inplace-conversion] __kvm_gmem_set_attributes(inode, start, end, attributes):
#: page offsets [start, end) just changed shareability, inside the invalidation
trace_kvm_gmem_set_attributes = Tracepoint("kvm_gmem_set_attributes")
#: kvm_vm_bugged(vm, reason): KVM_BUG_ON() fired
trace_kvm_vm_bugged = Tracepoint("kvm_vm_bugged")
#: kvm_commit_memory_region(vm, slot): the old memslot of a DELETE (kvm_free_memslot()) or a MOVE
#: (kfree()) is freed; kvm_set_memslot() had kvm_arch_flush_shadow_memslot() zap its range
trace_kvm_memslot_freed = Tracepoint("kvm_memslot_freed")
#: WARN_ON_ONCE() fired in a function of `vm`'s (vm, message)
trace_kvm_warn = Tracepoint("kvm_warn")


def WARN(vm: Vm, message: str) -> None:
    """include/asm-generic/bug.h: WARN(): a kernel bug report; the VM goes on."""
    traps.emit("warn", vm, message=message)
    trace_kvm_warn(vm, message)
