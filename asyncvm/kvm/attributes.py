"""KVM_SET_MEMORY_ATTRIBUTES: per-VM, per-gfn attributes (PRIVATE), changed inside an invalidation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import uapi
from ..runtime import hb, traps
from ..runtime.sync import alloc_fails
from ..uapi import PAGE_SHIFT, KvmError
from .invalidate import GfnRange, kvm_mmu_invalidate_begin, kvm_mmu_invalidate_end, kvm_mmu_invalidate_range_add
from .trace import trace_kvm_vm_set_mem_attributes

if TYPE_CHECKING:
    from .vm import Vm


def kvm_supported_mem_attributes(vm: Vm) -> int:
    """virt/kvm/kvm_main.c: kvm_supported_mem_attributes(): PRIVATE iff the VM has private memory."""
    return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if vm.ops.has_private_mem(vm) else 0


def kvm_get_memory_attributes(vm: Vm, gfn: int) -> int:
    return vm.attributes.get(gfn, 0) or 0


def kvm_mem_is_private(vm: Vm, gfn: int) -> bool:
    """include/linux/kvm_host.h: kvm_mem_is_private() (6.8+)."""
    return bool((vm.attributes.get(gfn) or 0) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)


def kvm_range_has_memory_attributes(vm: Vm, start: int, end: int, mask: int, attrs: int) -> bool:
    """virt/kvm/kvm_main.c: kvm_range_has_memory_attributes(): every gfn has (attr & mask) == attrs."""
    if attrs & ~mask:
        return False
    covered = 0
    for s, e, value in vm.attributes.overlaps(start, end):
        if (value & mask) != attrs:
            return False
        covered += e - s
    # gfns without an entry have attributes 0
    return covered == end - start or attrs == 0


async def kvm_vm_ioctl_set_mem_attributes(vm: Vm, attrs: uapi.MemoryAttributes) -> None:
    """virt/kvm/kvm_main.c: kvm_vm_ioctl_set_mem_attributes() (6.8+): validation, then the update.

    The struct is input only (_IOW) and its fields are __u64: the checks run on the kernel's copy,
    so a negative Python int is the huge value C would see (and -EINVAL, not a negative gfn).
    """
    address, size = uapi.u64(attrs.address), uapi.u64(attrs.size)
    attributes, flags = uapi.u64(attrs.attributes), uapi.u64(attrs.flags)
    if flags:
        raise KvmError(uapi.EINVAL, "flags must be 0")
    if attributes & ~kvm_supported_mem_attributes(vm):
        raise KvmError(uapi.EINVAL, f"attributes {attributes:#x} not supported by this VM")
    if size == 0 or uapi.u64(address + size) < address:
        raise KvmError(uapi.EINVAL, "size must be non-zero and the range must not wrap")
    if address % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
        raise KvmError(uapi.EINVAL, "address and size must be page aligned")
    start = address >> PAGE_SHIFT
    end = (address + size) >> PAGE_SHIFT
    await kvm_vm_set_mem_attributes(vm, start, end, attributes)


async def kvm_vm_set_mem_attributes(vm: Vm, start: int, end: int, attributes: int) -> None:
    """virt/kvm/kvm_main.c: kvm_vm_set_mem_attributes() (6.8+): begin/zap, store, end under slots_lock."""
    await vm.slots_lock.lock()
    try:
        if kvm_range_has_memory_attributes(vm, start, end, ~0, attributes):
            return
        if alloc_fails("xa_reserve"):
            raise KvmError(uapi.ENOMEM, "xa_reserve failed; nothing changed")
        trace_kvm_vm_set_mem_attributes(vm, start, end, attributes)
        await _handle_gfn_range(vm, start, end, attributes, pre=True)
        # The store happens outside mmu_lock but inside the invalidation window.
        await traps.point(vm)
        if hb.ACTIVE:
            hb.access(hb.STORE_RELEASE, "mem_attr_array", vm)  # xa_store(): rcu_assign_pointer()
        if attributes:
            vm.attributes.assign(start, end, attributes)
        else:
            vm.attributes.clear(start, end)
        vm.mmu_word.write()
        traps.emit("set_memory_attributes", vm, start=start, end=end, attributes=attributes)
        await _handle_gfn_range(vm, start, end, attributes, pre=False)
    finally:
        await vm.slots_lock.unlock()


async def _handle_gfn_range(vm: Vm, start: int, end: int, attributes: int, *, pre: bool) -> None:
    """virt/kvm/kvm_main.c: kvm_handle_gfn_range(): begin (pre) or end (post) on the first slot found."""
    locked = False
    flush = False
    for memslots in vm.memslots:
        for slot in memslots.overlapping(start, end):
            rng = GfnRange(max(start, slot.base_gfn), min(end, slot.end_gfn), slot, attributes=attributes)
            if not locked:
                locked = True
                await vm.mmu_lock.write_lock()
                if pre:
                    kvm_mmu_invalidate_begin(vm)
                else:
                    kvm_mmu_invalidate_end(vm)
            if pre:
                kvm_mmu_invalidate_range_add(vm, rng.start, rng.end)
                flush |= await vm.ops.pre_set_memory_attributes(vm, rng)
            else:
                await vm.ops.post_set_memory_attributes(vm, rng)
    if locked:
        if flush:
            vm.ops.flush_remote_tlbs(vm)
        await vm.mmu_lock.write_unlock()
