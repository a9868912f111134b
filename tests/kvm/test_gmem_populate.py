"""kvm_gmem_populate() (kvm-core.md section 2.5), called directly as the vendor launch ioctls do,
with slots_lock held and a post_populate callback that copies from a source buffer in kvm.mm."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.guest_memfd import kvm_gmem_populate
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.kvm.vm import Vm
from asyncvm.runtime.failures import Violation

from .helpers import PAGE, SOURCE, PrivateVm, copy_from_source, fill_source, populate, private_vm, run_guest, run_once

BOTH = ["6.18", "7.0"]
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


async def fault_in(p: PrivateVm, *gfns: int) -> None:
    """The guest touches these private gfns: kvm_gmem_get_pfn() zeroes them and marks them uptodate."""
    vcpu = p.vm.vcpus.get(0) or await p.vm.create_vcpu(0)
    await run_guest(vcpu, [GuestAccess.read(g * PAGE, 8) for g in gfns])


async def guest_read(p: PrivateVm, gfn: int, length: int = 16) -> bytes:
    vcpu = p.vm.vcpus.get(0) or await p.vm.create_vcpu(0)
    return (await run_guest(vcpu, [GuestAccess.read(gfn * PAGE, length)]))[0]


def uptodate(p: PrivateVm, index: int) -> bool:
    folio = p.gmem.inode.folios.get(index)
    return folio is not None and folio.uptodate


@pytest.mark.parametrize("profile", BOTH)
def test_populate_copies_the_source_and_the_guest_sees_it(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): post_populate() on each page, then folio_mark_uptodate()."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        src = await fill_source(kvm, SOURCE * 2)
        assert await populate(p.vm, 0, src, 2) == 2
        assert uptodate(p, 0) and uptodate(p, 1) and not uptodate(p, 2)
        assert await guest_read(p, 0) == SOURCE[:16]
        assert await guest_read(p, 1) == SOURCE[:16]
        assert await guest_read(p, 2) == bytes(16)

    run_once(body, profile=profile)


def test_populating_a_page_the_guest_faulted_is_eexist_on_6_18() -> None:
    """guest_memfd.c: kvm_gmem_populate() [6.11-6.19]: an uptodate (already prepared) folio -> -EEXIST,
    and the guest's page is left alone."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await fault_in(p, 0)
        assert uptodate(p, 0)
        src = await fill_source(kvm, SOURCE)
        assert await populate(p.vm, 0, src, 1) == -uapi.EEXIST
        assert await guest_read(p, 0) == bytes(16)

    run_once(body, profile="6.18")


def test_populating_a_page_the_guest_faulted_succeeds_on_7_0() -> None:
    """guest_memfd.c: kvm_gmem_populate() [>=7.0]: no generic -EEXIST; double population is for the
    vendor callback to refuse (TDX PAGE.ADD, the SNP RMP check)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await fault_in(p, 0)
        src = await fill_source(kvm, SOURCE)
        assert await populate(p.vm, 0, src, 1) == 1
        assert await guest_read(p, 0) == SOURCE[:16]

    run_once(body, profile="7.0")


@pytest.mark.parametrize("profile", BOTH)
def test_populate_of_a_shared_gfn_is_einval(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): a gfn without KVM_MEMORY_ATTRIBUTE_PRIVATE -> -EINVAL
    ("let kvm_gmem_populate() operate only on private gfns", 6.11)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4, private=False)
        src = await fill_source(kvm, SOURCE)
        assert await populate(p.vm, 1, src, 1) == -uapi.EINVAL
        assert not uptodate(p, 1)

    run_once(body, profile=profile)


@pytest.mark.parametrize(("profile", "errno"), [("6.18", uapi.EEXIST), ("7.0", uapi.EINVAL)])
def test_the_uptodate_check_precedes_the_attribute_check_on_6_18(profile: str, errno: int) -> None:
    """guest_memfd.c: kvm_gmem_populate() [6.11-6.19] checks folio_test_uptodate() before the
    PRIVATE attribute; [>=7.0] only the attribute is checked."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await fault_in(p, 0)
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGE, 0))
        src = await fill_source(kvm, SOURCE)
        assert await populate(p.vm, 0, src, 1) == -errno

    run_once(body, profile=profile)


@pytest.mark.parametrize(("profile", "expected"), [("6.18", 2), ("7.0", 4)])
def test_partial_progress_returns_the_pages_done(profile: str, expected: int) -> None:
    """guest_memfd.c: kvm_gmem_populate(): `ret && !i ? ret : i` -- stop at the first error and
    report the pages already populated."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await fault_in(p, 2)
        src = await fill_source(kvm, SOURCE * 4)
        assert await populate(p.vm, 0, src, 4) == expected
        assert uptodate(p, 0) and uptodate(p, 1)

    run_once(body, profile=profile)


@pytest.mark.parametrize("profile", BOTH)
def test_partial_progress_stops_at_a_shared_gfn(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): a shared gfn after a private one -> 1 page done."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(PAGE, PAGE, 0))
        src = await fill_source(kvm, SOURCE * 4)
        assert await populate(p.vm, 0, src, 4) == 1
        assert uptodate(p, 0) and not uptodate(p, 1) and not uptodate(p, 2)

    run_once(body, profile=profile)


def test_no_progress_returns_the_first_error() -> None:
    """guest_memfd.c: kvm_gmem_populate() [6.11-6.19]: the first page fails -> that error, not 0."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await fault_in(p, 0)
        src = await fill_source(kvm, SOURCE * 4)
        assert await populate(p.vm, 0, src, 4) == -uapi.EEXIST
        assert not uptodate(p, 1)

    run_once(body, profile="6.18")


@pytest.mark.parametrize("profile", BOTH)
def test_a_post_populate_error_stops_population_at_that_page(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): a callback error ends the loop; the folio is not marked uptodate."""
    calls: list[int] = []

    async def fails_on_gfn_2(vm: Vm, gfn: int, pfn: int, src: int | None, order: int, opaque: Any) -> int:
        calls.append(gfn)
        if gfn == 2:
            return -uapi.EIO
        return await copy_from_source(vm, gfn, pfn, src, order, opaque)

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        src = await fill_source(kvm, SOURCE * 4)
        assert await populate(p.vm, 1, src, 3, fails_on_gfn_2) == 1
        assert calls == [1, 2]
        assert uptodate(p, 1) and not uptodate(p, 2)
        assert await populate(p.vm, 2, src, 1, fails_on_gfn_2) == -uapi.EIO

    run_once(body, profile=profile)


@pytest.mark.parametrize("profile", BOTH)
def test_npages_is_clamped_to_the_end_of_the_memslot(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): npages = min(npages, slot pages left from start_gfn)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        src = await fill_source(kvm, SOURCE * 16)
        assert await populate(p.vm, 2, src, 16) == 2

    run_once(body, profile=profile)


@pytest.mark.parametrize("profile", BOTH)
def test_a_gfn_without_a_guest_memfd_memslot_is_einval(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): no slot, or !kvm_slot_has_gmem(slot) -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        hva = kvm.mm.mmap(4 * PAGE)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 4 * PAGE, hva))
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, 8 * PAGE, PRIVATE))
        src = await fill_source(kvm, SOURCE)
        assert await populate(vm, 0, src, 1) == -uapi.EINVAL
        assert await populate(vm, 6, src, 1) == -uapi.EINVAL

    run_once(body, profile=profile)


@pytest.mark.parametrize("profile", BOTH)
def test_populate_after_the_guest_memfd_was_closed_is_efault(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): the slot's file is gone (released) -> -EFAULT."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        await p.gmem.close()
        src = await fill_source(kvm, SOURCE)
        assert await populate(p.vm, 0, src, 1) == -uapi.EFAULT

    run_once(body, profile=profile)


@pytest.mark.parametrize(("profile", "result"), [("6.18", 0), ("7.0", -uapi.EINVAL)])
def test_zero_pages_is_nothing_on_6_18_and_einval_on_7_0(profile: str, result: int) -> None:
    """guest_memfd.c: kvm_gmem_populate(): [6.11-6.19] npages < 0 -> -EINVAL, 0 populates nothing;
    [>=7.0] WARN_ON_ONCE(npages <= 0) -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        assert await populate(p.vm, 0, None, 0) == result
        assert await populate(p.vm, 0, None, -1) == -uapi.EINVAL

    # [>=7.0] a caller passing npages <= 0 is a kernel bug: the WARN is reported as one.
    run_once(body, profile=profile, expect="kernel_warn" if profile == "7.0" else None)


def test_an_unaligned_source_is_einval_on_7_0() -> None:
    """guest_memfd.c: kvm_gmem_populate() [>=7.0]: WARN_ON_ONCE(!PAGE_ALIGNED(src)) -> -EINVAL."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        src = await fill_source(kvm, SOURCE * 2)
        assert await populate(p.vm, 0, src + 8, 1) == -uapi.EINVAL
        assert not uptodate(p, 0)

    run_once(body, profile="7.0", expect="kernel_warn")


@pytest.mark.parametrize("profile", BOTH)
def test_an_unmapped_source_is_efault_and_stops_population(profile: str) -> None:
    """guest_memfd.c: kvm_gmem_populate(): [>=7.0] get_user_pages_fast() of the source fails ->
    that error; [6.11-6.19] the callback's copy fails the same way. Pages before it stay populated."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        src = await fill_source(kvm, SOURCE * 2)
        await kvm.mm.munmap(src + PAGE, PAGE)
        assert await populate(p.vm, 0, src + PAGE, 1) == -uapi.EFAULT
        assert await populate(p.vm, 0, src, 2) == 1
        assert uptodate(p, 0) and not uptodate(p, 1)

    run_once(body, profile=profile)


def test_populate_interrupted_before_the_first_page_is_eintr() -> None:
    """guest_memfd.c: kvm_gmem_populate(): signal_pending() -> -EINTR, and nothing was populated."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        assert await populate(p.vm, 0, None, 2) == -uapi.EINTR
        assert not uptodate(p, 0)

    run_once(body, data_probs={"signal": 1.0})


def test_populate_requires_slots_lock() -> None:
    """guest_memfd.c: kvm_gmem_populate(): lockdep_assert_held(&kvm->slots_lock)."""

    async def body(kvm: asyncvm.Kvm) -> None:
        p = await private_vm(kvm, 4)
        with pytest.raises(Violation) as v:
            await kvm_gmem_populate(p.vm, 0, None, 1, copy_from_source, None)
        assert v.value.kind == "lock_assert"

    run_once(body)
