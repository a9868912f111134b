"""KVM_SET_MEMORY_ATTRIBUTES (kvm-core.md section 3): validation in
virt/kvm/kvm_main.c: kvm_vm_ioctl_set_mem_attributes() and the update in kvm_vm_set_mem_attributes()."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.kvm.vm import Vm

from .helpers import PAGE, pre_fault, private_vm, run_guest, run_once

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


async def expect_einval(vm: Vm, attrs: uapi.MemoryAttributes) -> None:
    with pytest.raises(KvmError) as e:
        await vm.set_memory_attributes(attrs)
    assert e.value.errno == uapi.EINVAL, repr(e.value)


async def protected(kvm: asyncvm.Kvm) -> Vm:
    return await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)


def test_nonzero_flags_are_einval() -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): "flags is currently not used"."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected(kvm)
        for flags in (1, 1 << 63):
            await expect_einval(vm, uapi.MemoryAttributes(0, PAGE, PRIVATE, flags))

    run_once(body)


def test_private_on_a_default_vm_is_einval() -> None:
    """kvm_main.c: kvm_supported_mem_attributes(): no PRIVATE without kvm_arch_has_private_mem()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
        await expect_einval(vm, uapi.MemoryAttributes(0, PAGE, PRIVATE))
        assert not vm.mem_is_private(0)

    run_once(body)


@pytest.mark.parametrize("attributes", [1 << 0, 1 << 4, PRIVATE | 1 << 63])
def test_attribute_bits_other_than_private_are_einval(attributes: int) -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): attributes & ~supported -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected(kvm)
        assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == PRIVATE
        await expect_einval(vm, uapi.MemoryAttributes(0, PAGE, attributes))

    run_once(body)


def test_zero_size_is_einval() -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): size == 0 -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_einval(await protected(kvm), uapi.MemoryAttributes(PAGE, 0, PRIVATE))

    run_once(body)


@pytest.mark.parametrize(
    ("address", "size"),
    [(uapi.U64_MAX - PAGE + 1, 2 * PAGE), (uapi.U64_MAX - PAGE + 1, PAGE), (PAGE, uapi.U64_MAX - PAGE + 1)],
    ids=["wraps", "ends_at_2_64", "huge_size"],
)
def test_a_range_that_wraps_is_einval(address: int, size: int) -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): address + size < address (u64) -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_einval(await protected(kvm), uapi.MemoryAttributes(address, size, PRIVATE))

    run_once(body)


@pytest.mark.parametrize(("address", "size"), [(1, PAGE), (PAGE - 1, PAGE), (0, PAGE + 1), (0, 1)])
def test_unaligned_address_or_size_is_einval(address: int, size: int) -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): !PAGE_ALIGNED(address) || !PAGE_ALIGNED(size)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        await expect_einval(await protected(kvm), uapi.MemoryAttributes(address, size, PRIVATE))

    run_once(body)


def test_negative_fields_are_read_as_the_u64_the_kernel_copies() -> None:
    """include/uapi/linux/kvm.h: struct kvm_memory_attributes has __u64 fields: -PAGE is 2**64 - PAGE,
    so the range wraps (-EINVAL) instead of naming negative gfns; flags = -1 is nonzero."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected(kvm)
        await expect_einval(vm, uapi.MemoryAttributes(-PAGE, PAGE, PRIVATE))
        await expect_einval(vm, uapi.MemoryAttributes(0, PAGE, PRIVATE, -1))
        await expect_einval(vm, uapi.MemoryAttributes(0, PAGE, -1))
        assert not list(vm.attributes.items())

    run_once(body)


def test_a_failed_call_changes_nothing() -> None:
    """kvm_main.c: kvm_vm_ioctl_set_mem_attributes(): validation precedes any update."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        seq = p.vm.mmu_invalidate_seq
        await expect_einval(p.vm, uapi.MemoryAttributes(0, PAGE + 1, 0))
        assert all(p.vm.mem_is_private(g) for g in range(4))
        assert p.vm.mmu_invalidate_seq == seq

    run_once(body)


def test_no_memslot_is_needed_and_no_invalidation_runs() -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes(): attributes are per gfn, independent of memslots;
    kvm_handle_gfn_range() begins an invalidation only if a memslot intersects the range."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected(kvm)
        await vm.set_memory_attributes(uapi.MemoryAttributes(1 << 40, 16 * PAGE, PRIVATE))
        assert all(vm.mem_is_private((1 << 28) + g) for g in range(16))
        assert not vm.mem_is_private((1 << 28) + 16)
        assert vm.mmu_invalidate_seq == 0 and vm.mmu_invalidate_in_progress == 0

    run_once(body)


def test_setting_the_same_attributes_twice_is_a_no_op_without_invalidation() -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes(): kvm_range_has_memory_attributes() -> return 0
    before xa_reserve() and before any invalidation."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, private=False)
        attrs = uapi.MemoryAttributes(0, 4 * PAGE, PRIVATE)
        await p.vm.set_memory_attributes(attrs)
        seq = p.vm.mmu_invalidate_seq
        assert seq == 1, "the first call intersects the memslot: one begin/end"
        await p.vm.set_memory_attributes(attrs)
        assert p.vm.mmu_invalidate_seq == seq
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, PRIVATE))
        assert p.vm.mmu_invalidate_seq == seq
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(8 * PAGE, PAGE, 0))
        assert p.vm.mmu_invalidate_seq == seq

    run_once(body)


def test_converting_part_of_a_range_changes_only_those_gfns() -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes(): an xa_store per gfn of [start, end)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 8)
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(2 * PAGE, 3 * PAGE, 0))
        assert [p.vm.mem_is_private(g) for g in range(8)] == [True, True, False, False, False, True, True, True]

    run_once(body)


def test_converting_to_shared_zaps_the_private_mappings() -> None:
    """arch/x86/kvm/mmu/mmu.c: kvm_arch_pre_set_memory_attributes(): the old kind is unmapped
    inside the invalidation, so the guest faults again (on the shared side) afterwards."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        vcpu = await p.vm.create_vcpu(0)
        assert await pre_fault(vcpu, 0, 4 * PAGE) is None
        assert [r for r, _s, _e, _l in p.vm.arch.mmu.mapped_leaves(0, 4)]
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))
        mapped = {g for _r, s, e, leaf in p.vm.arch.mmu.mapped_leaves(0, 4) if leaf.private for g in range(s, e)}
        assert mapped == {0, 2, 3}
        await kvm.mm.write(p.hva + PAGE, b"shared")
        assert await run_guest(vcpu, [GuestAccess.read(PAGE, 6)]) == [b"shared"]

    run_once(body)


def test_xa_reserve_failure_is_enomem_and_changes_nothing() -> None:
    """kvm_main.c: kvm_vm_set_mem_attributes(): xa_reserve() fails -> -ENOMEM before any change."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected(kvm)
        with pytest.raises(KvmError) as e:
            await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGE, PRIVATE))
        assert e.value.errno == uapi.ENOMEM
        assert not vm.mem_is_private(0)

    run_once(body, data_probs={"alloc_fail": 1.0})
