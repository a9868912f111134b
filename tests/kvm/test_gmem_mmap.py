"""guest_memfd the host can map (6.18: GUEST_MEMFD_FLAG_MMAP / INIT_SHARED), in the shape of the
kernel selftest tools/testing/selftests/kvm/guest_memfd_test.c: flags per VM type and profile,
mmap supported / not supported, COW refused, SIGBUS beyond the size and on private memory,
PUNCH_HOLE vs the host mapping, and a default VM running on guest_memfd alone."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import KvmError, SigBus, uapi
from asyncvm.kvm.guest_memfd import KVM_MEMSLOT_GMEM_ONLY
from asyncvm.kvm.vcpu import GuestAccess

from .helpers import PAGE, run_once

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
TOTAL = 4 * PAGE

#: guest_memfd.c: kvm_gmem_get_supported_flags() on x86 (6.18): MMAP everywhere, INIT_SHARED only
#: where kvm_arch_supports_gmem_init_shared() (no private memory)
FLAGS_618 = {
    uapi.KVM_X86_DEFAULT_VM: MMAP | INIT_SHARED,
    uapi.KVM_X86_SW_PROTECTED_VM: MMAP,
    uapi.KVM_X86_TDX_VM: MMAP,
    uapi.KVM_X86_SNP_VM: MMAP,
}


@pytest.mark.parametrize("vm_type", list(FLAGS_618), ids=uapi.vm_type_name)
@pytest.mark.parametrize("profile", ["6.10", "6.18", "7.0"])
def test_check_extension_guest_memfd_flags_per_vm_type(vm_type: int, profile: str) -> None:
    """kvm_main.c: KVM_CAP_GUEST_MEMFD_FLAGS -> kvm_gmem_get_supported_flags(kvm); none before 6.18."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        want = 0 if profile == "6.10" else FLAGS_618[vm_type]
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == want
        # /dev/kvm: kvm_gmem_get_supported_flags(NULL) reports every flag the kernel knows
        assert kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == (0 if profile == "6.10" else MMAP | INIT_SHARED)
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1 or (profile == "6.10" and vm_type == 0)

    run_once(body, profile=profile)


@pytest.mark.parametrize("vm_type", list(FLAGS_618), ids=uapi.vm_type_name)
def test_guest_memfd_flags_each_bit(vm_type: int) -> None:
    """guest_memfd_test.c: test_guest_memfd_flags(): every supported bit creates, every other is -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        valid = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        for bit in range(64):
            flag = 1 << bit
            if flag & valid:
                await vm.create_guest_memfd(size=PAGE, flags=flag)
                continue
            with pytest.raises(KvmError) as e:
                await vm.create_guest_memfd(size=PAGE, flags=flag)
            assert e.value.errno == uapi.EINVAL, hex(flag)
        if vm_type != uapi.KVM_X86_DEFAULT_VM:
            # x86.c: kvm_arch_supports_gmem_init_shared(): !kvm_arch_has_private_mem()
            with pytest.raises(KvmError) as e:
                await vm.create_guest_memfd(size=PAGE, flags=MMAP | INIT_SHARED)
            assert e.value.errno == uapi.EINVAL

    run_once(body)


def test_flags_refused_before_6_18() -> None:
    """guest_memfd.c: kvm_gmem_create() [6.8-6.17]: no flag is valid."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        for flags in (MMAP, INIT_SHARED, MMAP | INIT_SHARED):
            with pytest.raises(KvmError) as e:
                await vm.create_guest_memfd(size=PAGE, flags=flags)
            assert e.value.errno == uapi.EINVAL

    run_once(body, profile="6.10")


@pytest.mark.parametrize("vm_type", list(FLAGS_618), ids=uapi.vm_type_name)
def test_mmap_not_supported_without_the_flag(vm_type: int) -> None:
    """guest_memfd_test.c: test_mmap_not_supported(); guest_memfd.c: kvm_gmem_mmap() -> -ENODEV."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        gmem = await vm.create_guest_memfd(size=TOTAL)
        for length in (PAGE, TOTAL):
            with pytest.raises(KvmError) as e:
                kvm.mm.mmap(length, fd=gmem, offset=0, shared=True)
            assert e.value.errno == uapi.ENODEV

    run_once(body)


@pytest.mark.parametrize("flags", [MMAP, MMAP | INIT_SHARED], ids=["mmap", "mmap_init_shared"])
def test_mmap_cow_is_einval(flags: int) -> None:
    """guest_memfd_test.c: test_mmap_cow(): a MAP_PRIVATE mapping is refused (kvm_gmem_mmap() -EINVAL)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=flags)
        with pytest.raises(KvmError) as e:
            await kvm.mm.mmap(TOTAL, fd=gmem, offset=0, shared=False)
        assert e.value.errno == uapi.EINVAL
        assert gmem.refcount == 1  # the failed mmap kept no reference

    run_once(body)


def test_mmap_supported() -> None:
    """guest_memfd_test.c: test_mmap_supported(): memset through the mapping reads back; PUNCH_HOLE
    of the first page reads zeros there (a fresh folio) and keeps the rest; writes work again."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        mem = await kvm.mm.mmap(TOTAL, fd=gmem, offset=0, shared=True)
        await kvm.mm.write(mem, b"\xaa" * TOTAL)
        assert await kvm.mm.read(mem, TOTAL) == b"\xaa" * TOTAL
        first = gmem.inode.folios.get(0)
        await gmem.fallocate(PUNCH, 0, PAGE)
        assert first is not None and first.freed  # the host PTE went with the page-cache reference
        assert await kvm.mm.read(mem, PAGE) == bytes(PAGE)
        assert await kvm.mm.read(mem + PAGE, TOTAL - PAGE) == b"\xaa" * (TOTAL - PAGE)
        assert gmem.inode.folios.get(0) is not first
        await kvm.mm.write(mem, b"\xaa" * PAGE)
        assert await kvm.mm.read(mem, TOTAL) == b"\xaa" * TOTAL
        await kvm.mm.munmap(mem, TOTAL)

    run_once(body)


def _fault_sigbus(accessible: int, map_size: int, flags: int, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> None:
    """guest_memfd_test.c: test_fault_sigbus(): memset over the mapping dies with SIGBUS at the first
    inaccessible byte (what came before it is written), and a read there is SIGBUS too."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(vm_type)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=flags)
        mem = await kvm.mm.mmap(map_size, fd=gmem, offset=0, shared=True)
        with pytest.raises(SigBus) as e:
            await kvm.mm.write(mem, b"\xaa" * map_size)
        assert e.value.addr == mem + accessible
        with pytest.raises(SigBus):
            await kvm.mm.read(mem + accessible, 1)
        if accessible:
            assert await kvm.mm.read(mem, accessible) == b"\xaa" * accessible
        await kvm.mm.munmap(mem, map_size)

    run_once(body)


def test_fault_overflow() -> None:
    """guest_memfd_test.c: test_fault_overflow(): a mapping 4x the file: SIGBUS past the size."""
    _fault_sigbus(TOTAL, 4 * TOTAL, MMAP | INIT_SHARED)


@pytest.mark.parametrize(
    "vm_type",
    [uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_TDX_VM, uapi.KVM_X86_SNP_VM],
    ids=uapi.vm_type_name,
)
def test_fault_private(vm_type: int) -> None:
    """guest_memfd_test.c: test_fault_private(): MMAP without INIT_SHARED: every host access is SIGBUS."""
    _fault_sigbus(0, TOTAL, MMAP, vm_type)


def test_gup_of_a_private_page_is_efault() -> None:
    """mm/gup.c: VM_FAULT_SIGBUS from the fault handler is -EFAULT for get_user_pages()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP)
        mem = await kvm.mm.mmap(TOTAL, fd=gmem, shared=True)
        with pytest.raises(KvmError) as e:
            await kvm.mm.get_user_page(mem)
        assert e.value.errno == uapi.EFAULT

    run_once(body)


def test_mapping_pins_the_file_until_munmap() -> None:
    """mm/mmap.c: the VMA holds a file reference: close() does not release a mapped guest_memfd;
    munmap() drops the last reference (kvm_gmem_release() then runs)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        mem = gmem.mmap(TOTAL)
        await kvm.mm.write(mem, b"\x11" * PAGE)
        await gmem.close()
        assert not gmem.released and gmem in gmem.inode.files
        assert await kvm.mm.read(mem, 1) == b"\x11"
        await kvm.mm.munmap(mem, PAGE)  # part of the VMA stays: the file stays
        assert not gmem.released
        await kvm.mm.munmap(mem + PAGE, TOTAL - PAGE)
        assert gmem.released
        assert not gmem.inode.i_mmap

    run_once(body)


def test_madvise_dontneed_keeps_the_data() -> None:
    """A shared file mapping: MADV_DONTNEED drops the PTEs, not the page cache; the next access
    refaults the same folio (guest_memfd_test.c: test_collapse() refaults after DONTNEED)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        mem = gmem.mmap(TOTAL)
        await kvm.mm.write(mem, b"\x5a" * TOTAL)
        folio = gmem.inode.folios.get(1)
        await kvm.mm.madvise(mem, TOTAL, uapi.MADV_DONTNEED)
        assert folio is not None and folio.refcount == 1  # only the page cache's
        assert await kvm.mm.read(mem + PAGE, PAGE) == b"\x5a" * PAGE
        assert gmem.inode.folios.get(1) is folio

    run_once(body)


def test_guest_memfd_flag_on_a_default_vm() -> None:
    """kvm_main.c: check_memory_region_flags() [>=6.18]: KVM_MEM_GUEST_MEMFD on every VM type; the
    slot of an MMAP guest_memfd is guest_memfd-only (kvm_gmem_bind() sets KVM_MEMSLOT_GMEM_ONLY)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        plain = await vm.create_guest_memfd(size=TOTAL)
        mappable = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TOTAL, 0, 0, plain)
        )
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(1, uapi.KVM_MEM_GUEST_MEMFD, 1 << 32, TOTAL, 0, 0, mappable)
        )
        slot0, slot1 = vm.gfn_to_memslot(0), vm.gfn_to_memslot((1 << 32) >> 12)
        assert slot0 is not None and not slot0.flags & KVM_MEMSLOT_GMEM_ONLY
        assert slot1 is not None and slot1.flags & KVM_MEMSLOT_GMEM_ONLY

    run_once(body)


def test_guest_memfd_guest() -> None:
    """guest_memfd_test.c: test_guest_memfd_guest(): a default VM with a memslot backed only by an
    MMAP|INIT_SHARED guest_memfd (userspace_addr NULL): the host writes 0xaa through a mapping and
    unmaps it, the guest reads 0xaa and writes 0xff, a new mapping reads 0xff."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        assert flags & MMAP and flags & INIT_SHARED
        gpa = 1 << 32
        size = PAGE
        gmem = await vm.create_guest_memfd(size=size, flags=MMAP | INIT_SHARED)
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(1, uapi.KVM_MEM_GUEST_MEMFD, gpa, size, 0, 0, gmem)
        )
        mem = await kvm.mm.mmap(size, fd=gmem, offset=0, shared=True)
        await kvm.mm.write(mem, b"\xaa" * size)
        await kvm.mm.munmap(mem, size)
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.read(gpa, 64), GuestAccess.write(gpa, b"\xff" * 64)])
        reads = await vcpu.run()
        assert reads == [b"\xaa" * 64]
        assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_HLT
        mem = await kvm.mm.mmap(size, fd=gmem, offset=0, shared=True)
        assert await kvm.mm.read(mem, 64) == b"\xff" * 64
        await gmem.close()

    run_once(body)


def test_punch_hole_zaps_the_guest_and_the_host() -> None:
    """kvm_gmem_punch_hole() on an MMAP|INIT_SHARED guest_memfd bound to a default VM: the guest's
    shared SPTE goes (KVM_FILTER_SHARED invalidation), the host PTE goes, both refault one fresh,
    zeroed folio."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        mem = gmem.mmap(TOTAL)
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TOTAL, mem, 0, gmem)
        )
        await kvm.mm.write(mem, b"\x42" * TOTAL)
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.read(0, 8)])
        assert await vcpu.run() == [b"\x42" * 8]
        seq = vm.mmu_invalidate_seq
        await gmem.fallocate(PUNCH, 0, PAGE)
        assert vm.mmu_invalidate_seq > seq and vm.mmu_invalidate_in_progress == 0
        assert kvm.mm.ptes.get(mem // PAGE) is None
        vcpu.load_program([GuestAccess.read(0, 8)])
        assert await vcpu.run() == [bytes(8)]
        assert await kvm.mm.read(mem, 8) == bytes(8)
        new = gmem.inode.folios.get(0)
        host = kvm.mm.ptes.get(mem // PAGE)
        assert host is not None and host[0] is new

    run_once(body)


def test_shared_fault_of_a_gmem_only_slot_on_a_protected_vm() -> None:
    """mmu.c: kvm_mmu_faultin_pfn() [6.18]: a guest_memfd-only slot resolves shared faults through
    guest_memfd too (kvm_memslot_is_gmem_only()), even without INIT_SHARED."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, TOTAL, 0, 0, gmem))
        vcpu = await vm.create_vcpu(0)
        vcpu.load_program([GuestAccess.write(0, b"\x07" * 8, private=False), GuestAccess.read(0, 8, private=False)])
        assert await vcpu.run() == [b"\x07" * 8]
        assert gmem.inode.folios.get(0) is not None

    run_once(body)


def test_kernel_copy_from_a_private_mapping_is_efault() -> None:
    """sev.c: sev_gmem_post_populate(): copy_from_user() of a source the fault handler refuses is
    -EFAULT (which snp_launch_update() reports as -EIO on the first page), never a SIGBUS out of
    the ioctl (the VMM itself would get SIGBUS touching it)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SNP_VM)
        gmem = await vm.create_guest_memfd(size=PAGE)
        hva = await kvm.mm.mmap(PAGE)
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGE, hva, 0, gmem)
        )
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
        private_src = await vm.create_guest_memfd(size=PAGE, flags=MMAP)
        src = await kvm.mm.mmap(PAGE, fd=private_src, shared=True)
        update = uapi.SevSnpLaunchUpdate(0, src, PAGE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        with pytest.raises(KvmError) as e:
            await vm.snp_launch_update(update)
        assert e.value.errno == uapi.EIO and not isinstance(e.value, SigBus)

    run_once(body)


def test_mmap_of_a_closed_guest_memfd_is_ebadf() -> None:
    """mm/mmap.c: ksys_mmap_pgoff(): fget() of a closed fd fails, even while an older mapping still
    holds the file."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        gmem = await vm.create_guest_memfd(size=TOTAL, flags=MMAP | INIT_SHARED)
        first = gmem.mmap(PAGE)
        await gmem.close()
        with pytest.raises(KvmError) as e:
            kvm.mm.mmap(PAGE, fd=gmem, shared=True)
        assert e.value.errno == uapi.EBADF
        await kvm.mm.munmap(first, PAGE)
        assert gmem.released
        with pytest.raises(KvmError) as e:
            kvm.mm.mmap(PAGE, fd=gmem, shared=True)
        assert e.value.errno == uapi.EBADF

    run_once(body)
