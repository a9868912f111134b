"""Race scenarios for the controlled runtime (kvm-core.md section 0, items 1, 5, 11, 19).

Each scenario is ``async def scenario(kvm)``: it builds its VM, races a few tasks, and then checks
the outcome a VMM can observe. Tasks tolerate exactly the errnos the ABI allows for the race (EINTR
from a signal draw, EAGAIN from a pre-fault that meets an INVALID memslot, ...); any other errno, and
every oracle violation (which is not a KvmError), fails the execution. Outcomes are recorded in
``OUTCOMES`` so a test can check that the campaign really saw both sides of the race.
"""

from __future__ import annotations

from collections import Counter

import asyncvm
from asyncvm import KvmError, uapi
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime import cond_resched, draw

from .helpers import PAGE, SOURCE, fill_source, populate, pre_fault, private_vm, run_guest, shared_vm

PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PATTERNS = [bytes([0x11 * (i + 1)]) * 8 for i in range(4)]

#: scenario name -> how often each outcome was seen (reset by the tests)
OUTCOMES: dict[str, Counter[object]] = {}


def _seen(name: str, outcome: object) -> None:
    OUTCOMES.setdefault(name, Counter())[outcome] += 1


async def descheduled(what: str, most: int = 4) -> None:
    """The VMM thread is descheduled for a drawn number (0..most-1) of voluntary yields first.

    Under a priority scheduler (PCT) a short ioctl such as PUNCH_HOLE tends to run wholly before or
    wholly after a long one unless a change point falls inside it; starting it after a drawn number
    of yields spreads its start over the other task's progress. The draw is part of the schedule,
    so each start offset is explored and replays exactly.
    """
    for _ in range(draw(f"delay:{what}", n=most)):
        await cond_resched()


async def punch_hole_vs_pre_fault(kvm: asyncvm.Kvm) -> None:
    """A vCPU pre-faults four private pages (kvm_gmem_get_pfn) while userspace punches two of them."""
    p = await private_vm(kvm, 4)
    vcpu = await p.vm.create_vcpu(0)

    async def vcpu0() -> None:
        assert await pre_fault(vcpu, 0, 4 * PAGE) is None

    async def punch_hole() -> None:
        await descheduled("punch_hole")
        await p.gmem.fallocate(PUNCH, PAGE, 2 * PAGE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(vcpu0, name="vcpu0")
        tg.spawn(punch_hole, name="punch_hole")
    mapped = {g for _r, s, e, _l in p.vm.arch.mmu.mapped_leaves(0, 4) for g in range(s, e)}
    assert {0, 3} <= mapped
    _seen("punch_hole_vs_pre_fault", frozenset(mapped & {1, 2}))


async def punch_hole_vs_guest_run(kvm: asyncvm.Kvm) -> None:
    """The guest reads private pages it wrote earlier while userspace punches two of them: each read
    sees the old data or zeros, and after the punch the hole reads as zeros."""
    p = await private_vm(kvm, 4)
    vcpu = await p.vm.create_vcpu(0)
    await run_guest(vcpu, [GuestAccess.write(i * PAGE, PATTERNS[i]) for i in range(4)])
    reads: list[bytes] = []

    async def vcpu0() -> None:
        reads.extend(await run_guest(vcpu, [GuestAccess.read(i * PAGE, 8) for i in (1, 2, 0, 3)]))

    async def punch_hole() -> None:
        await descheduled("punch_hole")
        await p.gmem.fallocate(PUNCH, PAGE, 2 * PAGE)

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(vcpu0, name="vcpu0")
        tg.spawn(punch_hole, name="punch_hole")
    assert reads[0] in (PATTERNS[1], bytes(8)) and reads[1] in (PATTERNS[2], bytes(8))
    assert reads[2:] == [PATTERNS[0], PATTERNS[3]]
    after = await run_guest(vcpu, [GuestAccess.read(i * PAGE, 8) for i in range(4)])
    assert after == [PATTERNS[0], bytes(8), bytes(8), PATTERNS[3]]
    _seen("punch_hole_vs_guest_run", (reads[0] == bytes(8), reads[1] == bytes(8)))


async def attribute_flip_vs_populate(kvm: asyncvm.Kvm) -> None:
    """Userspace converts gfns 0-3 to shared while a launch ioctl populates gfns 0-1 and a vCPU
    pre-faults gfns 2-3. Populate succeeds (it ran first) or gets -EINVAL (the gfn is shared by
    then); the pre-fault succeeds, or sees the attribute change (-EFAULT, a memory-fault exit)."""
    p = await private_vm(kvm, 4)
    vcpu = await p.vm.create_vcpu(0)
    src = await fill_source(kvm, SOURCE * 2)
    result: list[int] = []

    async def launch() -> None:
        result.append(await populate(p.vm, 0, src, 2))

    async def flip() -> None:
        await descheduled("flip")
        await p.vm.set_memory_attributes(uapi.MemoryAttributes(0, 4 * PAGE, 0))

    async def vcpu0() -> None:
        err = await pre_fault(vcpu, 2 * PAGE, 2 * PAGE, tolerate=(uapi.EFAULT,))
        if err == uapi.EFAULT:
            assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
            assert vcpu.kvm_run.memory_fault.is_private

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(launch, name="populate")
        tg.spawn(flip, name="set_memory_attributes")
        tg.spawn(vcpu0, name="vcpu0")
    (r,) = result
    assert r in (2, 1, -uapi.EINVAL, -uapi.EINTR), r
    populated = [g for g in (0, 1) if (f := p.gmem.inode.folios.get(g)) is not None and f.uptodate]
    assert len(populated) == max(r, 0)
    assert not any(p.vm.mem_is_private(g) for g in range(4))
    _seen("attribute_flip_vs_populate", "populated" if r > 0 else uapi.errno_name(r))


async def memslot_delete_vs_pre_fault(kvm: asyncvm.Kvm) -> None:
    """A vCPU pre-faults shared memory (holding kvm->srcu) while userspace deletes the memslot.
    The pre-fault finishes, or stops with -EAGAIN (INVALID slot, [~6.18]) or -ENOENT (no slot);
    once the slot is back, the same pre-fault succeeds."""
    vm, hva = await shared_vm(kvm, 8)
    vcpu = await vm.create_vcpu(0)
    errors: list[int | None] = []

    async def vcpu0() -> None:
        errors.append(await pre_fault(vcpu, 0, 2 * PAGE, tolerate=(uapi.EAGAIN, uapi.ENOENT)))

    async def delete() -> None:
        await descheduled("delete", most=6)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(vcpu0, name="vcpu0")
        tg.spawn(delete, name="delete_slot")
    assert vm.gfn_to_memslot(0) is None
    await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 8 * PAGE, hva))
    assert await pre_fault(vcpu, 0, 8 * PAGE) is None
    _seen("memslot_delete_vs_pre_fault", uapi.errno_name(errors[0]) if errors[0] else "done")


async def memslot_delete_vs_private_pre_fault(kvm: asyncvm.Kvm) -> None:
    """As above with a guest_memfd slot and private gfns: without a slot a private pre-fault is a
    memory-fault exit (-EFAULT) rather than emulation (-ENOENT)."""
    p = await private_vm(kvm, 4)
    vcpu = await p.vm.create_vcpu(0)
    errors: list[int | None] = []

    async def vcpu0() -> None:
        errors.append(await pre_fault(vcpu, 0, 2 * PAGE, tolerate=(uapi.EAGAIN, uapi.EFAULT)))

    async def delete() -> None:
        await descheduled("delete", most=6)
        await p.vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(vcpu0, name="vcpu0")
        tg.spawn(delete, name="delete_slot")
    assert not p.gmem.bindings.any_overlap(0, 4)
    assert not p.vm.arch.mmu.mapped_leaves(0, 4) or all(r.invalid for r, *_ in p.vm.arch.mmu.mapped_leaves(0, 4))
    _seen("memslot_delete_vs_private_pre_fault", uapi.errno_name(errors[0]) if errors[0] else "done")


async def memslot_delete_vs_guest_run(kvm: asyncvm.Kvm) -> None:
    """The guest reads shared memory while userspace deletes the memslot: reads before the delete
    return the data, accesses after it exit to userspace as MMIO (set_memory_region_test.c)."""
    vm, hva = await shared_vm(kvm, 4)
    await kvm.mm.write(hva, b"slotdata")
    vcpu = await vm.create_vcpu(0)
    exits: list[int] = []

    async def vcpu0() -> None:
        vcpu.load_program([GuestAccess.read(0, 8), GuestAccess.read(PAGE, 8), GuestAccess.read(0, 8)])
        while True:
            try:
                await vcpu.run()
            except KvmError as e:
                if e.errno == uapi.EINTR:
                    continue
                raise
            exits.append(vcpu.kvm_run.exit_reason)
            if vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_HLT:
                return
            assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_MMIO

    async def delete() -> None:
        await descheduled("delete", most=6)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, 0, 0))

    async with asyncvm.TaskGroup() as tg:
        tg.spawn(vcpu0, name="vcpu0")
        tg.spawn(delete, name="delete_slot")
    data_reads = [r for r in vcpu.guest_reads if r == b"slotdata"]
    assert len(data_reads) + exits.count(uapi.KVM_EXIT_MMIO) + vcpu.guest_reads.count(bytes(8)) == 3
    _seen("memslot_delete_vs_guest_run", exits.count(uapi.KVM_EXIT_MMIO))
