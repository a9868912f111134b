"""An async TDX launcher, as a VMM author writes one, and the scenario that hunts races in it.

``examples/tdx_launcher.py`` runs :class:`Launcher` live on asyncio or trio. The ``tdx_launcher``
scenario runs the very same code under the controlled runtime, so a schedule can show a race in
the VMM's own logic, not only in the kernel's. The launcher:

1. creates the TD (INIT_VM), its private guest_memfd memory and its vCPUs (INIT_VCPU);
2. loads a firmware image into private memory with KVM_TDX_INIT_MEM_REGION and measurement, one
   section per vCPU fd in turn: MRTD hashes every PAGE.ADD and MR.EXTEND in the order the TDX
   module sees them, so for the measurement to be attestable the sections must go in image
   order (a turnstile passes the turn when a section is fully added);
3. re-issues an INIT_MEM_REGION interrupted by -EINTR (or -EAGAIN) for the pages still left, as
   the uAPI says (the struct has advanced past the pages done);
4. finalizes (KVM_TDX_FINALIZE_VM, retried on -EBUSY) from its own task, once the progress
   counter says every page of the image is in;
5. pre-faults the rest of memory from all vCPUs in parallel, and runs each vCPU's guest code.

The deliberate VMM bug (``finalize_early``): the progress counter counts a section's pages when
its INIT_MEM_REGION is *issued*, not when the kernel reports them done, so the finalizer can run
between the last section's count and its ioctl; that ioctl then meets a finalized TD (-EINVAL),
or MRTD misses pages. A default campaign finds it; without the flag the launcher is clean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncvm
from asyncvm import uapi
from asyncvm.explore.params import Param
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime.failures import Violation
from asyncvm.runtime.sync import WaitQueue
from asyncvm.uapi import PAGE_SIZE, KvmError
from asyncvm.x86.tdx.module import TDX_EXTENDMR_CHUNKSIZE, mr_extend_block, page_add_block

from .common import pages_param, vcpus_param

#: errnos after which an ioctl with partial progress is re-issued for what is left
RETRY = (uapi.EINTR, uapi.EAGAIN)


@dataclass(frozen=True)
class Section:
    """A firmware section (as TDVF metadata lists them): where it goes, its bytes, measured or not."""

    name: str
    gpa: int
    data: bytes
    measured: bool = True

    @property
    def pages(self) -> int:
        return len(self.data) // PAGE_SIZE


def firmware_image(pages: int, sections: int = 4) -> list[Section]:
    """A generated firmware image of `pages` pages in `sections` consecutive sections from gpa 0.

    Each page is a SHA-256 stream of its index: distinct, reproducible bytes with no file to ship.
    """
    sections = max(1, min(sections, pages))
    out: list[Section] = []
    first = 0
    for k in range(sections):
        n = pages // sections + (1 if k < pages % sections else 0)
        data = b"".join(hashlib.sha256(b"asyncvm-tdvf-%d" % (first + i)).digest() * (PAGE_SIZE // 32) for i in range(n))
        out.append(Section(f"fw{k}", first * PAGE_SIZE, data))
        first += n
    return out


def expected_mrtd(image: list[Section]) -> bytes:
    """The reference MRTD an attestation verifier computes from the image: PAGE.ADD of every page
    in image order, each measured page's 256-byte chunks MR.EXTENDed after it, then finalized."""
    h = hashlib.sha384()
    for section in image:
        for i in range(section.pages):
            gpa = section.gpa + i * PAGE_SIZE
            h.update(page_add_block(gpa))
            if section.measured:
                page = section.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                for off in range(0, PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
                    h.update(mr_extend_block(gpa + off) + page[off : off + TDX_EXTENDMR_CHUNKSIZE])
    return h.digest()


@dataclass
class Launched:
    """What a launch produced: the TD, its measurement and what each vCPU's guest code read."""

    vm: Any
    mrtd: bytes
    reads: dict[str, list[bytes]] = field(default_factory=dict)


class Launcher:
    """Launch one TD: the image measured in order, finalized, the rest pre-faulted, the vCPUs run."""

    def __init__(
        self, kvm: asyncvm.Kvm, image: list[Section], *, vcpus: int, memory_pages: int, finalize_early: bool = False
    ) -> None:
        self.kvm = kvm
        self.image = image
        self.vcpus = vcpus
        self.memory_pages = max(memory_pages, self.image_pages)
        self.finalize_early = finalize_early
        #: pages of the image in the TD so far, and whose turn it is to add its section
        self.pages_done = 0
        self.turn = 0
        self.progress = WaitQueue("launcher.progress")
        self.turnstile = WaitQueue("launcher.turnstile")

    @property
    def image_pages(self) -> int:
        return sum(s.pages for s in self.image)

    async def launch(self) -> Launched:
        vm, cpus = await self.create_td()
        src = await self.load_source()
        async with asyncvm.TaskGroup() as tg:
            for i, vcpu in enumerate(cpus):
                tg.spawn(self.add_sections, vcpu, src, i, name=f"init_mem{i}")
            tg.spawn(self.finalize, vm, name="finalize")
        reads: dict[str, list[bytes]] = {}
        async with asyncvm.TaskGroup() as tg:
            for i, vcpu in enumerate(cpus):
                tg.spawn(self.boot_vcpu, vcpu, i, reads, name=f"vcpu{i}")
        return Launched(vm, vm.tdx_module.mrtd, dict(sorted(reads.items())))

    async def create_td(self) -> tuple[Any, list[Any]]:
        size = self.memory_pages * PAGE_SIZE
        vm = await self.kvm.create_vm(uapi.KVM_X86_TDX_VM)
        await vm.tdx_init_vm()
        gmem = await vm.create_guest_memfd(size=size)
        hva = await self.kvm.mm.mmap(size)
        await vm.set_user_memory_region2(
            uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, size, hva, 0, gmem)
        )
        await vm.set_memory_attributes(uapi.MemoryAttributes(0, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        cpus = [await vm.create_vcpu(i) for i in range(self.vcpus)]
        for vcpu in cpus:
            await vcpu.tdx_init_vcpu()
        return vm, cpus

    async def load_source(self) -> int:
        """The image in the VMM's own memory: INIT_MEM_REGION copies each page from there."""
        data = b"".join(s.data for s in self.image)
        src = await self.kvm.mm.mmap(len(data))
        await self.kvm.mm.write(src, data)
        return int(src)

    async def add_sections(self, vcpu: Any, src: int, first: int) -> None:
        """This vCPU's sections (every `vcpus`-th), each when its turn comes."""
        for k in range(first, len(self.image), self.vcpus):
            await self.turnstile.wait_event(self._turn_is(k))
            section = self.image[k]
            if self.finalize_early:
                await self.count(section.pages)  # BUG: counted when issued, not when done
            await self.add_section(vcpu, src + section.gpa, section)
            self.turn += 1
            await self.turnstile.wake_up()

    def _turn_is(self, k: int) -> Callable[[], bool]:
        return lambda: self.turn == k

    async def add_section(self, vcpu: Any, src: int, section: Section) -> None:
        region = uapi.TdxInitMemRegion(src, section.gpa, section.pages)
        flags = uapi.KVM_TDX_MEASURE_MEMORY_REGION if section.measured else 0
        while region.nr_pages:
            before = region.nr_pages
            try:
                await vcpu.tdx_init_mem_region(region, flags)
            except KvmError as e:
                if e.errno not in RETRY:
                    raise
            finally:
                if not self.finalize_early:
                    # The struct advanced past the pages the kernel added, even on error.
                    await self.count(before - region.nr_pages)

    async def count(self, pages: int) -> None:
        self.pages_done += pages
        await self.progress.wake_up()

    async def finalize(self, vm: Any) -> None:
        await self.progress.wait_event(lambda: self.pages_done >= self.image_pages)
        while True:
            try:
                await vm.tdx_finalize_vm()
                return
            except KvmError as e:
                if e.errno not in (uapi.EBUSY, *RETRY):
                    raise

    async def boot_vcpu(self, vcpu: Any, i: int, reads: dict[str, list[bytes]]) -> None:
        """Pre-fault this vCPU's share of the memory past the image, then run its guest code: read
        the start of one firmware section, write a marker in its own memory and read it back."""
        rest = self.memory_pages - self.image_pages
        share = rest // self.vcpus
        first = self.image_pages + i * share
        count = share if i < self.vcpus - 1 else rest - i * share
        if count:
            await pre_fault(vcpu, first * PAGE_SIZE, count * PAGE_SIZE)
        section = self.image[i % len(self.image)]
        program = [GuestAccess.read(section.gpa, 8, private=True)]
        if count:
            marker = b"vcpu%d" % i
            program += [GuestAccess.write(first * PAGE_SIZE, marker, private=True)]
            program += [GuestAccess.read(first * PAGE_SIZE, len(marker), private=True)]
        vcpu.load_program(program)
        while vcpu.pc < len(program):
            try:
                await vcpu.run()  # resumes at the access an -EINTR exit stopped at
            except KvmError as e:
                if e.errno not in RETRY:
                    raise
        # Every read of the program, including those of a call that an -EINTR exit ended.
        reads[f"vcpu{i}"] = list(vcpu.guest_reads)


async def pre_fault(vcpu: Any, gpa: int, size: int) -> None:
    """KVM_PRE_FAULT_MEMORY over the range: re-issued for what is left after progress or -EINTR/-EAGAIN."""
    r = uapi.PreFaultMemory(gpa, size)
    while r.size:
        try:
            await vcpu.pre_fault_memory(r)
        except KvmError as e:
            if e.errno not in RETRY:
                raise


@asyncvm.scenario(
    name="tdx_launcher",
    params={
        "vcpus": vcpus_param(2),
        "pages": pages_param(4),
        "sections": Param(2, ge=1, le=64, help="firmware sections, added in order"),
        "memory": pages_param(6),
        "finalize_early": Param(0, choices=(0, 1), help="1: the launcher's deliberate bug"),
    },
)
async def tdx_launcher(
    kvm: Any, vcpus: int = 2, pages: int = 4, sections: int = 2, memory: int = 6, finalize_early: int = 0
) -> None:
    """The async TDX launcher of examples/tdx_launcher.py, run under the controlled runtime.

    Hunts races in the VMM's own logic: the in-order, measured INIT_MEM_REGION across vCPU tasks,
    the finalizer task, the parallel pre-fault and the vCPU runs. Checked by the kernel-side
    oracles and by the launcher's own expectations: no ioctl fails, MRTD equals the reference
    measurement of the image, every guest read sees the firmware and its own marker.
    `finalize_early=1` turns on a deliberate VMM bug (the progress counter counts pages when
    INIT_MEM_REGION is issued, so FINALIZE can overtake the last section).
    """
    image = firmware_image(pages, sections)
    launcher = Launcher(kvm, image, vcpus=vcpus, memory_pages=memory, finalize_early=bool(finalize_early))
    launched = await launcher.launch()
    if launched.mrtd != expected_mrtd(image):
        raise Violation(
            "launcher_mrtd",
            f"MRTD {launched.mrtd.hex()[:16]}... differs from the image's reference measurement",
            signature="launcher_mrtd",
        )
    for i in range(vcpus):
        got = launched.reads[f"vcpu{i}"]
        section = image[i % len(image)]
        if got[0] != section.data[:8] or (len(got) > 1 and got[1] != b"vcpu%d" % i):
            raise Violation("launcher_guest_read", f"vcpu{i} read {got!r}", signature="launcher_guest_read")
