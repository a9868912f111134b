"""kvm_gmem_invalidate_end() ends per file only where the file still has bindings in the range, as
virt/kvm/guest_memfd.c does, and kvm_gmem_release() invalidates only its own file (issue 14).

An unbind that slips between a punch hole's begin and end (the invalidate lock not taken) leaves
mmu_invalidate_in_progress raised, and the invalidate_balance oracle sees it. Ending for every
file that began (the model's old "opened set") hid exactly that direction of the race."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm import vm as kvm_vm
from asyncvm.kvm.guest_memfd import GuestMemfd
from asyncvm.kvm.memslots import Memslot
from asyncvm.runtime import traps
from asyncvm.scenarios.common import private_vm

from ..support import run_once

PAGE = uapi.PAGE_SIZE
PAGES = 4


async def punch_hole_vs_memslot_delete(kvm: asyncvm.Kvm) -> None:
    vm, gmem, hva = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, PAGES)

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGES * PAGE)

    async def delete() -> None:
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, hva, 0, gmem))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(punch, name="punch_hole")
        tg.spawn(delete, name="memslot_delete")


async def unbind_without_invalidate_lock(slot: Memslot) -> None:
    """The mutation: kvm_gmem_unbind() clears the binding without filemap_invalidate_lock()."""
    file = slot.gmem_file
    if file is None:
        return
    await traps.point(file.inode.invalidate_lock)
    file.bindings.clear(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages)
    slot.gmem_file = None


def test_the_correct_model_balances_begin_and_end() -> None:
    report = asyncvm.explore(punch_hole_vs_memslot_delete, strategy="random", runs=300, seed=2)
    assert report.ok, report.summary()


def test_an_unbind_between_begin_and_end_leaves_the_invalidation_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_vm, "kvm_gmem_unbind", unbind_without_invalidate_lock)
    report = asyncvm.explore(punch_hole_vs_memslot_delete, strategy="random", runs=300, seed=2)
    assert "invalidate_balance:quiescence" in report.signatures, report.summary()


async def release_one_of_two_views(kvm: asyncvm.Kvm) -> None:
    """Two VMs' files on one guest_memfd inode; closing the first invalidates only its VM."""
    vm1, gmem1, _ = await private_vm(kvm, uapi.KVM_X86_SW_PROTECTED_VM, PAGES)
    vm2 = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    gmem2 = GuestMemfd(vm2, gmem1.inode)  # the second view (gmem_file) of the same inode
    hva2 = await kvm.mm.mmap(PAGES * PAGE)
    await vm2.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGES * PAGE, hva2, 0, gmem2)
    )
    seq1, seq2 = vm1.mmu_invalidate_seq, vm2.mmu_invalidate_seq
    await gmem1.close()
    assert vm1.mmu_invalidate_seq == seq1 + 1, "the closed file's VM was invalidated"
    assert vm2.mmu_invalidate_seq == seq2, "kvm_gmem_release() invalidated another VM's view"


def test_release_invalidates_only_the_released_files_vm() -> None:
    """guest_memfd.c: kvm_gmem_release() calls __kvm_gmem_invalidate_begin/end() on its own file."""
    run_once(release_one_of_two_views)
