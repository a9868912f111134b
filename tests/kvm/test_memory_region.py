"""KVM_SET_USER_MEMORY_REGION2 (kvm-core.md section 2.2): the checks of kvm_set_memory_region() in
order, guest_memfd binding errors, and the create/delete/move paths, as the kernel selftest
tools/testing/selftests/kvm/set_memory_region_test.c exercises them."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.vm import TASK_SIZE_MAX, Vm

from .helpers import PAGE, pre_fault, private_vm, run_once, shared_vm

SLOT = 10
GPA = 0xC0000000
SIZE = 0x200000  # set_memory_region_test.c: MEM_REGION_SIZE


def region(
    slot: int = SLOT,
    flags: int = 0,
    gpa: int = GPA,
    size: int = SIZE,
    hva: int = 0,
    offset: int = 0,
    gmem: object | None = None,
) -> uapi.UserspaceMemoryRegion2:
    return uapi.UserspaceMemoryRegion2(slot, flags, gpa, size, hva, offset, gmem)


async def expect_errno(errno: int, vm: Vm, mem: uapi.UserspaceMemoryRegion2) -> None:
    with pytest.raises(KvmError) as e:
        await vm.set_user_memory_region2(mem)
    assert e.value.errno == errno, f"expected {uapi.errno_name(errno)}, got {e.value!r}"


async def protected_vm(kvm: asyncvm.Kvm) -> Vm:
    return await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)


# -- check 1: flags ---------------------------------------------------------------------------


def test_every_undefined_flag_bit_is_einval() -> None:
    """set_memory_region_test.c: test_invalid_memory_region_flags(); kvm_main.c: check_memory_region_flags()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        for bit in range(3, 32):
            await expect_errno(uapi.EINVAL, vm, region(slot=0, flags=1 << bit, gpa=0))

    run_once(body)


def test_guest_memfd_flag_through_the_v1_ioctl_is_einval() -> None:
    """set_memory_region_test.c: test_invalid_memory_region_flags() (v2-only flag);
    kvm_main.c: KVM_SET_USER_MEMORY_REGION accepts only LOG_DIRTY_PAGES | READONLY."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        with pytest.raises(KvmError) as e:
            await vm.set_user_memory_region(uapi.UserspaceMemoryRegion(0, uapi.KVM_MEM_GUEST_MEMFD, 0, SIZE, 0))
        assert e.value.errno == uapi.EINVAL

    run_once(body)


@pytest.mark.parametrize("extra", [uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY], ids=["log_dirty", "readonly"])
def test_guest_memfd_with_dirty_logging_or_readonly_is_einval(extra: int) -> None:
    """set_memory_region_test.c: test_invalid_memory_region_flags(); kvm_main.c: check_memory_region_flags()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD | extra, gmem=gmem))
        assert vm.gfn_to_memslot(GPA >> 12) is None

    run_once(body)


def test_guest_memfd_flag_on_a_vm_without_private_memory_is_einval() -> None:
    """kvm_main.c: check_memory_region_flags() [6.8-6.17 form]: GUEST_MEMFD needs kvm_arch_has_private_mem()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=gmem))

    run_once(body, profile="6.10")  # [>=6.18] every VM type may (tests/kvm/test_gmem_mmap.py)


# -- checks 2-4: sizes, addresses, ids --------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "size", "hva"),
    [
        (GPA, SIZE + 1, 0),  # size not page aligned
        (GPA + 1, SIZE, 0),  # gpa not page aligned
        (GPA, SIZE, 0x1001),  # userspace_addr not page aligned
        (GPA, SIZE, TASK_SIZE_MAX),  # userspace range not access_ok()
        (uapi.U64_MAX - PAGE + 1, 2 * PAGE, 0),  # gpa + size wraps
        (0, (uapi.KVM_MEM_MAX_NR_PAGES + 1) * PAGE, 0),  # too many pages
    ],
    ids=["size_unaligned", "gpa_unaligned", "hva_unaligned", "hva_not_user", "gpa_wraps", "too_many_pages"],
)
def test_bad_geometry_is_einval(gpa: int, size: int, hva: int) -> None:
    """kvm_main.c: kvm_set_memory_region() general sanity checks."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm()
        await expect_errno(uapi.EINVAL, vm, region(gpa=gpa, size=size, hva=hva))

    run_once(body)


def test_negative_fields_are_read_as_the_u32_and_u64_the_kernel_copies() -> None:
    """include/uapi/linux/kvm.h: struct kvm_userspace_memory_region2 has __u32 slot/flags and __u64
    addresses: -PAGE as a gpa wraps, slot -1 is as_id 0xffff, offset -PAGE wraps with the size."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(gpa=-PAGE, size=2 * PAGE))
        await expect_errno(uapi.EINVAL, vm, region(slot=-1))
        await expect_errno(uapi.EINVAL, vm, region(hva=-PAGE))
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, offset=-PAGE, gmem=gmem))
        assert not vm.memslots[0].by_id

    run_once(body)


@pytest.mark.parametrize("offset", [1, PAGE - 1, PAGE + 512, uapi.U64_MAX - PAGE + 1])
def test_guest_memfd_offset_unaligned_or_wrapping_is_einval(offset: int) -> None:
    """kvm_main.c: kvm_set_memory_region(): GUEST_MEMFD offset unaligned, or offset + size wraps."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, offset=offset, gmem=gmem))

    run_once(body)


def test_slot_id_beyond_the_user_slots_is_einval() -> None:
    """set_memory_region_test.c: test_add_max_memory_regions(); kvm_main.c: kvm_vm_ioctl_set_memory_region()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm()
        await expect_errno(uapi.EINVAL, vm, region(slot=uapi.KVM_USER_MEM_SLOTS))
        await vm.set_user_memory_region2(region(slot=uapi.KVM_USER_MEM_SLOTS - 1))

    run_once(body)


def test_smm_address_space_exists_only_without_private_memory() -> None:
    """arch/x86/include/asm/kvm_host.h: kvm_arch_nr_memslot_as_ids() is 1 for VMs with private
    memory (SMM unsupported), 2 otherwise; kvm_main.c: kvm_set_memory_region() as_id check."""

    async def body(kvm: asyncvm.Kvm) -> None:
        default = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        await default.set_user_memory_region2(region(slot=(1 << 16) | 0))
        assert default.gfn_to_memslot(GPA >> 12, as_id=1) is not None
        protected = await protected_vm(kvm)
        await expect_errno(uapi.EINVAL, protected, region(slot=(1 << 16) | 0))
        await expect_errno(uapi.EINVAL, default, region(slot=(2 << 16) | 0))

    run_once(body)


# -- check 5: delete --------------------------------------------------------------------------


def test_delete_still_runs_the_address_sanity_checks() -> None:
    """kvm_main.c: kvm_set_memory_region(): access_ok(userspace_addr, 0) and the alignment checks
    come before the memory_size == 0 (delete) branch."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, hva = await shared_vm(kvm, 4, slot=SLOT)
        await expect_errno(uapi.EINVAL, vm, region(gpa=0, size=0, hva=TASK_SIZE_MAX + PAGE))
        await expect_errno(uapi.EINVAL, vm, region(gpa=0, size=0, hva=hva + 1))
        assert vm.gfn_to_memslot(0) is not None
        await vm.set_user_memory_region2(region(gpa=0, size=0, hva=hva))
        assert vm.gfn_to_memslot(0) is None

    run_once(body)


def test_deleting_a_slot_that_does_not_exist_is_einval() -> None:
    """kvm_main.c: kvm_set_memory_region(): memory_size == 0 on an empty slot -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm()
        await expect_errno(uapi.EINVAL, vm, region(size=0))
        await vm.set_user_memory_region2(region())
        await vm.set_user_memory_region2(region(size=0))
        await expect_errno(uapi.EINVAL, vm, region(size=0))

    run_once(body)


def test_create_delete_and_recreate_a_slot() -> None:
    """set_memory_region_test.c: test_delete_memory_region(); kvm_main.c: kvm_set_memslot() CREATE/DELETE."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, hva = await shared_vm(kvm, 16, slot=SLOT)
        vcpu = await vm.create_vcpu(0)
        assert await pre_fault(vcpu, 0, 16 * PAGE) is None
        first = vm.gfn_to_memslot(0)
        assert first is not None and first.id == SLOT
        await vm.set_user_memory_region2(region(gpa=0, size=0))
        assert vm.gfn_to_memslot(0) is None
        assert first.freed
        assert await pre_fault(vcpu, 0, PAGE, tolerate=(uapi.ENOENT,)) == uapi.ENOENT
        await vm.set_user_memory_region2(region(gpa=0, size=16 * PAGE, hva=hva))
        again = vm.gfn_to_memslot(0)
        assert again is not None and again is not first and not again.freed
        assert await pre_fault(vcpu, 0, 16 * PAGE) is None

    run_once(body)


# -- check 6: modifying an existing slot --------------------------------------------------------


def test_move_changes_the_gpa_and_faults_follow_it() -> None:
    """set_memory_region_test.c: test_move_memory_region(); kvm_main.c: KVM_MR_MOVE."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, hva = await shared_vm(kvm, 16, slot=SLOT)
        vcpu = await vm.create_vcpu(0)
        await kvm.mm.write(hva, b"moved!")
        assert await pre_fault(vcpu, 0, 16 * PAGE) is None
        old = vm.gfn_to_memslot(0)
        await vm.set_user_memory_region2(region(gpa=GPA, size=16 * PAGE, hva=hva))
        moved = vm.gfn_to_memslot(GPA >> 12)
        assert moved is not None and moved.id == SLOT and moved.base_gfn == GPA >> 12
        assert vm.gfn_to_memslot(0) is None
        assert old is not None and old.freed
        assert await pre_fault(vcpu, 0, PAGE, tolerate=(uapi.ENOENT,)) == uapi.ENOENT
        assert await pre_fault(vcpu, GPA, 16 * PAGE) is None
        vcpu.load_program([asyncvm.kvm.vcpu.GuestAccess.read(GPA, 6)])
        assert await vcpu.run() == [b"moved!"]

    run_once(body)


def test_a_modification_may_not_change_size_hva_or_readonly() -> None:
    """kvm_main.c: kvm_set_memory_region(): only the base gfn or dirty logging may change."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, hva = await shared_vm(kvm, 16, slot=SLOT)
        await expect_errno(uapi.EINVAL, vm, region(gpa=0, size=8 * PAGE, hva=hva))
        await expect_errno(uapi.EINVAL, vm, region(gpa=0, size=16 * PAGE, hva=hva + PAGE))
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_READONLY, gpa=0, size=16 * PAGE, hva=hva))
        await vm.set_user_memory_region2(region(flags=uapi.KVM_MEM_LOG_DIRTY_PAGES, gpa=0, size=16 * PAGE, hva=hva))
        slot = vm.gfn_to_memslot(0)
        assert slot is not None and slot.flags == uapi.KVM_MEM_LOG_DIRTY_PAGES

    run_once(body)


def test_an_unchanged_region_is_a_no_op() -> None:
    """kvm_main.c: kvm_set_memory_region(): "Nothing to change" returns 0 without a memslot update."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm, hva = await shared_vm(kvm, 16, slot=SLOT)
        generation, slot = vm.generation, vm.gfn_to_memslot(0)
        await vm.set_user_memory_region2(region(gpa=0, size=16 * PAGE, hva=hva))
        assert vm.generation == generation and vm.gfn_to_memslot(0) is slot

    run_once(body)


def test_guest_memfd_slots_cannot_be_modified_only_deleted() -> None:
    """kvm_main.c: kvm_set_memory_region(): "Private memslots are immutable, they can only be deleted"."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, slot=SLOT)
        same = region(flags=uapi.KVM_MEM_GUEST_MEMFD, gpa=0, size=4 * PAGE, hva=p.hva, gmem=p.gmem)
        moved = region(flags=uapi.KVM_MEM_GUEST_MEMFD, gpa=GPA, size=4 * PAGE, hva=p.hva, gmem=p.gmem)
        await expect_errno(uapi.EINVAL, p.vm, same)
        await expect_errno(uapi.EINVAL, p.vm, moved)
        await p.vm.set_user_memory_region2(region(flags=uapi.KVM_MEM_GUEST_MEMFD, gpa=0, size=0, gmem=None))
        assert p.vm.gfn_to_memslot(0) is None

    run_once(body)


@pytest.mark.parametrize("gpa", [0, GPA], ids=["flags_only", "move"])
def test_clearing_the_guest_memfd_flag_of_a_slot_is_einval(gpa: int) -> None:
    """kvm_main.c: kvm_set_memory_region() ("KVM: Disallow toggling KVM_MEM_GUEST_MEMFD on an existing
    memslot", 9935df5333aa, 6.19-rc, stable 6.18.y): a FLAGS_ONLY/MOVE change that drops the flag
    left the binding pointing at the freed old memslot (a use-after-free in kvm_gmem_release())."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, slot=SLOT)
        slot = p.vm.gfn_to_memslot(0)
        await expect_errno(uapi.EINVAL, p.vm, region(flags=0, gpa=gpa, size=4 * PAGE, hva=p.hva))
        assert p.vm.gfn_to_memslot(0) is slot and slot is not None and not slot.freed
        await p.gmem.close()

    run_once(body)


# -- check 7: overlap ---------------------------------------------------------------------------


def test_overlapping_gpa_ranges_are_eexist() -> None:
    """set_memory_region_test.c: test_add_overlapping_private_memory_regions(): both halves -> -EEXIST;
    kvm_main.c: kvm_check_memslot_overlap()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE * 4)
        gmem_flags = uapi.KVM_MEM_GUEST_MEMFD
        await vm.set_user_memory_region2(region(SLOT, gmem_flags, GPA, SIZE * 2, 0, 0, gmem))
        await vm.set_user_memory_region2(region(SLOT + 1, gmem_flags, GPA * 2, SIZE * 2, 0, SIZE * 2, gmem))
        await vm.set_user_memory_region2(region(SLOT, gmem_flags, GPA, 0, 0, 0, -1))
        front = region(SLOT, gmem_flags, GPA * 2 - SIZE, SIZE * 2, 0, 0, gmem)
        back = region(SLOT, gmem_flags, GPA * 2 + SIZE, SIZE * 2, 0, 0, gmem)
        await expect_errno(uapi.EEXIST, vm, front)
        await expect_errno(uapi.EEXIST, vm, back)

    run_once(body)


def test_moving_onto_another_slot_is_eexist() -> None:
    """kvm_main.c: kvm_set_memory_region(): the overlap check also covers KVM_MR_MOVE."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm()
        await vm.set_user_memory_region2(region(slot=1, gpa=0, size=SIZE))
        await vm.set_user_memory_region2(region(slot=2, gpa=GPA, size=SIZE))
        await expect_errno(uapi.EEXIST, vm, region(slot=2, gpa=SIZE - PAGE, size=SIZE))
        slot = vm.gfn_to_memslot(GPA >> 12)
        assert slot is not None and slot.id == 2

    run_once(body)


def test_earlier_checks_win_over_the_overlap_check() -> None:
    """kvm_main.c: kvm_set_memory_region(): flags, geometry, offset and immutability are checked
    (-EINVAL) before the overlap (-EEXIST)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, slot=1)
        flags = uapi.KVM_MEM_GUEST_MEMFD
        await expect_errno(uapi.EINVAL, p.vm, region(2, flags | uapi.KVM_MEM_READONLY, 0, PAGE, gmem=p.gmem))
        await expect_errno(uapi.EINVAL, p.vm, region(2, flags, 0, PAGE + 1, gmem=p.gmem))
        await expect_errno(uapi.EINVAL, p.vm, region(2, flags, 0, PAGE, offset=1, gmem=p.gmem))
        await expect_errno(uapi.EINVAL, p.vm, region(1, flags, 8 * PAGE, 4 * PAGE, gmem=p.gmem))

    run_once(body)


def test_the_overlap_check_wins_over_guest_memfd_binding_errors() -> None:
    """kvm_main.c: kvm_set_memory_region(): -EEXIST comes before kvm_gmem_bind() looks at the fd."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, slot=1)
        other = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        foreign = await other.create_guest_memfd(size=4 * PAGE)
        closed = await p.vm.create_guest_memfd(size=4 * PAGE)
        await closed.close()
        flags = uapi.KVM_MEM_GUEST_MEMFD
        await expect_errno(uapi.EEXIST, p.vm, region(2, flags, 0, PAGE, gmem=closed))
        await expect_errno(uapi.EEXIST, p.vm, region(2, flags, 0, PAGE, gmem=foreign))
        await expect_errno(uapi.EEXIST, p.vm, region(2, flags, 0, PAGE, offset=64 * PAGE, gmem=p.gmem))

    run_once(body)


# -- check 8: kvm_gmem_bind() -------------------------------------------------------------------


def test_binding_a_closed_guest_memfd_is_ebadf() -> None:
    """guest_memfd.c: kvm_gmem_bind(): fget() fails -> -EBADF."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await gmem.close()
        await expect_errno(uapi.EBADF, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=gmem))
        await expect_errno(uapi.EBADF, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=-1))
        assert vm.gfn_to_memslot(GPA >> 12) is None

    run_once(body)


def test_binding_a_file_that_is_not_a_guest_memfd_is_einval() -> None:
    """set_memory_region_test.c: test_add_private_memory_region() (KVM fd, VM fd);
    guest_memfd.c: kvm_gmem_bind(): file->f_op != &kvm_gmem_fops -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        vcpu = await vm.create_vcpu(0)
        for not_gmem in (kvm, vm, vcpu):
            await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=not_gmem))

    run_once(body)


def test_binding_another_vms_guest_memfd_is_einval() -> None:
    """set_memory_region_test.c: test_add_private_memory_region() ("Other VM's guest_memfd() should
    fail"); guest_memfd.c: kvm_gmem_bind(): f->kvm != kvm -> -EINVAL. The owner can bind it."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        vm2 = await protected_vm(kvm)
        gmem = await vm2.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=gmem))
        await vm2.set_user_memory_region2(region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=gmem))
        assert vm2.gfn_to_memslot(GPA >> 12) is not None
        assert vm.gfn_to_memslot(GPA >> 12) is None

    run_once(body)


def test_every_unaligned_offset_is_einval_and_offset_zero_binds() -> None:
    """set_memory_region_test.c: test_add_private_memory_region() ("Unaligned offset should fail")."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        for offset in range(1, PAGE):
            await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, offset=offset, gmem=gmem))
        await vm.set_user_memory_region2(region(flags=uapi.KVM_MEM_GUEST_MEMFD, gmem=gmem))

    run_once(body)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 2 * SIZE), (PAGE, SIZE), (SIZE, PAGE), (-PAGE, PAGE)],
    ids=["larger_than_file", "tail_past_end", "starts_at_end", "negative"],
)
def test_a_range_outside_the_file_is_einval(offset: int, size: int) -> None:
    """guest_memfd.c: kvm_gmem_bind(): offset < 0 or offset + size > i_size -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, size=size, offset=offset, gmem=gmem))

    run_once(body)


def test_binding_the_same_guest_memfd_pages_twice_is_einval() -> None:
    """guest_memfd.c: kvm_gmem_bind(): a page already in the bindings xarray -> -EINVAL [<=7.1]
    (Documentation/virt/kvm/api.rst: at most one mapping per guest_memfd page)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=4 * SIZE)
        flags = uapi.KVM_MEM_GUEST_MEMFD
        await vm.set_user_memory_region2(region(1, flags, 0, 2 * SIZE, 0, 0, gmem))
        await expect_errno(uapi.EINVAL, vm, region(2, flags, GPA, SIZE, 0, SIZE, gmem))
        await expect_errno(uapi.EINVAL, vm, region(2, flags, GPA, 2 * SIZE, 0, SIZE + PAGE, gmem))
        assert vm.gfn_to_memslot(GPA >> 12) is None
        # Disjoint pages of the same file bind fine.
        await vm.set_user_memory_region2(region(2, flags, GPA, 2 * SIZE, 0, 2 * SIZE, gmem))

    run_once(body)


def test_deleting_a_slot_unbinds_its_guest_memfd_pages() -> None:
    """guest_memfd.c: kvm_gmem_unbind() from kvm_free_memslot(): the pages can be bound again."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, slot=1)
        flags = uapi.KVM_MEM_GUEST_MEMFD
        await expect_errno(uapi.EINVAL, p.vm, region(2, flags, GPA, 4 * PAGE, 0, 0, p.gmem))
        await p.vm.set_user_memory_region2(region(1, flags, 0, 0))
        assert not p.gmem.bindings.any_overlap(0, 4)
        await p.vm.set_user_memory_region2(region(2, flags, GPA, 4 * PAGE, 0, 0, p.gmem))
        slot = p.vm.gfn_to_memslot(GPA >> 12)
        assert slot is not None and slot.gmem_file is p.gmem and p.gmem.bindings.get(0) is slot

    run_once(body)


def test_a_failed_bind_leaves_no_slot_and_no_binding() -> None:
    """kvm_main.c: kvm_set_memory_region(): on a kvm_gmem_bind() error the new slot is freed unseen."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await protected_vm(kvm)
        gmem = await vm.create_guest_memfd(size=SIZE)
        generation = vm.generation
        await expect_errno(uapi.EINVAL, vm, region(flags=uapi.KVM_MEM_GUEST_MEMFD, size=2 * SIZE, gmem=gmem))
        assert vm.generation == generation
        assert not gmem.bindings.any_overlap(0, 1 << 40)

    run_once(body)
