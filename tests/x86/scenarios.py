"""Race scenarios for the x86 pre-fault and fault paths: each is a small VM, a few tasks, and
assertions about what the ABI lets each ioctl return. The model's own oracles (stale installs,
mapped freed pfns, attribute agreement, lifetimes, lockdep) judge the memory state."""

from __future__ import annotations

from asyncvm import KvmError, TaskGroup, uapi
from asyncvm.kvm.kvm import Kvm
from asyncvm.kvm.vcpu import GuestAccess, Vcpu
from asyncvm.runtime import Completion

from .helpers import PAGE, add_slot, delete_slot, mapped_gfns, pre_fault, pre_fault_retrying, set_private

BASE = 1 << 30  # guest physical base of the test slot
NPAGES = 8
SLOT = 1
#: the part of the slot that punch-hole / munmap / MADV_DONTNEED take away
HOLE_START, HOLE_LEN = 0, 4 * PAGE


async def prefault_overlapping(kvm: Kvm, vm_type: int = uapi.KVM_X86_DEFAULT_VM, private: bool = False) -> None:
    """Three vCPUs pre-fault overlapping ranges of one slot (api.rst: "several vCPUs may call it in
    parallel"); every call must end with nothing left, and every page must end up mapped. Shared
    memory is left untouched by the VMM, so the vCPUs' GUPs also race to fault the host pages in."""
    vm = await kvm.create_vm(vm_type)
    await add_slot(vm, SLOT, BASE, NPAGES * PAGE, private=private)
    if private:
        await set_private(vm, BASE, NPAGES * PAGE)
    vcpus = [await vm.create_vcpu(i) for i in range(3)]
    ranges = [(0, 6), (2, 8), (1, 7)]

    async def worker(vcpu: Vcpu, first: int, last: int) -> None:
        r, err = await pre_fault_retrying(vcpu, BASE + first * PAGE, (last - first) * PAGE)
        assert err == 0 and r.size == 0, f"{vcpu.name}: errno {err}, {r.size} bytes left"

    async with TaskGroup() as tg:
        for vcpu, (first, last) in zip(vcpus, ranges, strict=True):
            tg.spawn(worker, vcpu, first, last, name=vcpu.name)
    gfn0 = BASE // PAGE
    for vcpu, (first, last) in zip(vcpus, ranges, strict=True):
        want = set(range(gfn0 + first, gfn0 + last))
        assert want <= mapped_gfns(vcpu, gfn0, gfn0 + NPAGES, private), f"{vcpu.name} sees unmapped pages"


async def prefault_vs_punch_hole(kvm: Kvm) -> None:
    """A vCPU pre-faults a private guest_memfd slot while userspace punches a hole in the middle
    (kvm-core.md 1.8: the pre-fault retries and re-allocates; it never maps a truncated folio)."""
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    vcpu = await vm.create_vcpu(0)
    _hva, gmem = await add_slot(vm, SLOT, BASE, NPAGES * PAGE, private=True)
    assert gmem is not None
    await set_private(vm, BASE, NPAGES * PAGE)

    async def prefault() -> None:
        r, err = await pre_fault_retrying(vcpu, BASE, NPAGES * PAGE)
        assert err == 0 and r.size == 0, f"errno {err}, {r.size} bytes left"

    async def punch() -> None:
        await gmem.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, HOLE_START, HOLE_LEN)

    async with TaskGroup() as tg:
        tg.spawn(prefault, name="vcpu0")
        tg.spawn(punch, name="punch_hole")


async def prefault_vs_host_unmap(kvm: Kvm, op: str = "madvise") -> None:
    """A vCPU pre-faults a shared slot while userspace drops part of its backing with
    MADV_DONTNEED or munmap (the MMU notifier path). After munmap the hole has no host page, so
    the pre-fault of those pages may fail with EFAULT (GUP error -> kvm_handle_error_pfn()); the
    caller skips such a page, as a VMM that unmapped it would."""
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    vcpu = await vm.create_vcpu(0)
    hva, _ = await add_slot(vm, SLOT, BASE, NPAGES * PAGE)
    hole = range(BASE + HOLE_START, BASE + HOLE_START + HOLE_LEN)

    async def prefault() -> None:
        r = uapi.PreFaultMemory(BASE, NPAGES * PAGE)
        while r.size:
            prev = r.size
            err = await pre_fault(vcpu, r)
            assert (r.size < prev) ^ (err != 0), f"progress {prev - r.size} bytes with errno {err}"
            if err == uapi.EFAULT and op == "munmap" and r.gpa in hole:
                r.gpa += PAGE
                r.size -= PAGE
                continue
            assert err in (0, uapi.EINTR), f"errno {err} at gpa {r.gpa:#x}"

    async def unmap() -> None:
        if op == "munmap":
            await kvm.mm.munmap(hva + HOLE_START, HOLE_LEN)
        else:
            await kvm.mm.madvise(hva + HOLE_START, HOLE_LEN, uapi.MADV_DONTNEED)

    async with TaskGroup() as tg:
        tg.spawn(prefault, name="vcpu0")
        tg.spawn(unmap, name="mmu_notifier")


async def run_vs_attribute_flip(kvm: Kvm) -> None:
    """The guest reads every page of a SW-protected slot (private or shared per the current
    attribute) while userspace converts the middle pages to shared and back to private. A fault
    that loses the race exits with KVM_EXIT_MEMORY_FAULT/EFAULT and the VMM re-enters."""
    vm = await kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    vcpu = await vm.create_vcpu(0)
    await add_slot(vm, SLOT, BASE, NPAGES * PAGE, private=True)
    await set_private(vm, BASE, NPAGES * PAGE)
    program = [GuestAccess.read(BASE + i * PAGE) for i in range(NPAGES)]

    async def guest() -> None:
        vcpu.load_program(program)
        while True:
            try:
                await vcpu.run()
            except KvmError as e:
                if e.errno == uapi.EINTR:
                    continue
                assert e.errno == uapi.EFAULT, f"KVM_RUN errno {e.errno}"
                assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
                continue
            assert vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_HLT
            return

    async def flip() -> None:
        await set_private(vm, BASE + 2 * PAGE, 4 * PAGE, private=False)
        await set_private(vm, BASE + 2 * PAGE, 4 * PAGE, private=True)

    async with TaskGroup() as tg:
        tg.spawn(guest, name="vcpu0")
        tg.spawn(flip, name="set_memory_attributes")
    assert len(vcpu.guest_reads) == NPAGES


async def prefault_vs_memslot_delete(kvm: Kvm, vm_type: int = uapi.KVM_X86_DEFAULT_VM, private: bool = False) -> None:
    """The selftest's worker, small: a task deletes the slot while the vCPU pre-faults, then
    re-creates it when asked. The pre-fault may see -EAGAIN (INVALID slot, [~6.18]) or, once the
    slot is gone, -ENOENT (shared gfn: RET_PF_EMULATE) or -EFAULT (PRIVATE gfn: the attribute
    outlives the slot and mmu.c: kvm_handle_noslot_fault() refuses private no-slot faults); after
    the re-creation a retry must finish the range."""
    vm = await kvm.create_vm(vm_type)
    vcpu = await vm.create_vcpu(0)
    size = NPAGES * PAGE
    hva, _ = await add_slot(vm, SLOT, BASE, size, private=private)
    if private:
        await set_private(vm, BASE, size)
    recreate = Completion("recreate_slot")
    recreated = Completion("slot_recreated")

    async def deleter() -> None:
        await delete_slot(vm, SLOT)
        await recreate.wait()
        await add_slot(vm, SLOT, BASE, size, private=private, hva=hva)
        await recreated.complete_all()

    #: where pre-faulting resumed once the slot was back: from there on nothing can zap it
    resumed_at: list[int] = []

    async def prefault() -> None:
        r = uapi.PreFaultMemory(BASE, size)
        asked = False
        while True:
            prev = r.size
            err = await pre_fault(vcpu, r)
            assert (r.size < prev) ^ (err != 0), f"progress {prev - r.size} bytes with errno {err}"
            if err == uapi.EINTR:
                continue
            if not asked:
                tolerated = (0, uapi.EAGAIN, uapi.EFAULT if private else uapi.ENOENT)
                assert err in tolerated, f"errno {err} around the slot deletion"
                asked = True
                await recreate.complete()
                await recreated.wait_shared()
                if r.size:
                    resumed_at.append(r.gpa)
                    continue
            if err or not r.size:
                break
        assert err == 0 and r.size == 0, f"errno {err} with {r.size} bytes left after the slot came back"

    async with TaskGroup() as tg:
        tg.spawn(prefault, name="vcpu0")
        tg.spawn(deleter, name="delete_slot")
    if resumed_at:
        first, end = resumed_at[0] // PAGE, (BASE + size) // PAGE
        missing = set(range(first, end)) - mapped_gfns(vcpu, first, end, private)
        assert not missing, f"pages pre-faulted after the re-creation are not mapped: {sorted(missing)}"
