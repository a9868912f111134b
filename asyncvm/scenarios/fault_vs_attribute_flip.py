"""A running vCPU faulting pages while userspace flips them between private and shared."""

from __future__ import annotations

from typing import Any

import asyncvm
from asyncvm import uapi

from .common import guest_reads_during_conversion, pages_param, private_vm


@asyncvm.scenario(name="fault_vs_attribute_flip", params={"pages": pages_param(4, low=2)})
async def fault_vs_attribute_flip(kvm: Any, pages: int = 4) -> None:
    """KVM_RUN reads every page (as the attributes say) while userspace converts half of them.

    Hunts: a mapping of the old kind surviving a KVM_SET_MEMORY_ATTRIBUTES (private data seen
    through a shared mapping, or the reverse). The VMM answers KVM_EXIT_MEMORY_FAULT by
    converting the page, as private_mem_conversions_test does. Watched by attribute_mismatch at
    invalidate end and quiescence, stale_install and the balance oracle.
    """
    vm, _gmem, _hva = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, pages)
    vcpu = await vm.create_vcpu(0)
    await guest_reads_during_conversion(vm, vcpu, pages)
