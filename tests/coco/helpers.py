"""Shared pieces of the confidential-VM tests (Intel TDX, AMD SEV-SNP): one controlled execution,
TD and SNP VM builders, and the expected measurements computed here, from the published rules,
never from the model's own helpers (kvm-coco.md section 2.9 for MRTD, the SNP firmware ABI's
PAGE_INFO hash chain for the launch digest)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.guest_memfd import GuestMemfd
from asyncvm.kvm.vcpu import Vcpu
from asyncvm.kvm.vm import Vm
from tests.support import QUIET, Body, run_failing, run_guest, run_once  # noqa: F401

PAGE = uapi.PAGE_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
MEASURE = uapi.KVM_TDX_MEASURE_MEMORY_REGION
#: GPAW 48: the TDX shared bit is GPA bit 47 (tdx.c: TDX_SHARED_BIT_PWL_4)
TDX_SHARED_BIT = 1 << 47
#: SNP guest policy: only the reserved-must-be-one bit 17 (SNP ABI, GUEST_POLICY)
SNP_POLICY = 1 << 17

#: no signals, no forced rescheduling: every errno is the one the input deserves


async def errno_of(aw: Awaitable[Any]) -> int:
    """The errno an ioctl fails with, or 0 if it succeeds."""
    try:
        await aw
    except KvmError as e:
        return e.errno or 0
    return 0


async def tolerate(aw: Awaitable[Any]) -> int:
    """An ioctl whose failure the scenario shrugs off (so the oracles, not the VMM, judge the run)."""
    return await errno_of(aw)


# -- VMs with one guest_memfd slot ------------------------------------------------------------


async def gmem_vm(kvm: asyncvm.Kvm, vm_type: int, npages: int, *, private: bool = True) -> tuple[Vm, GuestMemfd, int]:
    """KVM_CREATE_VM + guest_memfd slot 0 at gpa 0 over `npages` (+ PRIVATE attributes)."""
    vm = await kvm.create_vm(vm_type)
    gmem = await vm.create_guest_memfd(size=npages * PAGE)
    hva = kvm.mm.mmap(npages * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, npages * PAGE, hva, 0, gmem)
    )
    if private:
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, npages * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return vm, gmem, hva


def image(npages: int, seed: int = 1) -> bytes:
    """A TD/SNP image whose every 256-byte chunk differs (so a wrong chunk or GPA shows)."""
    out = bytearray()
    for p in range(npages):
        for c in range(PAGE // 256):
            out += bytes(((seed * 37 + p * 16 + c) * 7 + i) & 0xFF for i in range(256))
    return bytes(out)


async def source(kvm: asyncvm.Kvm, data: bytes) -> int:
    """A page-aligned buffer in the VMM's address space holding `data`."""
    addr = kvm.mm.mmap(max(len(data), PAGE))
    await kvm.mm.write(addr, data)
    return int(addr)


@dataclass
class Td:
    """A TD after INIT_VM with a private guest_memfd slot, its vCPUs, and a source image."""

    vm: Vm
    gmem: GuestMemfd
    vcpus: list[Vcpu]
    src: int
    image: bytes


async def build_td(kvm: asyncvm.Kvm, *, slot_pages: int = 16, image_pages: int = 4, vcpus: int = 1) -> Td:
    """KVM_TDX_INIT_VM, the slot, `vcpus` vCPUs created and KVM_TDX_INIT_VCPU'd, the image mmapped."""
    vm = await kvm.create_vm(uapi.KVM_X86_TDX_VM)
    await vm.tdx_init_vm()
    gmem = await vm.create_guest_memfd(size=slot_pages * PAGE)
    hva = kvm.mm.mmap(slot_pages * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, slot_pages * PAGE, hva, 0, gmem)
    )
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, slot_pages * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    for v in cpus:
        await v.tdx_init_vcpu()
    data = image(image_pages)
    return Td(vm, gmem, cpus, await source(kvm, data), data)


# -- the expected measurements, computed independently -----------------------------------------


def expected_mrtd(adds: Sequence[tuple[int, bytes | None]]) -> bytes:
    """MRTD after TDH.MR.FINALIZE (kvm-coco.md 2.9) for PAGE.ADDs in this order.

    Each entry is (gpa, contents if the page was MR.EXTENDed else None). PAGE.ADD hashes a
    128-byte block: "MEM.PAGE.ADD" at 0, the GPA as little-endian u64 at 16, zeros elsewhere.
    MR.EXTEND, per 256-byte chunk in address order: a 128-byte block "MR.EXTEND" at 0, the
    chunk's GPA at 16, then the chunk's 256 bytes.
    """
    h = hashlib.sha384()
    for gpa, contents in adds:
        h.update(b"MEM.PAGE.ADD".ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104))
        if contents is not None:
            assert len(contents) == PAGE
            for off in range(0, PAGE, 256):
                h.update(b"MR.EXTEND".ljust(16, b"\0") + struct.pack("<Q", gpa + off) + bytes(104))
                h.update(contents[off : off + 256])
    return h.digest()


SNP_TYPE_NORMAL = uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL


def expected_launch_digest(updates: Sequence[tuple[int, int, bytes]]) -> bytes:
    """The SNP launch digest after these successful page launches, in order.

    SNP firmware ABI, SNP_LAUNCH_UPDATE: DIGEST_NEW = SHA-384(PAGE_INFO), with PAGE_INFO the
    0x70 bytes DIGEST_CUR (48) | CONTENTS (48: SHA-384 of the page for NORMAL pages, zero for
    ZERO/UNMEASURED/SECRETS/CPUID) | LENGTH u16 = 0x70 | PAGE_TYPE u8 | IMI_PAGE u8 | VMPL3, VMPL2,
    VMPL1 perms u8 | reserved u8 | GPA u64, little-endian; the digest starts at 48 zero bytes.
    Each entry is (gpa, page type, page contents).
    """
    digest = bytes(48)
    for gpa, page_type, contents in updates:
        measured = hashlib.sha384(contents).digest() if page_type == SNP_TYPE_NORMAL else bytes(48)
        info = digest + measured + struct.pack("<H", 0x70) + bytes([page_type]) + bytes(5) + struct.pack("<Q", gpa)
        assert len(info) == 0x70
        digest = hashlib.sha384(info).digest()
    return digest


async def snp_vm(kvm: asyncvm.Kvm, npages: int = 8, *, start: bool = True) -> tuple[Vm, GuestMemfd, int]:
    """An SNP VM (KVM_SEV_INIT2 implied) with a private guest_memfd slot, after LAUNCH_START."""
    vm, gmem, hva = await gmem_vm(kvm, uapi.KVM_X86_SNP_VM, npages)
    if start:
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))
    return vm, gmem, hva


#: runs per profile: the full 1,000 in the default profile, a shorter look at the T19 flow
RUNS = {"6.18": 1000, "7.0": 250}


def clean_campaign(name: str, profile: str, *, seed: int = 11) -> asyncvm.Report:
    """A PCT campaign of a registered scenario that must run in full and find nothing."""
    runs = RUNS[profile]
    report = asyncvm.explore(name, strategy="pct", runs=runs, seed=seed, profile=profile)
    assert report.runs == runs
    assert report.ok, report.summary()
    return report
