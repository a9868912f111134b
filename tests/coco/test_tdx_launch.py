"""A whole TD launch (kvm-coco.md section 1, ISSUE 5a): KVM_TDX_INIT_VM, four vCPUs created and
KVM_TDX_INIT_VCPU'd, KVM_TDX_INIT_MEM_REGION of a multi-page image, KVM_TDX_FINALIZE_VM, then the
guest reads its image back. MRTD is computed here from the rules of section 2.9 and compared
with ``vm.tdx_module.mrtd``; the "7.0" profile (T19: PAGE.ADD inside the S-EPT hook, "all the
locks") must produce the same MRTD as the default "6.18" (T16: nr_premapped, PAGE.ADD in
post-populate)."""

from __future__ import annotations

from typing import Any

import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.kvm.vcpu import GuestAccess

from .helpers import MEASURE, PAGE, build_td, expected_mrtd, run_guest, run_once

IMAGE_PAGES = 6
#: the image sits away from gpa 0 so the GPAs in the hash are not all small
IMAGE_GPA = 3 * PAGE


async def launch(kvm: asyncvm.Kvm, *, measure: bool, out: dict[str, Any]) -> None:
    td = await build_td(kvm, slot_pages=16, image_pages=IMAGE_PAGES, vcpus=4)
    vm = td.vm
    region = uapi.TdxInitMemRegion(td.src, IMAGE_GPA, IMAGE_PAGES)
    await td.vcpus[1].tdx_init_mem_region(region, MEASURE if measure else 0)
    assert (region.source_addr, region.gpa, region.nr_pages) == (
        td.src + IMAGE_PAGES * PAGE,
        IMAGE_GPA + IMAGE_PAGES * PAGE,
        0,
    ), "on success the struct is written back fully advanced"
    await vm.tdx_finalize_vm()
    assert vm.tdx_hw_error == 0
    out["mrtd"] = vm.tdx_module.mrtd
    program = [GuestAccess.read(IMAGE_GPA + p * PAGE, PAGE) for p in range(IMAGE_PAGES)]
    out["reads"] = await run_guest(td.vcpus[3], program)
    out["image"] = td.image


def expected(image: bytes, measure: bool) -> bytes:
    return expected_mrtd(
        [(IMAGE_GPA + p * PAGE, image[p * PAGE : (p + 1) * PAGE] if measure else None) for p in range(IMAGE_PAGES)]
    )


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_measured_td_launch_mrtd_matches_the_offline_calculation(profile: str) -> None:
    """tdx.c: tdx_vcpu_init_mem_region() with KVM_TDX_MEASURE_MEMORY_REGION -> per page
    TDH.MEM.PAGE.ADD then 16x TDH.MR.EXTEND (tdx_gmem_post_populate()); tdx_td_finalize() ->
    TDH.MR.FINALIZE; MRTD per kvm-coco.md 2.9; the guest reads the image back (KVM_RUN after
    FINALIZE, PAGE.ADDed pages are MAPPED, no ACCEPT needed)."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        await launch(kvm, measure=True, out=out)

    run_once(body, profile=profile)
    assert out["mrtd"] == expected(out["image"], measure=True)
    assert b"".join(out["reads"]) == out["image"]


@pytest.mark.parametrize("profile", ["6.18", "7.0"])
def test_unmeasured_td_launch_mrtd_covers_only_page_add(profile: str) -> None:
    """tdx.c: tdx_gmem_post_populate() without KVM_TDX_MEASURE_MEMORY_REGION: PAGE.ADD only, so
    MRTD depends on the GPAs and their order, not on the contents (kvm-coco.md 2.9)."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        await launch(kvm, measure=False, out=out)

    run_once(body, profile=profile)
    assert out["mrtd"] == expected(out["image"], measure=False)
    assert out["mrtd"] != expected(out["image"], measure=True)
    assert b"".join(out["reads"]) == out["image"]


def test_t19_launch_gives_the_same_mrtd_as_t16() -> None:
    """[T19] "KVM: TDX: ADD pages to the TD image while populating mirror EPT entries" moves
    PAGE.ADD into tdx_sept_set_private_spte(); the module sees the same SEAMCALL sequence, so the
    measurement of the same image is unchanged between the 6.18 and 7.0 profiles."""
    got: dict[str, bytes] = {}
    for profile in ("6.18", "7.0"):
        out: dict[str, Any] = {}

        async def body(kvm: asyncvm.Kvm, out: dict[str, Any] = out) -> None:
            await launch(kvm, measure=True, out=out)

        run_once(body, profile=profile)
        got[profile] = out["mrtd"]
    assert got["6.18"] == got["7.0"]
    assert len(got["6.18"]) == 48


def test_mrtd_follows_the_order_pages_were_added() -> None:
    """kvm-coco.md 2.9: MRTD depends on the order of PAGE.ADDs: two INIT_MEM_REGION calls, the
    upper half of the image first, measured only in the second call."""
    out: dict[str, Any] = {}

    async def body(kvm: asyncvm.Kvm) -> None:
        td = await build_td(kvm, image_pages=4, vcpus=2)
        half = 2 * PAGE
        await td.vcpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src + half, half, 2))
        await td.vcpus[1].tdx_init_mem_region(uapi.TdxInitMemRegion(td.src, 0, 2), MEASURE)
        await td.vm.tdx_finalize_vm()
        out["mrtd"] = td.vm.tdx_module.mrtd
        out["image"] = td.image

    run_once(body)
    img = out["image"]
    pages = [img[p * PAGE : (p + 1) * PAGE] for p in range(4)]
    assert out["mrtd"] == expected_mrtd([(2 * PAGE, None), (3 * PAGE, None), (0, pages[0]), (PAGE, pages[1])])
    assert out["mrtd"] != expected_mrtd([(0, pages[0]), (PAGE, pages[1]), (2 * PAGE, None), (3 * PAGE, None)])
