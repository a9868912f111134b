"""Cancellation in live mode unwinds like a signal (issue 17).

A cancelled caller leaves an ioctl only where the kernel checks signal_pending() /
fatal_signal_pending() (-EINTR, partial progress kept where the uAPI says so), never inside an
invalidation window and never with a lock held; anywhere else the ioctl completes and the
cancellation is delivered when it returns. Every test runs on asyncio and on trio.

``anyio.fail_after`` appears only as a hang guard around work that finishes at once when the
model is right: a wedged VM spins forever, and the guard turns that into a failure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

import asyncvm
from asyncvm import uapi
from asyncvm.check import check_quiescent
from asyncvm.kvm.vcpu import GuestAccess
from asyncvm.runtime import live

PAGE = uapi.PAGE_SIZE
PAGES = 16
BACKENDS = ["asyncio", "trio"]
#: seconds a correct model never comes near (each guarded call is a few milliseconds of work)
HANG = 60
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


async def _vm(vm_type: int = uapi.KVM_X86_SW_PROTECTED_VM, vcpus: int = 1) -> tuple[Any, Any, list[Any]]:
    kvm = asyncvm.Kvm()
    vm = await kvm.create_vm(vm_type)
    if vm_type == uapi.KVM_X86_TDX_VM:
        await vm.tdx_init_vm()
    gmem = await vm.create_guest_memfd(size=PAGES * PAGE)
    hva = await kvm.mm.mmap(PAGES * PAGE)
    await vm.set_user_memory_region2(
        uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, PAGES * PAGE, hva, 0, gmem)
    )
    await vm.set_memory_attributes(uapi.MemoryAttributes(0, PAGES * PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    cpus = [await vm.create_vcpu(i) for i in range(vcpus)]
    if vm_type == uapi.KVM_X86_TDX_VM:
        for v in cpus:
            await v.tdx_init_vcpu()
    return vm, gmem, cpus


async def _prefault_all(vcpu: Any, gpa: int = 0, size: int = PAGES * PAGE) -> None:
    """KVM_PRE_FAULT_MEMORY over the range, re-issued after progress or EINTR (the selftest's loop)."""
    r = uapi.PreFaultMemory(gpa, size)
    with anyio.fail_after(HANG):
        while r.size:
            try:
                await vcpu.pre_fault_memory(r)
            except asyncvm.KvmError as e:
                if e.errno != uapi.EINTR:
                    raise


def _assert_coherent(vm: Any, cpus: list[Any]) -> None:
    check_quiescent(vm)
    assert vm.mmu_invalidate_in_progress == 0
    for v in cpus:
        assert not v.mutex.is_locked()


# -- the reported bug ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("after", [1, 3, 5, 7, 9, 11, 20])
def test_a_punch_hole_cancelled_by_a_sibling_does_not_wedge_the_vm(backend: str, after: int) -> None:
    """fallocate(KEEP_SIZE|PUNCH_HOLE, 0, 16 pages) cancelled by a sibling after `after` of its
    checkpoints; pre-faulting afterwards must finish (it spun forever on RET_PF_RETRY)."""

    async def main() -> None:
        vm, gmem, cpus = await _vm()
        await _prefault_all(cpus[0])
        punched = False

        async def punch() -> None:
            nonlocal punched
            await gmem.fallocate(PUNCH, 0, PAGES * PAGE)
            punched = True

        async def canceller(tg: anyio.abc.TaskGroup) -> None:
            for _ in range(after):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(punch)
            tg.start_soon(canceller, tg)
        # PUNCH_HOLE has no signal check: it either had not started or it ran to its end.
        assert not punched  # the cancellation reached the caller, after the call
        assert vm.mmu_invalidate_in_progress == 0
        await _prefault_all(cpus[0])
        _assert_coherent(vm, cpus)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_prefault_stops_at_a_signal_check_with_its_progress_recorded(backend: str) -> None:
    async def main() -> None:
        vm, _gmem, cpus = await _vm()
        r = uapi.PreFaultMemory(0, PAGES * PAGE)
        with anyio.CancelScope() as scope:
            scope.cancel()  # pending before the call: the first signal check sees it
            await cpus[0].pre_fault_memory(r)
        assert scope.cancelled_caught
        # -EINTR before the first page, as kvm_vcpu_pre_fault_memory() returns it: nothing done.
        assert (r.gpa, r.size) == (0, PAGES * PAGE)
        await _prefault_all(cpus[0], r.gpa, r.size)
        _assert_coherent(vm, cpus)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eintr_retry_loop_ends_with_the_cancellation(backend: str) -> None:
    """The selftest's loop retries on EINTR; a cancelled caller must still leave it."""

    async def main() -> None:
        vm, _gmem, cpus = await _vm()
        with anyio.fail_after(HANG), anyio.CancelScope() as scope:
            scope.cancel()
            r = uapi.PreFaultMemory(0, PAGES * PAGE)
            while r.size:
                try:
                    await cpus[0].pre_fault_memory(r)
                except asyncvm.KvmError as e:
                    if e.errno != uapi.EINTR:
                        raise
        assert scope.cancelled_caught
        _assert_coherent(vm, cpus)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eintr_retry_loop_ends_when_its_deadline_passes(backend: str) -> None:
    """A deadline that passes while the caller retries KVM_RUN on EINTR: the ioctl sees the signal
    at its first check, before any scheduling point, so only the return to user mode can let the
    event loop turn the passed deadline into a cancellation (it spun there for minutes)."""

    async def main() -> None:
        vm, _gmem, cpus = await _vm()
        cpus[0].load_program([])
        retries = 0
        with anyio.move_on_after(0.05) as scope:
            while retries < 100_000:
                try:
                    await cpus[0].run()
                except asyncvm.KvmError as e:
                    if e.errno != uapi.EINTR:
                        raise
                    retries += 1
        assert scope.cancelled_caught, f"still retrying after {retries} EINTRs"
        _assert_coherent(vm, cpus)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deadline_in_the_past_is_a_pending_signal(backend: str) -> None:
    async def main() -> None:
        _, _gmem, cpus = await _vm()
        r = uapi.PreFaultMemory(0, PAGES * PAGE)
        with anyio.move_on_after(-1) as scope:
            await cpus[0].pre_fault_memory(r)
        assert scope.cancelled_caught
        assert r.size == PAGES * PAGE

    anyio.run(main, backend=backend)


# -- every ioctl, cancelled at every checkpoint ---------------------------------------------------


@contextmanager
def _cancel_at(k: int, scope: anyio.CancelScope | None, counter: list[int]) -> Iterator[None]:
    """Count the live scheduling points and waits of the task that enters; cancel `scope` (as a
    sibling task would) when that task reaches its `k`-th one."""
    real_checkpoint, real_wait = live.checkpoint, live.wait
    owner = anyio.get_current_task().id

    def hit() -> None:
        if anyio.get_current_task().id != owner:
            return
        counter[0] += 1
        if scope is not None and counter[0] == k:
            scope.cancel()

    async def checkpoint() -> None:
        hit()
        await real_checkpoint()

    async def wait(obj: Any, arg: Any) -> None:
        hit()
        await real_wait(obj, arg)

    live.checkpoint, live.wait = checkpoint, wait  # type: ignore[assignment]
    try:
        yield
    finally:
        live.checkpoint, live.wait = real_checkpoint, real_wait  # type: ignore[assignment]


Setup = Callable[[], Awaitable[tuple[Any, list[Any], Callable[[], Awaitable[Any]]]]]


async def _sw_vm_prefaulted() -> tuple[Any, Any, list[Any]]:
    vm, gmem, cpus = await _vm()
    await _prefault_all(cpus[0])
    return vm, gmem, cpus


def _ioctls() -> dict[str, Setup]:
    """Each ioctl under test: a set-up that returns (vm, vcpus, the call to cancel)."""

    async def pre_fault() -> Any:
        vm, _gmem, cpus = await _vm()
        r = uapi.PreFaultMemory(0, PAGES * PAGE)

        async def call() -> Any:
            before = (r.gpa, r.size)
            try:
                await cpus[0].pre_fault_memory(r)
            finally:
                # Partial progress as the uAPI says: the struct advanced by whole pages done.
                assert r.gpa + r.size == before[0] + before[1] and r.gpa % PAGE == 0

        return vm, cpus, call

    async def punch_hole() -> Any:
        vm, gmem, cpus = await _sw_vm_prefaulted()
        return vm, cpus, lambda: gmem.fallocate(PUNCH, 0, PAGES * PAGE)

    async def allocate() -> Any:
        vm, gmem, cpus = await _vm()
        return vm, cpus, lambda: gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, PAGES * PAGE)

    async def to_shared() -> Any:
        vm, _gmem, cpus = await _sw_vm_prefaulted()
        return vm, cpus, lambda: vm.set_memory_attributes(uapi.MemoryAttributes(0, 8 * PAGE, 0))

    async def delete_memslot() -> Any:
        vm, _gmem, cpus = await _sw_vm_prefaulted()
        region = uapi.UserspaceMemoryRegion2(0, uapi.KVM_MEM_GUEST_MEMFD, 0, 0, 0, 0, None)
        return vm, cpus, lambda: vm.set_user_memory_region2(region)

    async def run() -> Any:
        vm, _gmem, cpus = await _vm()
        cpus[0].load_program([GuestAccess.write(0, b"hello"), GuestAccess.read(0, 5), GuestAccess.read(PAGE, 4)])
        return vm, cpus, cpus[0].run

    async def munmap() -> Any:
        kvm = asyncvm.Kvm()
        vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
        hva = await kvm.mm.mmap(PAGES * PAGE)
        await vm.set_user_memory_region2(uapi.UserspaceMemoryRegion2(0, 0, 0, PAGES * PAGE, hva))
        cpus = [await vm.create_vcpu(0)]
        await _prefault_all(cpus[0])
        return vm, cpus, lambda: kvm.mm.munmap(hva, 4 * PAGE)

    async def tdx_init_mem_region() -> Any:
        vm, _gmem, cpus = await _vm(uapi.KVM_X86_TDX_VM)
        src = await vm.kvm.mm.mmap(4 * PAGE)
        region = uapi.TdxInitMemRegion(src, 0, 4)
        return vm, cpus, lambda: cpus[0].tdx_init_mem_region(region, uapi.KVM_TDX_MEASURE_MEMORY_REGION)

    async def tdx_finalize_vm() -> Any:
        vm, _gmem, cpus = await _vm(uapi.KVM_X86_TDX_VM)
        src = await vm.kvm.mm.mmap(PAGE)
        await cpus[0].tdx_init_mem_region(uapi.TdxInitMemRegion(src, 0, 1), uapi.KVM_TDX_MEASURE_MEMORY_REGION)
        return vm, cpus, vm.tdx_finalize_vm

    async def snp_launch_update() -> Any:
        vm, _gmem, cpus = await _vm(uapi.KVM_X86_SNP_VM)
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
        src = await vm.kvm.mm.mmap(4 * PAGE)
        await vm.kvm.mm.write(src, b"\x5a" * (4 * PAGE))
        update = uapi.SevSnpLaunchUpdate(0, src, 4 * PAGE, uapi.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        return vm, cpus, lambda: vm.snp_launch_update(update)

    async def snp_launch_finish() -> Any:
        vm, _gmem, cpus = await _vm(uapi.KVM_X86_SNP_VM)
        await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=1 << 17))
        return vm, cpus, vm.snp_launch_finish

    return {
        "snp_launch_update": snp_launch_update,
        "snp_launch_finish": snp_launch_finish,
        "pre_fault_memory": pre_fault,
        "fallocate_punch_hole": punch_hole,
        "fallocate_allocate": allocate,
        "set_memory_attributes": to_shared,
        "set_user_memory_region2_delete": delete_memslot,
        "run": run,
        "munmap": munmap,
        "tdx_init_mem_region": tdx_init_mem_region,
        "tdx_finalize_vm": tdx_finalize_vm,
    }


IOCTLS = _ioctls()


async def _checkpoints(setup: Setup) -> int:
    """How many live scheduling points and waits the ioctl passes when nothing cancels it."""
    _, _cpus, call = await setup()
    counter = [0]
    with _cancel_at(0, None, counter):
        await call()
    return counter[0]


async def _still_usable(vm: Any, cpus: list[Any]) -> None:
    """Oracles clean at quiescence, nothing left locked, and the VM still serves a pre-fault."""
    _assert_coherent(vm, cpus)
    slot = vm.gfn_to_memslot(0)
    if slot is not None and not vm.dead:
        r = uapi.PreFaultMemory(0, PAGE)
        with anyio.fail_after(HANG):
            while r.size:
                try:
                    await cpus[0].pre_fault_memory(r)
                except asyncvm.KvmError as e:
                    # Private memory that is shared now, or a TD before FINALIZE: the kernel's answers.
                    if e.errno in (uapi.EINVAL, uapi.EFAULT, uapi.EOPNOTSUPP, uapi.ENOENT):
                        break
                    if e.errno != uapi.EINTR:
                        raise
        _assert_coherent(vm, cpus)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ioctl", sorted(IOCTLS))
def test_every_ioctl_cancelled_at_every_checkpoint_leaves_a_coherent_vm(backend: str, ioctl: str) -> None:
    setup = IOCTLS[ioctl]

    async def main() -> tuple[int, int, int]:
        total = await _checkpoints(setup)
        assert total >= 1
        cancelled = completed = 0
        for k in range(1, total + 1):
            vm, cpus, call = await setup()
            outcome: list[str] = []
            with anyio.CancelScope() as scope:
                with _cancel_at(k, scope, [0]):
                    try:
                        await call()
                        outcome.append("completed")
                    except asyncvm.KvmError as e:
                        outcome.append(f"errno {e.errno}")
            # The cancellation always reaches the caller, and never as a -EINTR it has to retry.
            assert scope.cancelled_caught, (k, outcome)
            assert not outcome, (k, outcome)  # the call ended with the cancellation, not its result
            completed += not outcome
            cancelled += 1
            await _still_usable(vm, cpus)
        return total, cancelled, completed

    total, cancelled, _completed = anyio.run(main, backend=backend)
    assert cancelled == total


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefault_spinning_on_an_open_invalidation_leaves_at_its_signal_check(backend: str) -> None:
    """RET_PF_RETRY while an invalidation is in progress: the spinner waits for a write, and a
    cancellation ends that wait so the loop's signal_pending() check sees it (-EINTR)."""
    from asyncvm.kvm.invalidate import kvm_mmu_invalidate_begin, kvm_mmu_invalidate_end, kvm_mmu_invalidate_range_add

    async def end_invalidation(vm: Any) -> None:
        await vm.mmu_lock.write_lock()
        kvm_mmu_invalidate_end(vm)
        await vm.mmu_lock.write_unlock()

    async def main() -> None:
        vm, _gmem, cpus = await _vm()
        await vm.mmu_lock.write_lock()
        kvm_mmu_invalidate_begin(vm)
        kvm_mmu_invalidate_range_add(vm, 0, PAGES)
        await vm.mmu_lock.write_unlock()
        r = uapi.PreFaultMemory(0, PAGES * PAGE)
        scope = anyio.CancelScope()
        outcome: list[str] = []

        async def prefault() -> None:
            with scope:
                await cpus[0].pre_fault_memory(r)
                outcome.append("returned")
            if scope.cancelled_caught:
                outcome.append("cancelled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(prefault)
            for _ in range(50):  # it reaches the retry loop and waits there for a write
                await anyio.lowlevel.checkpoint()
            assert not outcome and vm.mmu_invalidate_in_progress == 1
            scope.cancel()
            for _ in range(200):
                if outcome:
                    break
                await anyio.lowlevel.checkpoint()
            stuck = not outcome
            if stuck:
                await end_invalidation(vm)  # release the spinner so the test can end, then fail
        assert not stuck, "the cancelled spinner kept waiting for the invalidation to end"
        assert outcome == ["cancelled"]
        assert (r.gpa, r.size) == (0, PAGES * PAGE)  # -EINTR before the first page was mapped
        assert not cpus[0].mutex.is_locked()
        await end_invalidation(vm)
        await _prefault_all(cpus[0])
        _assert_coherent(vm, cpus)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_that_dies_holding_a_lock_does_not_hang_its_waiters(backend: str) -> None:
    """An oracle's failure (or a model bug) raised with a lock held ends that system call with
    the lock never released; a sibling waiting for the lock must still be cancellable, so the
    task group ends with the failure instead of hanging in a shielded wait."""
    from asyncvm.runtime import traps
    from asyncvm.runtime.failures import Violation
    from asyncvm.runtime.sync import Mutex

    async def main() -> None:
        m = Mutex("m")

        @traps.syscall
        async def broken() -> None:
            await m.lock()
            for _ in range(10):  # the waiter is blocked on m by now
                await traps.point(m)
            raise Violation("model_bug", "failed with m held")

        async def waiter() -> None:
            await anyio.lowlevel.checkpoint()
            await m.lock()

        ended: list[BaseException] = []

        async def group() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(broken)
                    tg.start_soon(waiter)
            except BaseException as e:  # noqa: BLE001 - the group's failure is the result
                ended.append(e)

        async with anyio.create_task_group() as outer:
            outer.start_soon(group)
            for _ in range(200):
                if ended:
                    break
                await anyio.lowlevel.checkpoint()
            stuck = not ended
            if stuck:  # let the waiter through so the test can end, then fail
                m.owner = None
                traps.notify(m)
        assert not stuck, "the waiter hung on a lock its dead holder never releases"
        (failure,) = ended
        assert isinstance(failure, BaseExceptionGroup)
        assert [type(e) for e in failure.exceptions] == [Violation]

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_inside_a_nested_call_is_not_a_dead_lock_holder(backend: str) -> None:
    """Only the outermost system call returns to user mode: an inner one failing while the outer
    holds a lock (and handles the error) leaves the task alive and its waits shielded."""
    from asyncvm.runtime import traps
    from asyncvm.runtime.sync import Mutex

    async def main() -> None:
        m = Mutex("m")

        @traps.syscall
        async def inner() -> None:
            raise asyncvm.KvmError(uapi.EINVAL, "inner")

        @traps.syscall
        async def outer() -> None:
            await m.lock()
            try:
                await inner()
            except asyncvm.KvmError:
                pass
            finally:
                await m.unlock()

        await outer()
        assert not live.current().dead
        assert not m.is_locked()

    anyio.run(main, backend=backend)
