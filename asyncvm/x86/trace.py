"""x86 KVM's tracepoints (arch/x86/kvm/trace.h, mmu/mmutrace.h, and the vendor points beside them).

Fired by the function named in each comment, with that function's own objects; the oracles in
``check`` attach to them. Nothing here knows who listens.
"""

from __future__ import annotations

from ..runtime.tracepoint import Tracepoint

#: kvm_mmu_faultin_pfn(vcpu, fault): mmu_invalidate_seq was just snapshot into fault.mmu_seq
trace_kvm_mmu_fault_snapshot = Tracepoint("kvm_mmu_fault_snapshot")
#: tdp_mmu_map_handle_target_level(vcpu, fault, root, level, gfn, leaf): a fault installed a leaf
trace_kvm_mmu_set_spte = Tracepoint("kvm_mmu_set_spte")
#: handle_changed_spte(vm, root, level, gfn, old, new): any SPTE change, zaps included
trace_kvm_tdp_mmu_spte_changed = Tracepoint("kvm_tdp_mmu_spte_changed")
#: the model's guest (vcpu, gfn, pfn, private): an access reached a pfn through the TDP tables
trace_kvm_guest_access = Tracepoint("kvm_guest_access")
#: tdx_vcpu_init_mem_region(vm, gfn): the page counts as added (the region advances past it)
trace_tdx_init_mem_region_page = Tracepoint("tdx_init_mem_region_page")
#: tdx_sept_set_private_spte(vm, gfn, level, pfn): a private leaf for a TD that is not RUNNABLE yet
trace_tdx_sept_set_private_spte = Tracepoint("tdx_sept_set_private_spte")
#: sev_gmem_prepare(vm, pfn, gfn): a faulted private page is about to be RMP-assigned
trace_sev_gmem_prepare = Tracepoint("sev_gmem_prepare")
#: snp_launch_finish(vm): SNP_LAUNCH_FINISH succeeded; the launch digest is final
trace_snp_launch_finish = Tracepoint("snp_launch_finish")
