"""x86 MMU: the TDP MMU, the page fault path and KVM_PRE_FAULT_MEMORY (arch/x86/kvm/mmu/)."""
