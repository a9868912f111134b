"""A VM (``struct kvm``): its locks, memslots, attributes, invalidation state and VM ioctls."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..intervals import IntervalMap
from ..runtime import hb, traps
from ..runtime.sync import SRCU, Mutex, RWLock, SpinLock, WaitQueue, Word
from ..uapi import PAGE_SHIFT, KvmError
from . import attributes as attrs_mod
from .guest_memfd import GuestMemfd, kvm_gmem_bind, kvm_gmem_create, kvm_gmem_get_supported_flags, kvm_gmem_unbind
from .invalidate import INVALID_GPA, KvmMmuNotifier
from .memslots import Memslot, Memslots
from .trace import trace_kvm_create_vm, trace_kvm_memslot_freed, trace_kvm_vm_bugged

if TYPE_CHECKING:
    from .kvm import Kvm
    from .vcpu import Vcpu

#: arch/x86/include/asm/processor.h: TASK_SIZE_MAX for 4-level paging, the access_ok() bound
TASK_SIZE_MAX = (1 << 47) - uapi.PAGE_SIZE
KVM_MAX_VCPU_IDS = 4096

#: Documentation/virt/kvm/locking.rst + kvm-core.md section 6: the order lockdep starts from.
LOCK_ORDER = [
    ("kvm->lock", "vcpu->mutex"),
    ("kvm->lock", "kvm->slots_lock"),
    ("vcpu->mutex", "kvm->slots_lock"),
    ("kvm->slots_lock", "kvm->slots_arch_lock"),
    ("kvm->slots_lock", "mapping->invalidate_lock"),
    ("mapping->invalidate_lock", "kvm->mmu_lock"),
    ("mm->mmap_lock", "kvm->mmu_lock"),
    ("folio_lock", "kvm->mmu_lock"),
    ("kvm->mmu_lock", "tdp_mmu_pages_lock"),
]

CHANGE_CREATE, CHANGE_DELETE, CHANGE_MOVE, CHANGE_FLAGS_ONLY = "create", "delete", "move", "flags_only"


class Vm:
    """``struct kvm``: created by ``kvm.create_vm(type)``."""

    def __init__(self, kvm: Kvm, vm_type: int, vm_id: int) -> None:
        self.kvm = kvm
        self.id = vm_id
        self.name = f"vm{vm_id}"
        self.type = vm_type
        self.profile = kvm.profile
        self.bugs = kvm.bugs
        self.lock = Mutex("kvm->lock")
        self.slots_lock = Mutex("kvm->slots_lock")
        self.slots_arch_lock = Mutex("kvm->slots_arch_lock")
        self.srcu = SRCU("kvm->srcu")
        self.mmu_lock = RWLock("kvm->mmu_lock")
        self.mn_invalidate_lock = SpinLock("kvm->mn_invalidate_lock")
        self.mn_memslots_update_rcuwait = WaitQueue("kvm->mn_memslots_update_rcuwait")
        self.mn_active_invalidate_count = 0
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        #: what a faulting vCPU re-reads when it retries (invalidation state, memslots,
        #: attributes, SPTEs, requests): every write of it bumps this, so a retry loop waits
        #: for a write instead of re-checking unchanged state (runtime/sync.py: Word)
        self.mmu_word = Word(f"vm{vm_id} mmu state")
        self.memslots: list[Memslots] = [Memslots(as_id, 0, {}) for as_id in range(uapi.KVM_MAX_NR_ADDRESS_SPACES)]
        self.generation = 0
        self.attributes: IntervalMap[int] = IntervalMap()
        self.vcpus: dict[int, Vcpu] = {}
        self.created_vcpus = 0
        self.online_vcpus = 0
        #: kvm_vm_bugged()/kvm_vm_dead(): every ioctl then fails with -EIO
        self.dead = False
        self.bug_reason: str | None = None
        self._fds = 0
        #: the last KVM_MEMORY_ENCRYPT_OP command struct, as copied back to userspace
        self._mem_enc_cmd: uapi.TdxCmd | uapi.SevCmd | None = None
        #: the arch slots (kvm_arch_*), and the arch's own state (``kvm->arch``)
        self.ops = kvm.ops
        self.arch: Any = self.ops.init_vm(self)
        self.mmu_notifier = KvmMmuNotifier(self)
        kvm.mm.register_notifier(self.mmu_notifier)
        exe = traps.active()
        if exe is not None and exe.lockdep is not None:
            for before, after in LOCK_ORDER:
                exe.lockdep.declare(before, after, "Documentation/virt/kvm/locking.rst")
        trace_kvm_create_vm(self)

    def __repr__(self) -> str:
        return f"<Vm {self.id} type={uapi.vm_type_name(self.type)}>"

    def next_fd(self) -> int:
        self._fds += 1
        return self._fds

    # -- state helpers --------------------------------------------------------------------
    def kvm_bug(self, reason: str) -> None:
        """KVM_BUG_ON(): mark the VM bugged and dead; ioctls return -EIO from now on."""
        if not self.dead:
            self.dead = True
            self.bug_reason = reason
            self.mmu_word.write()
            traps.emit("kvm_bug", self, reason=reason)
            trace_kvm_vm_bugged(self, reason)

    def check_alive(self) -> None:
        if self.dead:
            raise KvmError(uapi.EIO, f"VM is dead ({self.bug_reason or 'killed'})")

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """gfn_to_memslot()"""
        return self.memslots[as_id].lookup(gfn)

    def hva_range_slots(self, start: int, end: int) -> list[tuple[Memslot, int, int]]:
        out = []
        for memslots in self.memslots:
            out.extend(memslots.hva_overlapping(start, end))
        return out

    def nr_memslot_as_ids(self) -> int:
        """arch/x86/include/asm/kvm_host.h: kvm_arch_nr_memslot_as_ids() (6.8+): no SMM address
        space for VMs with private memory."""
        return 1 if self.ops.has_private_mem(self) else uapi.KVM_MAX_NR_ADDRESS_SPACES

    def range_has_attributes(self, start: int, end: int, attrs: int) -> bool:
        return attrs_mod.kvm_range_has_memory_attributes(self, start, end, ~0, attrs)

    def mem_is_private(self, gfn: int) -> bool:
        return attrs_mod.kvm_mem_is_private(self, gfn)

    # -- VM ioctls ------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (the capabilities the model implements)."""
        cap = uapi.check_int(cap, "cap", "vm.check_extension")
        if cap == uapi.KVM_CAP_MEMORY_ATTRIBUTES:
            return attrs_mod.kvm_supported_mem_attributes(self)
        if cap == uapi.KVM_CAP_GUEST_MEMFD:
            # [>=6.18] 1 for every VM type; before, only where there is private memory
            return int(self.profile.gmem_all_vm_types or self.ops.has_private_mem(self))
        if cap == uapi.KVM_CAP_GUEST_MEMFD_FLAGS:
            return kvm_gmem_get_supported_flags(self, self.profile.gmem_supported_flags)
        if cap == uapi.KVM_CAP_USER_MEMORY2:
            return 1
        if cap == uapi.KVM_CAP_NR_MEMSLOTS:
            return uapi.KVM_USER_MEM_SLOTS
        if cap == uapi.KVM_CAP_MULTI_ADDRESS_SPACE:
            return uapi.KVM_MAX_NR_ADDRESS_SPACES
        if cap == uapi.KVM_CAP_MAX_VCPUS:
            return uapi.KVM_MAX_VCPUS
        return self.ops.check_extension(self, cap)

    @traps.syscall
    async def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: virt/kvm/kvm_main.c: kvm_vm_ioctl_create_vcpu() (6.8+)."""
        from .vcpu import Vcpu

        vcpu_id = uapi.check_int(vcpu_id, "vcpu_id", "vm.create_vcpu")
        self.check_alive()
        if vcpu_id < 0 or vcpu_id >= KVM_MAX_VCPU_IDS:
            raise KvmError(uapi.EINVAL, f"vcpu id {vcpu_id} out of range")
        await self.lock.lock()
        try:
            if self.created_vcpus >= uapi.KVM_MAX_VCPUS:
                raise KvmError(uapi.EINVAL, "too many vCPUs")
            r = self.ops.vcpu_precreate(self)
            if r:
                raise KvmError(-r, "the VM does not accept vCPUs in its current state")
            self.created_vcpus += 1
        finally:
            await self.lock.unlock()
        vcpu = Vcpu(self, vcpu_id)
        await self.lock.lock()
        try:
            if vcpu_id in self.vcpus:
                self.created_vcpus -= 1
                raise KvmError(uapi.EEXIST, f"vcpu {vcpu_id} exists")
            self.vcpus[vcpu_id] = vcpu
            self.online_vcpus += 1
        finally:
            await self.lock.unlock()
        return vcpu

    @traps.syscall
    async def create_guest_memfd(
        self, args: uapi.CreateGuestMemfd | None = None, *, size: int | None = None, flags: int = 0
    ) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: returns the guest_memfd file (what the fd refers to)."""
        if args is None:
            if size is None:
                raise TypeError("vm.create_guest_memfd() needs a uapi.CreateGuestMemfd or size=")
            args = uapi.CreateGuestMemfd(size, flags)
        else:
            uapi.check_struct(args, uapi.CreateGuestMemfd, "vm.create_guest_memfd")
        self.check_alive()
        file = kvm_gmem_create(self, args)
        await traps.point(self)
        return file

    @traps.syscall
    async def set_memory_attributes(self, attrs: uapi.MemoryAttributes) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES"""
        uapi.check_struct(attrs, uapi.MemoryAttributes, "vm.set_memory_attributes")
        self.check_alive()
        await attrs_mod.kvm_vm_ioctl_set_mem_attributes(self, attrs)

    @traps.syscall
    async def set_user_memory_region(self, region: uapi.UserspaceMemoryRegion) -> None:
        """KVM_SET_USER_MEMORY_REGION (v1: only LOG_DIRTY_PAGES and READONLY flags)."""
        uapi.check_struct(region, uapi.UserspaceMemoryRegion, "vm.set_user_memory_region")
        self.check_alive()
        if region.flags & ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
            raise KvmError(uapi.EINVAL, "v1 memory region flags")
        await self.set_user_memory_region2(region.as_region2())

    @traps.syscall
    async def set_user_memory_region2(self, region: uapi.UserspaceMemoryRegion2) -> None:
        """KVM_SET_USER_MEMORY_REGION2: virt/kvm/kvm_main.c: kvm_set_memory_region() (6.8+).

        The struct is input only (_IOW): KVM checks its own copy, whose fields are __u32/__u64, so
        out-of-range Python ints are taken modulo 2**32 / 2**64 as the C struct would hold them.
        """
        uapi.check_struct(region, uapi.UserspaceMemoryRegion2, "vm.set_user_memory_region2")
        self.check_alive()
        mem = dataclasses.replace(
            region,
            slot=uapi.u32(region.slot),
            flags=uapi.u32(region.flags),
            guest_phys_addr=uapi.u64(region.guest_phys_addr),
            memory_size=uapi.u64(region.memory_size),
            userspace_addr=uapi.u64(region.userspace_addr),
            guest_memfd_offset=uapi.u64(region.guest_memfd_offset),
        )
        await self.slots_lock.lock()
        try:
            await self._set_memory_region(mem)
        finally:
            await self.slots_lock.unlock()

    def _check_memory_region_flags(self, mem: uapi.UserspaceMemoryRegion2) -> None:
        """virt/kvm/kvm_main.c: check_memory_region_flags()"""
        valid = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
        # [>=6.18] IS_ENABLED(CONFIG_KVM_GUEST_MEMFD); before, kvm_arch_has_private_mem()
        if self.profile.gmem_all_vm_types or self.ops.has_private_mem(self):
            valid |= uapi.KVM_MEM_GUEST_MEMFD
        if mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
            valid &= ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY)
        if mem.flags & ~valid:
            raise KvmError(uapi.EINVAL, f"memory region flags {mem.flags:#x} not valid for this VM")

    async def _set_memory_region(self, mem: uapi.UserspaceMemoryRegion2) -> None:
        self._check_memory_region_flags(mem)
        as_id, slot_id = mem.slot >> 16, mem.slot & 0xFFFF
        size = mem.memory_size
        if size % uapi.PAGE_SIZE or mem.guest_phys_addr % uapi.PAGE_SIZE:
            raise KvmError(uapi.EINVAL, "memory_size and guest_phys_addr must be page aligned")
        # access_ok(userspace_addr, memory_size) holds for a delete (size 0) too: the sanity checks
        # come before the delete branch.
        if mem.userspace_addr % uapi.PAGE_SIZE or mem.userspace_addr + size > TASK_SIZE_MAX:
            raise KvmError(uapi.EINVAL, "userspace_addr must be page aligned and a user address")
        if mem.flags & uapi.KVM_MEM_GUEST_MEMFD and (
            mem.guest_memfd_offset % uapi.PAGE_SIZE or mem.guest_memfd_offset + size > uapi.U64_MAX
        ):
            raise KvmError(uapi.EINVAL, "guest_memfd_offset must be page aligned and not wrap")
        if as_id >= self.nr_memslot_as_ids() or slot_id >= uapi.KVM_USER_MEM_SLOTS:
            raise KvmError(uapi.EINVAL, f"slot {mem.slot:#x} out of range")
        if mem.guest_phys_addr + size > uapi.U64_MAX or size >> PAGE_SHIFT > uapi.KVM_MEM_MAX_NR_PAGES:
            raise KvmError(uapi.EINVAL, "region wraps or is too large")
        slots = self.memslots[as_id]
        old = slots.by_id.get(slot_id)
        if size == 0:
            if old is None or not old.npages:
                raise KvmError(uapi.EINVAL, f"slot {slot_id} does not exist")
            await self._set_memslot(old, None, CHANGE_DELETE)
            return
        base_gfn = mem.guest_phys_addr >> PAGE_SHIFT
        npages = size >> PAGE_SHIFT
        if old is None:
            change = CHANGE_CREATE
        else:
            if mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
                raise KvmError(uapi.EINVAL, "guest_memfd memslots are immutable; delete and re-create")
            # 9935df5333aa (6.19-rc, stable 6.18.y): clearing GUEST_MEMFD is a change too; allowing
            # it left the file's bindings pointing at the freed old memslot.
            if (
                mem.userspace_addr != old.userspace_addr
                or npages != old.npages
                or (mem.flags ^ old.flags) & (uapi.KVM_MEM_READONLY | uapi.KVM_MEM_GUEST_MEMFD)
            ):
                raise KvmError(uapi.EINVAL, "only the base address or dirty-logging flag of a slot can change")
            if base_gfn != old.base_gfn:
                change = CHANGE_MOVE
            elif mem.flags != old.flags:
                change = CHANGE_FLAGS_ONLY
            else:
                return
        if change in (CHANGE_CREATE, CHANGE_MOVE):
            for other in slots.overlapping(base_gfn, base_gfn + npages):
                if other.id != slot_id:
                    raise KvmError(uapi.EEXIST, f"gfn range overlaps slot {other.id}")
        new = Memslot(slot_id, as_id, base_gfn, npages, mem.userspace_addr, mem.flags)
        if change == CHANGE_CREATE and mem.flags & uapi.KVM_MEM_GUEST_MEMFD:
            await kvm_gmem_bind(self, new, mem.guest_memfd, uapi.s64(mem.guest_memfd_offset))
        elif old is not None and change != CHANGE_CREATE:
            new.gmem_file, new.gmem_pgoff = old.gmem_file, old.gmem_pgoff
        try:
            await self._set_memslot(old, new, change)
        except BaseException:
            if change == CHANGE_CREATE and new.gmem_file is not None:
                await kvm_gmem_unbind(new)
            raise

    async def _swap_active_memslots(self, as_id: int, new: Memslots) -> None:
        """virt/kvm/kvm_main.c: kvm_swap_active_memslots(): wait out notifiers, publish, synchronize_srcu."""
        await self.mn_invalidate_lock.lock()
        while self.mn_active_invalidate_count:
            await self.mn_invalidate_lock.unlock()
            await self.mn_memslots_update_rcuwait.wait_event(lambda: self.mn_active_invalidate_count == 0)
            await self.mn_invalidate_lock.lock()
        self.generation += 2
        new.generation = self.generation
        if hb.ACTIVE:
            hb.access(hb.STORE_RELEASE, "memslots", self, as_id)  # rcu_assign_pointer()
        self.memslots[as_id] = new
        self.mmu_word.write()
        traps.emit("memslots_publish", self, as_id=as_id, generation=self.generation)
        await self.mn_invalidate_lock.unlock()
        await self.slots_arch_lock.unlock()
        await self.srcu.synchronize()
        await self.slots_arch_lock.lock()

    async def _set_memslot(self, old: Memslot | None, new: Memslot | None, change: str) -> None:
        """virt/kvm/kvm_main.c: kvm_set_memslot() (6.8+)."""
        await self.slots_arch_lock.lock()
        try:
            as_id = (old or new).as_id  # type: ignore[union-attr]
            invalid = None
            if change in (CHANGE_DELETE, CHANGE_MOVE):
                assert old is not None
                # kvm_invalidate_memslot(): publish an INVALID copy, wait for readers, zap.
                invalid = old.invalid_copy()
                await self._swap_active_memslots(as_id, self.memslots[as_id].with_slot(invalid, 0, replaces=old))
                await self.ops.flush_shadow_memslot(self, old)
            if change == CHANGE_CREATE:
                assert new is not None
                await self._swap_active_memslots(as_id, self.memslots[as_id].with_slot(new, 0))
            elif change == CHANGE_DELETE:
                assert invalid is not None
                await self._swap_active_memslots(as_id, self.memslots[as_id].without(invalid, 0))
            elif change == CHANGE_MOVE:
                assert new is not None and invalid is not None
                await self._swap_active_memslots(as_id, self.memslots[as_id].with_slot(new, 0, replaces=invalid))
            else:
                assert new is not None and old is not None
                await self._swap_active_memslots(as_id, self.memslots[as_id].with_slot(new, 0, replaces=old))
        finally:
            await self.slots_arch_lock.unlock()
        # kvm_commit_memory_region(): free what no reader can see any more.
        if change == CHANGE_DELETE:
            assert old is not None
            await kvm_gmem_unbind(old)
            old.freed = True
            if invalid is not None:
                invalid.freed = True
            traps.emit("memslot_free", self, slot=old.id)
            trace_kvm_memslot_freed(self, old)
        elif change == CHANGE_MOVE:
            assert old is not None
            old.freed = True
            if invalid is not None:
                invalid.freed = True
            trace_kvm_memslot_freed(self, old)
        elif change == CHANGE_FLAGS_ONLY:
            assert old is not None
            old.freed = True

    # -- KVM_MEMORY_ENCRYPT_OP: vendor sub-commands ------------------------------------------
    async def _mem_enc_op(self, cmd: uapi.TdxCmd | uapi.SevCmd, payload: Any) -> None:
        """KVM_MEMORY_ENCRYPT_OP: kvm_arch_vm_ioctl() hands the command to the vendor, which
        copies the struct (hw_error / error) back to userspace whatever the outcome."""
        self.check_alive()
        try:
            await self.ops.vm_mem_enc_ioctl(self, cmd, payload)
        finally:
            self._mem_enc_cmd = cmd

    @traps.syscall
    async def tdx_init_vm(self, params: uapi.TdxInitVm | None = None, *, flags: int = 0) -> None:
        """KVM_TDX_INIT_VM"""
        if params is not None:
            uapi.check_struct(params, uapi.TdxInitVm, "vm.tdx_init_vm")
        await self._mem_enc_op(uapi.TdxCmd(uapi.KVM_TDX_INIT_VM, flags), params)

    @traps.syscall
    async def tdx_finalize_vm(self, *, flags: int = 0) -> None:
        """KVM_TDX_FINALIZE_VM"""
        await self._mem_enc_op(uapi.TdxCmd(uapi.KVM_TDX_FINALIZE_VM, flags), None)

    @property
    def tdx_hw_error(self) -> int:
        """kvm_tdx_cmd.hw_error of the last TDX command: the raw SEAMCALL status."""
        cmd = self._mem_enc_cmd
        return cmd.hw_error if isinstance(cmd, uapi.TdxCmd) else 0

    @traps.syscall
    async def snp_launch_start(self, params: uapi.SevSnpLaunchStart) -> None:
        """KVM_SEV_SNP_LAUNCH_START"""
        uapi.check_struct(params, uapi.SevSnpLaunchStart, "vm.snp_launch_start")
        await self._mem_enc_op(uapi.SevCmd(uapi.KVM_SEV_SNP_LAUNCH_START), params)

    @traps.syscall
    async def snp_launch_update(self, params: uapi.SevSnpLaunchUpdate) -> None:
        """KVM_SEV_SNP_LAUNCH_UPDATE: gfn_start/uaddr/len advance only on success."""
        uapi.check_struct(params, uapi.SevSnpLaunchUpdate, "vm.snp_launch_update")
        await self._mem_enc_op(uapi.SevCmd(uapi.KVM_SEV_SNP_LAUNCH_UPDATE), params)

    @traps.syscall
    async def snp_launch_finish(self, params: uapi.SevSnpLaunchFinish | None = None) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH"""
        if params is not None:
            uapi.check_struct(params, uapi.SevSnpLaunchFinish, "vm.snp_launch_finish")
        await self._mem_enc_op(uapi.SevCmd(uapi.KVM_SEV_SNP_LAUNCH_FINISH), params or uapi.SevSnpLaunchFinish())

    @property
    def sev_fw_error(self) -> int:
        """kvm_sev_cmd.error of the last SEV command: the firmware status code."""
        cmd = self._mem_enc_cmd
        return cmd.error if isinstance(cmd, uapi.SevCmd) else 0

    # -- what tests read of the vendor's trusted firmware ---------------------------------
    @property
    def tdx_module(self) -> Any:
        """The TDX module this TD runs on (``.mrtd``, ``.sept``); None for any other VM."""
        return self.arch.tdx_module

    @property
    def snp_firmware(self) -> Any:
        """The SNP firmware this guest runs on (``.launch_digest``, ``.rmp``); None otherwise."""
        return self.arch.snp_firmware

    # -- convenience for scenarios ----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "type": uapi.vm_type_name(self.type), "dead": self.dead}
