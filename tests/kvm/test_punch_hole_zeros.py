"""PUNCH_HOLE on private memory: the guest sees zeros in the hole and its data everywhere else
(kvm-core.md section 2.3, "Effect for the guest")."""

from __future__ import annotations

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess

from .helpers import PAGE, pre_fault, private_vm, run_guest, run_once

PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
PATTERNS = [bytes([0xA0 + i]) * 16 for i in range(4)]


def guest_writes() -> list[GuestAccess]:
    return [GuestAccess.write(i * PAGE + 0x100, PATTERNS[i]) for i in range(4)]


def guest_reads() -> list[GuestAccess]:
    return [GuestAccess.read(i * PAGE + 0x100, 16) for i in range(4)]


@pytest.mark.parametrize("profile", ["6.10", "6.18", "7.0"])
def test_guest_reads_zeros_from_a_punched_private_page_and_data_elsewhere(profile: str) -> None:
    """x86/private_mem_conversions_test.c: guest_test_punch_hole(); guest_memfd.c:
    kvm_gmem_punch_hole() truncates the folio, and kvm_gmem_get_pfn() zeroes the new one."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        vcpu = await p.vm.create_vcpu(0)
        assert await run_guest(vcpu, guest_writes()) == []
        assert await run_guest(vcpu, guest_reads()) == PATTERNS
        await p.gmem.fallocate(PUNCH, 2 * PAGE, PAGE)
        assert await run_guest(vcpu, guest_reads()) == [PATTERNS[0], PATTERNS[1], bytes(16), PATTERNS[3]]

    run_once(body, profile=profile)


def test_punch_hole_zaps_the_private_spte_and_frees_the_folio() -> None:
    """guest_memfd.c: kvm_gmem_punch_hole(): invalidate begin (zap), truncate (free), invalidate end."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        vcpu = await p.vm.create_vcpu(0)
        assert await pre_fault(vcpu, 0, 4 * PAGE) is None
        folio = p.gmem.inode.folios.get(1)
        assert folio is not None
        seq = p.vm.mmu_invalidate_seq
        await p.gmem.fallocate(PUNCH, PAGE, PAGE)
        assert folio.freed
        assert p.gmem.inode.folios.get(1) is None
        mapped = {g for _r, s, e, _l in p.vm.arch.mmu.mapped_leaves(0, 4) for g in range(s, e)}
        assert mapped == {0, 2, 3}
        assert p.vm.mmu_invalidate_seq == seq + 1
        assert p.vm.mmu_invalidate_in_progress == 0

    run_once(body)


def test_punching_an_unbound_range_runs_no_invalidation() -> None:
    """guest_memfd.c: __kvm_gmem_invalidate_begin(): begin/end only when a binding overlaps."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = await vm.create_guest_memfd(size=4 * PAGE)
        await gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 4 * PAGE)
        await gmem.fallocate(PUNCH, 0, 4 * PAGE)
        assert vm.mmu_invalidate_seq == 0
        assert list(gmem.inode.folios.items()) == []

    run_once(body)


def test_a_guest_write_after_the_punch_lands_in_a_new_zeroed_page() -> None:
    """guest_memfd.c: kvm_gmem_get_pfn() allocates on demand after a punch; the rest of the new page
    reads as zeros (no stale host data)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 2)
        vcpu = await p.vm.create_vcpu(0)
        await run_guest(vcpu, [GuestAccess.write(0, b"\xff" * 64)])
        await p.gmem.fallocate(PUNCH, 0, PAGE)
        reads = await run_guest(vcpu, [GuestAccess.write(0, b"new"), GuestAccess.read(0, 64)])
        assert reads == [b"new" + bytes(61)]

    run_once(body)
