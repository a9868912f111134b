"""guest_memfd: the inode that owns private memory, the per-VM file, bindings, fallocate,
get_pfn and populate (virt/kvm/guest_memfd.c).

The inode holds the folios; each file is one VM's view of it, with an interval map of its
bindings (page offset -> memslot). Everything that changes which memslot a page offset belongs
to, or frees a page, holds the inode's ``invalidate_lock`` for write; allocation holds it for
read; faults (``kvm_gmem_get_pfn``) hold neither it nor ``mmu_lock`` and rely on the
invalidation sequence instead.

Since 6.18 a guest_memfd created with ``GUEST_MEMFD_FLAG_MMAP`` can be mapped by the VMM
(``kvm.mm.mmap(length, fd=gmem, shared=True)``); with ``GUEST_MEMFD_FLAG_INIT_SHARED`` its pages
are shared with the host, so host faults get them (``kvm_gmem_fault_user_mapping``), a memslot
bound to it is "guest_memfd only" (shared guest faults resolve through the file too), and
truncation unmaps the host mappings before the page leaves the cache. The in-place conversion
design profile adds per-page shareability in the inode and conversion through the file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..host.mm import Mm, Vma, VmFaultSigbus
from ..host.pages import Folio
from ..intervals import IntervalMap
from ..runtime import hb, traps
from ..runtime.failures import Violation
from ..runtime.lockdep import lockdep_assert_held
from ..runtime.sync import Mutex, RWSem, cond_resched, signal_pending
from ..uapi import PAGE_SHIFT, KvmError
from .attributes import kvm_range_has_memory_attributes, kvm_supported_mem_attributes
from .invalidate import (
    KVM_FILTER_PRIVATE,
    KVM_FILTER_SHARED,
    GfnRange,
    kvm_mmu_invalidate_begin,
    kvm_mmu_invalidate_end,
    kvm_mmu_unmap_gfn_range,
)
from .trace import (
    WARN,
    trace_kvm_gmem_invalidate,
    trace_kvm_gmem_populate,
    trace_kvm_gmem_populated,
    trace_kvm_gmem_set_attributes,
    trace_kvm_gmem_truncate_folio,
)

if TYPE_CHECKING:
    from .memslots import Memslot
    from .vm import Vm

#: include/linux/falloc.h: FALLOC_FL_MODE_MASK, the mutually exclusive modes (ALLOCATE_RANGE is 0)
FALLOC_FL_MODE_MASK = (
    uapi.FALLOC_FL_PUNCH_HOLE
    | uapi.FALLOC_FL_COLLAPSE_RANGE
    | uapi.FALLOC_FL_ZERO_RANGE
    | uapi.FALLOC_FL_INSERT_RANGE
    | uapi.FALLOC_FL_UNSHARE_RANGE
    | uapi.FALLOC_FL_WRITE_ZEROES
)
MAX_LFS_FILESIZE = (1 << 63) - 1
#: include/linux/kvm_host.h: KVM_MEMSLOT_GMEM_ONLY (6.18): the slot's memory, shared included,
#: comes from its guest_memfd (set by kvm_gmem_bind() when the file supports mmap)
KVM_MEMSLOT_GMEM_ONLY = 1 << 17

PostPopulate = Callable[["Vm", int, int, "int | None", int, Any], Awaitable[int]]


class GmemInode:
    """The guest_memfd inode: size, folios (page offset -> folio) and the invalidate lock."""

    def __init__(self, size: int, flags: int) -> None:
        self.size = size
        self.flags = flags
        self.folios: IntervalMap[Folio] = IntervalMap()
        self.invalidate_lock = RWSem("mapping->invalidate_lock")
        self.files: list[GuestMemfd] = []
        #: mapping->i_mmap: (mm, vma) of every host mapping of this inode
        self.i_mmap: list[tuple[Mm, Vma]] = []
        #: [design gmem-inplace-conversion] per-page shareability (page offset -> True if shared);
        #: None in the kernel profiles, where INIT_SHARED alone says whether the host may fault
        self.shared: IntervalMap[bool] | None = None
        #: [design gmem-bind-preserves-data / gmem-unbound-state] a memslot has bound the file
        self.bound = False


class GuestMemfd:
    """A guest_memfd file (``struct gmem_file``): one VM's view of the inode, and the fd itself."""

    def __init__(self, vm: Vm, inode: GmemInode) -> None:
        self.vm = vm
        self.inode = inode
        self.bindings: IntervalMap[Memslot] = IntervalMap()
        self.refcount = 1
        self.released = False
        #: close() ran: the fd is gone even while kernel paths still hold references
        self.fd_closed = False
        inode.files.append(self)
        self.name = f"guest_memfd{vm.next_fd()}"

    def __repr__(self) -> str:
        return f"<GuestMemfd {self.name} size={self.inode.size:#x}>"

    # -- file lifetime --------------------------------------------------------------------
    def get_file_active(self) -> GuestMemfd | None:
        """get_file_active(): None once the last reference is gone, even before release() ran."""
        if self.refcount <= 0:
            return None
        self.refcount += 1
        return self

    async def fput(self, *, returning_to_user: bool = False) -> None:
        """fput(): the last reference releases the file, but not inside a kernel path: like
        __fput() it runs as task work when the task returns to userspace, so never under the
        caller's locks (a fault holding kvm->srcu may drop the last reference of a file that
        userspace just closed). close() is already on its way back to userspace."""
        self.refcount -= 1
        if self.refcount == 0:
            exe = traps.active()
            if exe is not None and not returning_to_user:
                exe.spawn(kvm_gmem_release(self), f"task_work:fput({self.name})")
            else:
                await kvm_gmem_release(self)

    @traps.syscall
    async def close(self) -> None:
        """close(fd): drop the VMM's reference; the last one releases the file."""
        if self.fd_closed or self.refcount <= 0:
            raise KvmError(uapi.EBADF, "guest_memfd already closed")
        self.fd_closed = True
        await self.fput(returning_to_user=True)

    # -- file operations a VMM might try ----------------------------------------------------
    @traps.syscall
    async def fallocate(self, mode: int, offset: int, len: int) -> None:
        """fallocate(2) on the guest_memfd: allocate, or PUNCH_HOLE|KEEP_SIZE.

        The syscall takes an int mode and loff_t offset/len: Python ints are narrowed as C would.
        """
        mode = uapi.check_int(mode, "mode", "gmem.fallocate")
        offset = uapi.check_int(offset, "offset", "gmem.fallocate")
        len = uapi.check_int(len, "len", "gmem.fallocate")
        # fs/open.c: ksys_fallocate(): fdget() fails on a closed fd; on a shared fd table it holds
        # a reference for the call, so a close() meanwhile releases the file only after it.
        if self.fd_closed or self.get_file_active() is None:
            raise KvmError(uapi.EBADF, "guest_memfd is closed")
        try:
            await kvm_gmem_fallocate(self, uapi.s32(mode), uapi.s64(offset), uapi.s64(len))
        finally:
            await self.fput(returning_to_user=True)

    def read(self, length: int, offset: int = 0) -> bytes:
        """read()/pread(): guest_memfd has no read method."""
        raise KvmError(uapi.EINVAL, "guest_memfd does not support read")

    def write(self, data: bytes, offset: int = 0) -> int:
        """write()/pwrite(): guest_memfd has no write method."""
        raise KvmError(uapi.EINVAL, "guest_memfd does not support write")

    pread = read
    pwrite = write

    def mmap(self, length: int, offset: int = 0, shared: bool = True) -> int:
        """mmap(fd) into the VMM's address space (``kvm.mm.mmap(length, fd=self, ...)``)."""
        return self.vm.kvm.mm.mmap(length, fd=self, offset=offset, shared=shared)

    # -- what the host mm calls (host/mm.py: MappableFile) ---------------------------------
    @property
    def i_mmap(self) -> list[tuple[Mm, Vma]]:
        return self.inode.i_mmap

    def mmap_check(self, shared: bool) -> None:
        """virt/kvm/guest_memfd.c: kvm_gmem_mmap() (6.18)."""
        kvm_gmem_mmap(self, shared)

    async def fault_user_mapping(self, pgoff: int, write: bool) -> Folio:
        """vm_ops->fault: kvm_gmem_fault_user_mapping()."""
        return await kvm_gmem_fault_user_mapping(self, pgoff)

    @traps.syscall
    async def set_memory_attributes2(self, attrs: uapi.MemoryAttributes2) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd ([design gmem-inplace-conversion] only):
        convert [offset, offset + size) of the file; on -EAGAIN ``attrs.error_offset`` says where."""
        uapi.check_struct(attrs, uapi.MemoryAttributes2, "gmem.set_memory_attributes2")
        await kvm_gmem_set_attributes(self, attrs)

    def truncate(self, size: int) -> None:
        """ftruncate()/setattr: kvm_gmem_setattr() refuses any size change."""
        raise KvmError(uapi.EINVAL, "guest_memfd size is fixed")

    def fstat(self) -> dict[str, int]:
        return {"st_size": self.inode.size, "st_blksize": uapi.PAGE_SIZE}

    @property
    def size(self) -> int:
        return self.inode.size


# -- creation and binding --------------------------------------------------------------------


def kvm_arch_supports_gmem_init_shared(vm: Vm) -> bool:
    """arch/x86/kvm/x86.c: kvm_arch_supports_gmem_init_shared() (6.18): not for a VM with private
    memory, whose shared/private state lives in the VM's attributes; [design
    gmem-inplace-conversion] yes, shareability then lives in guest_memfd.

    x86 implements it from kvm_arch_has_private_mem(), which generic code reaches through its slot.
    """
    return vm.profile.gmem_in_place_conversion or not vm.ops.has_private_mem(vm)


def kvm_gmem_get_supported_flags(vm: Vm | None, supported: int) -> int:
    """include/linux/kvm_host.h: kvm_gmem_get_supported_flags() (6.18): MMAP always, INIT_SHARED
    where the arch supports it (always for /dev/kvm, vm None); `supported` is what the profile's
    kernel knows at all (0 before 6.18)."""
    flags = supported & uapi.GUEST_MEMFD_FLAG_MMAP
    if vm is None or kvm_arch_supports_gmem_init_shared(vm):
        flags |= supported & uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    return flags


def kvm_gmem_create(vm: Vm, args: uapi.CreateGuestMemfd) -> GuestMemfd:
    """virt/kvm/guest_memfd.c: kvm_gmem_create() (6.8+; flags per profile and VM type, 6.18).

    flags is the __u64 field; size is read into a loff_t, so a size with bit 63 set is negative.
    """
    supported = kvm_gmem_get_supported_flags(vm, vm.profile.gmem_supported_flags)
    flags, size = uapi.u64(args.flags), uapi.s64(args.size)
    if flags & ~supported:
        raise KvmError(uapi.EINVAL, f"unsupported guest_memfd flags {flags:#x}")
    if size <= 0 or size % uapi.PAGE_SIZE:
        raise KvmError(uapi.EINVAL, "guest_memfd size must be a positive multiple of the page size")
    inode = GmemInode(size, flags)
    if vm.profile.gmem_in_place_conversion:
        # [design] kvm_gmem_init_inode(): every page starts as INIT_SHARED says
        inode.shared = IntervalMap()
        inode.shared.assign(0, size >> PAGE_SHIFT, bool(flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED))
    return GuestMemfd(vm, inode)


def kvm_gmem_check_unbound(file: GuestMemfd, what: str) -> None:
    """[design gmem-unbound-state] an UNBOUND file allows only bind and close: anything else is
    -EBADF (the design names no errno; the model uses the one for a file not usable that way)."""
    if file.vm.profile.gmem_initial_state == "unbound" and not file.inode.bound:
        raise KvmError(uapi.EBADF, f"guest_memfd is UNBOUND: {what} before KVM_SET_USER_MEMORY_REGION2")


def kvm_gmem_mmap(file: GuestMemfd, shared: bool) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_mmap() (6.18): -ENODEV without GUEST_MEMFD_FLAG_MMAP,
    -EINVAL unless the mapping is MAP_SHARED (no copy-on-write copies of guest memory)."""
    kvm_gmem_check_unbound(file, "mmap")
    if not file.inode.flags & uapi.GUEST_MEMFD_FLAG_MMAP:
        raise KvmError(uapi.ENODEV, "guest_memfd was not created with GUEST_MEMFD_FLAG_MMAP")
    if not shared:
        raise KvmError(uapi.EINVAL, "guest_memfd can only be mapped MAP_SHARED")


def kvm_gmem_is_shared_mem(inode: GmemInode, index: int) -> bool:
    """May the host fault page `index`? [6.18] iff the file is INIT_SHARED; [design
    gmem-inplace-conversion] per the page's shareability."""
    if inode.shared is not None:
        return bool(inode.shared.get(index))
    if not inode.bound and any(f.vm.profile.gmem_initial_state == "shared" for f in inode.files):
        # [design gmem-bind-preserves-data] the memfile is ordinary shared memory until bound
        return True
    return bool(inode.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)


async def kvm_gmem_fault_user_mapping(file: GuestMemfd, index: int) -> Folio:
    """virt/kvm/guest_memfd.c: kvm_gmem_fault_user_mapping() (6.18; [design] shareability under
    the invalidate lock): SIGBUS beyond the size or on memory not shared with the host, else the
    folio, zeroed if new, returned locked with a reference for the PTE (VM_FAULT_LOCKED)."""
    inode = file.inode
    vm = file.vm
    if index << PAGE_SHIFT >= inode.size:
        raise VmFaultSigbus(f"guest_memfd page {index:#x} is beyond the file size {inode.size:#x}")
    bugs = vm.bugs
    if inode.shared is not None and vm.profile.gmem_fault_takes_invalidate_lock:
        lock = inode.invalidate_lock
        if "gmem_fault_skips_invalidate_lock" in bugs:
            # bug: shareability read with no lock; a conversion can pass between check and map
            await traps.point(lock)
            shared = kvm_gmem_is_shared_mem(inode, index)
            await traps.point(lock)
            if not shared:
                raise VmFaultSigbus(f"guest_memfd page {index:#x} is private")
            folio = await kvm_gmem_get_folio(vm, inode, index)
        else:
            await lock.down_read()
            try:
                if not kvm_gmem_is_shared_mem(inode, index):
                    raise VmFaultSigbus(f"guest_memfd page {index:#x} is private")
                folio = await kvm_gmem_get_folio(vm, inode, index)
            finally:
                await lock.up_read()
    else:
        if not kvm_gmem_is_shared_mem(inode, index) and "gmem_fault_ignores_init_shared" not in bugs:
            raise VmFaultSigbus(f"guest_memfd page {index:#x} is not shared with the host")
        folio = await kvm_gmem_get_folio(vm, inode, index)
    if not folio.uptodate:
        folio.zero()
        folio.uptodate = True
    if "gmem_fault_unlocks_early" in bugs:
        # bug: the folio is unlocked before the PTE is set, so truncation can remove it first
        await folio_unlock(folio)
    return folio


async def kvm_gmem_bind(vm: Vm, slot: Memslot, fd: object, offset: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_bind() (6.8+); overlap errno per profile."""
    if not isinstance(fd, GuestMemfd):
        if isinstance(fd, int) or fd is None:
            raise KvmError(uapi.EBADF, "guest_memfd is not an open file")
        raise KvmError(uapi.EINVAL, "not a guest_memfd file")
    file = None if fd.fd_closed else fd.get_file_active()  # fdget(): the fd must still be open
    if file is None:
        raise KvmError(uapi.EBADF, "guest_memfd is closed")
    try:
        if file.vm is not vm:
            raise KvmError(uapi.EINVAL, "guest_memfd belongs to another VM")
        size = slot.npages << PAGE_SHIFT
        if offset < 0 or offset % uapi.PAGE_SIZE or offset + size > file.inode.size:
            raise KvmError(uapi.EINVAL, "guest_memfd offset/size outside the file")
        start = offset >> PAGE_SHIFT
        end = start + slot.npages
        await file.inode.invalidate_lock.down_write()
        try:
            if file.bindings.any_overlap(start, end):
                raise KvmError(getattr(uapi, vm.profile.gmem_bind_overlap_errno), "guest_memfd range already bound")
            slot.gmem_file = file
            slot.gmem_pgoff = start
            if file.inode.flags & uapi.GUEST_MEMFD_FLAG_MMAP:
                slot.flags |= KVM_MEMSLOT_GMEM_ONLY
            file.bindings.assign(start, end, slot)
            if file.inode.shared is not None:
                kvm_gmem_sync_vm_attributes(file, start, end)
            if not file.inode.bound and vm.profile.gmem_initial_state == "shared":
                # [design gmem-bind-preserves-data] binding makes the memfile inaccessible to the
                # host (its PTEs go) and keeps what the host wrote in the folios
                file.inode.bound = True
                await unmap_mapping_pages(file.inode, 0, file.inode.size >> PAGE_SHIFT)
            file.inode.bound = True
        finally:
            await file.inode.invalidate_lock.up_write()
    finally:
        await file.fput()


async def kvm_gmem_unbind(slot: Memslot) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_unbind() (6.8+): nothing to do once the file is released."""
    file = slot.gmem_file
    if file is None:
        return
    await file.inode.invalidate_lock.down_write()
    try:
        file.bindings.clear(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages)
        slot.gmem_file = None
    finally:
        await file.inode.invalidate_lock.up_write()


# -- invalidation ----------------------------------------------------------------------------


def kvm_gmem_get_invalidate_filter(inode: GmemInode) -> int:
    """virt/kvm/guest_memfd.c: kvm_gmem_get_invalidate_filter() (6.18): an INIT_SHARED file's pages
    are mapped shared; [design gmem-inplace-conversion] either kind may be mapped."""
    if inode.shared is not None:
        return KVM_FILTER_SHARED | KVM_FILTER_PRIVATE
    if inode.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
        return KVM_FILTER_SHARED
    return KVM_FILTER_PRIVATE


async def __kvm_gmem_invalidate_begin(file: GuestMemfd, start: int, end: int, attr_filter: int) -> None:
    """virt/kvm/guest_memfd.c: __kvm_gmem_invalidate_begin() (6.18): begin in one file's VM if the
    file has bindings in range."""
    vm = file.vm
    found = False
    flush = False
    for s, e, slot in file.bindings.overlaps(start, end):
        check_binding_live(slot)
        if not found:
            found = True
            trace_kvm_gmem_invalidate(vm, start, end)
            await vm.mmu_lock.write_lock()
            kvm_mmu_invalidate_begin(vm)
        gfn0 = slot.base_gfn + s - slot.gmem_pgoff
        flush |= await kvm_mmu_unmap_gfn_range(vm, GfnRange(gfn0, gfn0 + (e - s), slot, attr_filter, True))
    if found:
        if flush:
            vm.ops.flush_remote_tlbs(vm)
        await vm.mmu_lock.write_unlock()


async def kvm_gmem_invalidate_begin(inode: GmemInode, start: int, end: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_invalidate_begin() (6.8+): begin per VM with bindings in range."""
    attr_filter = kvm_gmem_get_invalidate_filter(inode)
    for file in inode.files:
        await __kvm_gmem_invalidate_begin(file, start, end, attr_filter)


async def __kvm_gmem_invalidate_end(file: GuestMemfd, start: int, end: int) -> None:
    """virt/kvm/guest_memfd.c: __kvm_gmem_invalidate_end() (6.18): end in one file's VM only if the
    file still has bindings in range (the bindings, not whether a begin ran, decide)."""
    if file.bindings.any_overlap(start, end):
        vm = file.vm
        await vm.mmu_lock.write_lock()
        kvm_mmu_invalidate_end(vm)
        await vm.mmu_lock.write_unlock()


async def kvm_gmem_invalidate_end(inode: GmemInode, start: int, end: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_invalidate_end() (6.8+): end per VM with bindings in range."""
    for file in inode.files:
        await __kvm_gmem_invalidate_end(file, start, end)


async def truncate_inode_pages_range(inode: GmemInode, vm: Vm, start: int, end: int) -> int:
    """mm/truncate.c: truncate_inode_pages_range(): each folio leaves the page cache under its
    folio lock (so never while kvm_gmem_get_pfn() is preparing it), then loses the cache's ref."""
    victims = [(s, e, f) for s, e, f in inode.folios.overlaps(start, end)]
    mapped = bool(inode.i_mmap)
    for s, e, folio in victims:
        await folio.lock.lock()
        if inode.folios.get(s) is folio:
            if mapped and "punch_hole_skips_unmap_mapping" not in vm.bugs:
                # truncate_inode_folio() -> unmap_mapping_folio(): host PTEs go first
                await unmap_mapping_pages(inode, s, e)
            inode.folios.clear(s, e)
            traps.emit("folio_truncate", None, index=s, pfn=folio.pfn)
            if mapped:
                trace_kvm_gmem_truncate_folio(inode, s, folio)
        await folio.lock.unlock()
        vm.kvm.allocator.put(folio)
    return len(victims)


async def unmap_mapping_pages(inode: GmemInode, start: int, end: int) -> int:
    """mm/memory.c: unmap_mapping_pages(): zap every host PTE of file pages [start, end), in every
    mm that maps the file (each zap fires that mm's MMU notifiers); returns the pages zapped."""
    n = 0
    for mm, vma in list(inode.i_mmap):
        n += await mm.unmap_file_range(vma, start, end)
    return n


# -- [design gmem-inplace-conversion] conversion through the guest_memfd ---------------------


async def kvm_gmem_set_attributes(file: GuestMemfd, attrs: uapi.MemoryAttributes2) -> None:
    """[design gmem-inplace-conversion] virt/kvm/guest_memfd.c: kvm_gmem_set_attributes() (the
    in-place conversion series, 2025-26 revisions): KVM_SET_MEMORY_ATTRIBUTES2 on the file.

    The struct's fields are __u64; checks in the series' order, each -EINVAL; a conversion the
    file cannot make safely is -EAGAIN with ``error_offset`` naming the first page in the way.
    """
    vm = file.vm
    inode = file.inode
    if inode.shared is None:
        raise KvmError(uapi.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd needs in-place conversion")
    if file.refcount <= 0:
        raise KvmError(uapi.EBADF, "guest_memfd is closed")
    offset, size = uapi.u64(attrs.offset), uapi.u64(attrs.size)
    attributes, flags = uapi.u64(attrs.attributes), uapi.u64(attrs.flags)
    if flags or uapi.u64(attrs.error_offset):
        raise KvmError(uapi.EINVAL, "flags and error_offset must be 0")
    if attributes & ~kvm_supported_mem_attributes(vm):
        raise KvmError(uapi.EINVAL, f"unsupported attributes {attributes:#x}")
    if size == 0 or offset + size > uapi.U64_MAX:
        raise KvmError(uapi.EINVAL, "size is 0 or offset + size wraps")
    if offset % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
        raise KvmError(uapi.EINVAL, "offset and size must be page aligned")
    if offset >= inode.size or offset + size > inode.size:
        raise KvmError(uapi.EINVAL, "range beyond the guest_memfd size")
    start = offset >> PAGE_SHIFT
    err_index = await __kvm_gmem_set_attributes(file, start, start + (size >> PAGE_SHIFT), attributes)
    if err_index is not None:
        attrs.error_offset = err_index << PAGE_SHIFT
        raise KvmError(uapi.EAGAIN, f"guest_memfd page {err_index:#x} is mapped or pinned by the host")


def kvm_gmem_sync_vm_attributes(file: GuestMemfd, start: int, end: int) -> None:
    """[design] kvm_mem_is_private() answers from guest_memfd for its bound gfns: the model keeps
    the VM's attribute map in step with the file's shareability over [start, end) of `file`'s
    bindings (under the invalidate lock, inside the conversion's invalidation window)."""
    shared = file.inode.shared
    assert shared is not None
    vm = file.vm
    for s, e, slot in file.bindings.overlaps(start, end):
        for ps, pe, is_shared in shared.overlaps(s, e):
            g0 = slot.base_gfn + ps - slot.gmem_pgoff
            g1 = g0 + (pe - ps)
            if is_shared:
                vm.attributes.clear(g0, g1)
            else:
                vm.attributes.assign(g0, g1, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.mmu_word.write()


def kvm_gmem_invalidate(inode: GmemInode, start: int, end: int) -> None:
    """[design] kvm_gmem_invalidate(): before private pages turn shared, the arch gives each folio
    back to the host (kvm_arch_gmem_invalidate(): SNP makes it shared in the RMP), as it does when
    a folio is freed."""
    for _s, _e, folio in inode.folios.overlaps(start, end):
        for file in inode.files:
            file.vm.ops.gmem_invalidate(file.vm, folio)


def kvm_gmem_unsafe_for_conversion(inode: GmemInode, start: int, end: int) -> int | None:
    """[design] kvm_gmem_is_safe_for_conversion(): every folio in range holds only the page
    cache's reference (no host PTE, no pin, no fault in flight); the first that does not, or None."""
    for s, _e, folio in inode.folios.overlaps(start, end):
        if folio.refcount != 1:
            return s
    return None


async def __kvm_gmem_set_attributes(file: GuestMemfd, start: int, end: int, attributes: int) -> int | None:
    """[design] __kvm_gmem_set_attributes(): under the invalidate lock, unmap the host (to private),
    refuse while anything else holds the pages, then invalidate and flip; returns the page in the
    way (-EAGAIN) or None."""
    inode = file.inode
    shared = inode.shared
    assert shared is not None
    vm = file.vm
    prof = vm.profile
    to_private = bool(attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    await inode.invalidate_lock.down_write()
    try:
        if all(bool(v) != to_private for _s, _e, v in shared.overlaps(start, end)):
            return None
        if to_private:
            if prof.gmem_conversion_unmaps_host and "gmem_convert_skips_unmap" not in vm.bugs:
                await unmap_mapping_pages(inode, start, end)
            if prof.gmem_conversion_checks_refcount and "gmem_convert_skips_unmap" not in vm.bugs:
                bad = kvm_gmem_unsafe_for_conversion(inode, start, end)
                if bad is not None:
                    return bad
        await kvm_gmem_invalidate_begin(inode, start, end)
        if not to_private:
            kvm_gmem_invalidate(inode, start, end)
        shared.assign(start, end, not to_private)
        for f in inode.files:
            kvm_gmem_sync_vm_attributes(f, start, end)
        trace_kvm_gmem_set_attributes(inode, start, end, attributes)
        await traps.point(inode.invalidate_lock)
        if not (to_private and "gmem_convert_skips_invalidate_end" in vm.bugs):
            await kvm_gmem_invalidate_end(inode, start, end)
    finally:
        await inode.invalidate_lock.up_write()
    return None


# -- fallocate -------------------------------------------------------------------------------


def vfs_fallocate_check(file: GuestMemfd, mode: int, offset: int, length: int) -> None:
    """fs/open.c: vfs_fallocate() checks before the file's ->fallocate (exclusive-mode switch of
    "fs: sort out the fallocate mode mess", ~6.12; FALLOC_FL_WRITE_ZEROES ~6.17).

    The modes are exclusive: a combination of two mode bits, PUNCH_HOLE without KEEP_SIZE, or
    COLLAPSE/INSERT/WRITE_ZEROES with KEEP_SIZE is -EOPNOTSUPP here, before the -EFBIG size check.
    """
    if file.refcount <= 0:
        raise KvmError(uapi.EBADF, "guest_memfd is closed")
    if offset < 0 or length <= 0:
        raise KvmError(uapi.EINVAL, "fallocate offset must be >= 0 and len > 0")
    if mode & ~(FALLOC_FL_MODE_MASK | uapi.FALLOC_FL_KEEP_SIZE):
        raise KvmError(uapi.EOPNOTSUPP, f"fallocate mode {mode:#x} has unknown bits")
    kind = mode & FALLOC_FL_MODE_MASK
    keep_size = bool(mode & uapi.FALLOC_FL_KEEP_SIZE)
    if kind in (uapi.FALLOC_FL_ALLOCATE_RANGE, uapi.FALLOC_FL_UNSHARE_RANGE, uapi.FALLOC_FL_ZERO_RANGE):
        pass
    elif kind == uapi.FALLOC_FL_PUNCH_HOLE:
        if not keep_size:
            raise KvmError(uapi.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
    elif kind in (uapi.FALLOC_FL_COLLAPSE_RANGE, uapi.FALLOC_FL_INSERT_RANGE, uapi.FALLOC_FL_WRITE_ZEROES):
        if keep_size:
            raise KvmError(uapi.EOPNOTSUPP, f"fallocate mode {mode:#x} cannot keep the size")
    else:
        raise KvmError(uapi.EOPNOTSUPP, f"fallocate modes {kind:#x} are mutually exclusive")
    if offset + length > MAX_LFS_FILESIZE:
        raise KvmError(uapi.EFBIG, "fallocate range beyond the maximum file size")


async def kvm_gmem_fallocate(file: GuestMemfd, mode: int, offset: int, length: int) -> None:
    """fs/open.c: vfs_fallocate() checks, then virt/kvm/guest_memfd.c: kvm_gmem_fallocate() (6.8+)."""
    vfs_fallocate_check(file, mode, offset, length)
    kvm_gmem_check_unbound(file, "fallocate")
    if not (mode & uapi.FALLOC_FL_KEEP_SIZE):
        raise KvmError(uapi.EOPNOTSUPP, "guest_memfd fallocate needs KEEP_SIZE")
    if mode & ~(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE):
        raise KvmError(uapi.EOPNOTSUPP, f"guest_memfd does not support fallocate mode {mode:#x}")
    if offset % uapi.PAGE_SIZE or length % uapi.PAGE_SIZE:
        raise KvmError(uapi.EINVAL, "guest_memfd fallocate offset/len must be page aligned")
    if mode & uapi.FALLOC_FL_PUNCH_HOLE:
        await kvm_gmem_punch_hole(file, offset, length)
    else:
        await kvm_gmem_allocate(file, offset, length)


async def kvm_gmem_punch_hole(file: GuestMemfd, offset: int, length: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_punch_hole() (6.8+): invalidate, truncate, end; always 0."""
    inode = file.inode
    start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
    vm = file.vm
    await inode.invalidate_lock.down_write()
    try:
        await kvm_gmem_invalidate_begin(inode, start, end)
        await truncate_inode_pages_range(inode, vm, start, end)
        await traps.point(inode.invalidate_lock)
        await kvm_gmem_invalidate_end(inode, start, end)
    finally:
        await inode.invalidate_lock.up_write()


async def kvm_gmem_allocate(file: GuestMemfd, offset: int, length: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_allocate() (6.8+): no partial-progress return."""
    inode = file.inode
    if offset + length > inode.size:
        raise KvmError(uapi.EINVAL, "fallocate beyond the guest_memfd size")
    start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
    vm = file.vm
    await inode.invalidate_lock.down_read()
    try:
        for index in range(start, end):
            if signal_pending():
                raise KvmError(uapi.EINTR, "signal during fallocate")
            prof = vm.profile
            folio = await kvm_gmem_get_folio(
                vm, inode, index, prepare=prof.gmem_fallocate_prepares or prof.gmem_fallocate_zeroes
            )
            await folio_unlock(folio)
            vm.kvm.allocator.put(folio)
            await cond_resched()
    finally:
        await inode.invalidate_lock.up_read()


async def kvm_gmem_get_folio(vm: Vm, inode: GmemInode, index: int, *, prepare: bool = False) -> Folio:
    """virt/kvm/guest_memfd.c: kvm_gmem_get_folio(): find or create the folio, locked and referenced.

    With `prepare` (the [6.8-6.10] allocate path) a new folio is zeroed and marked uptodate, and
    [6.10] runs the arch prepare hook for every VM that has the offset bound ([design
    populate-zeroes-at-fallocate]: zeroed and uptodate only).
    """
    while True:
        folio = inode.folios.get(index)
        created = False
        if folio is None:
            folio = vm.kvm.allocator.alloc(1, "guest_memfd")
            if folio is None:
                raise KvmError(uapi.ENOMEM, "guest_memfd folio allocation failed")
            folio.lock = Mutex(f"folio {folio.pfn:#x}", lock_class="folio_lock")
            folio.on_free = partial(vm.ops.gmem_invalidate, vm)
            inode.folios.assign(index, index + 1, folio)
            traps.emit("folio_add", None, index=index, pfn=folio.pfn)
            created = True
        vm.kvm.allocator.get(folio)
        await folio.lock.lock()
        if inode.folios.get(index) is folio:
            break
        # Truncated while we waited for the lock (filemap_lock_folio() rechecks folio->mapping).
        await folio.lock.unlock()
        vm.kvm.allocator.put(folio)
    if created and prepare:
        folio.zero()
        folio.uptodate = True
        for file in inode.files if vm.profile.gmem_fallocate_prepares else ():
            slot = file.bindings.get(index)
            if slot is not None:
                gfn = slot.base_gfn + index - slot.gmem_pgoff
                await file.vm.ops.gmem_prepare(file.vm, folio.pfn, gfn, 0)
    return folio


async def folio_unlock(folio: Folio) -> None:
    await folio.lock.unlock()


# -- the fault side --------------------------------------------------------------------------


async def __kvm_gmem_get_pfn(file: GuestMemfd, slot: Memslot, index: int) -> Folio:
    """virt/kvm/guest_memfd.c: __kvm_gmem_get_pfn(): checks the binding; returns a locked folio."""
    if file is not slot.gmem_file:
        raise KvmError(uapi.EFAULT, "memslot no longer points at this guest_memfd")
    if file.bindings.get(index) is not slot:
        raise KvmError(uapi.EIO, "guest_memfd offset is not bound to this memslot")
    folio = await kvm_gmem_get_folio(file.vm, file.inode, index)
    if folio.hwpoison:
        await folio_unlock(folio)
        file.vm.kvm.allocator.put(folio)
        raise KvmError(uapi.EHWPOISON, "guest_memfd page is poisoned")
    return folio


async def kvm_gmem_get_pfn(vm: Vm, slot: Memslot, gfn: int) -> tuple[int, Folio, int]:
    """virt/kvm/guest_memfd.c: kvm_gmem_get_pfn() (6.11-6.19 preparedness; 7.0 per profile).

    Returns (pfn, folio with a reference the caller must put, max_order). Raises KvmError.
    """
    slot.check_live("kvm_gmem_get_pfn")
    index = slot.gfn_to_pgoff(gfn)
    bound = slot.gmem_file
    file = bound.get_file_active() if bound is not None else None
    if file is None:
        raise KvmError(uapi.EFAULT, "guest_memfd is not bound or was released")
    try:
        folio = await __kvm_gmem_get_pfn(file, slot, index)
        prof = vm.profile
        if prof.gmem_prepare_tracking:
            if hb.ACTIVE:
                hb.access(hb.LOAD_ACQUIRE, "folio_uptodate", folio)  # folio_test_uptodate()
            if not folio.uptodate:
                folio.zero()
                early = "mark_uptodate_before_prepare" in vm.bugs
                if early:
                    folio.uptodate = True  # bug: the flag says "prepared" before prepare ran
                r = await vm.ops.gmem_prepare(vm, folio.pfn, gfn, 0)
                if r:
                    if not early:
                        folio.uptodate = False
                    await folio_unlock(folio)
                    vm.kvm.allocator.put(folio)
                    raise KvmError(-r if r < 0 else r, "arch prepare hook failed")
                if hb.ACTIVE:
                    hb.access(hb.STORE_RELEASE, "folio_uptodate", folio)  # folio_mark_uptodate()
                folio.uptodate = True
        elif prof.gmem_fallocate_prepares:
            # [6.8-6.10]: a folio is zeroed and prepared when it is allocated.
            if not folio.uptodate:
                folio.zero()
                folio.uptodate = True
                await vm.ops.gmem_prepare(vm, folio.pfn, gfn, 0)
        else:
            if not folio.uptodate:
                folio.zero()
                folio.uptodate = True
            r = await vm.ops.gmem_prepare(vm, folio.pfn, gfn, 0)
            if r:
                await folio_unlock(folio)
                vm.kvm.allocator.put(folio)
                raise KvmError(-r if r < 0 else r, "arch prepare hook failed")
        await folio_unlock(folio)
        traps.emit("gmem_get_pfn", vm, gfn=gfn, pfn=folio.pfn)
        return folio.pfn, folio, 0
    finally:
        await file.fput()


# -- populate --------------------------------------------------------------------------------


async def kvm_gmem_populate(
    vm: Vm,
    start_gfn: int,
    src: int | None,
    npages: int,
    post_populate: PostPopulate,
    opaque: Any,
) -> int:
    """virt/kvm/guest_memfd.c: kvm_gmem_populate() ([6.11-6.19] whole-call lock + -EEXIST; [7.0] per page).

    Returns the number of pages populated if any, else the first error as -errno (or 0).
    """
    lockdep_assert_held(vm.slots_lock)
    per_page = vm.profile.gmem_populate_per_page_lock
    if npages < 0:
        return -uapi.EINVAL
    if per_page and (npages == 0 or (src is not None and src % uapi.PAGE_SIZE)):
        # [>=7.0] WARN_ON_ONCE(npages <= 0) and WARN_ON_ONCE(!PAGE_ALIGNED(src)) -> -EINVAL
        WARN(vm, "kvm_gmem_populate: npages <= 0 or unaligned source")
        return -uapi.EINVAL
    slot = vm.gfn_to_memslot(start_gfn)
    if slot is None or not slot.has_gmem():
        return -uapi.EINVAL
    bound = slot.gmem_file
    file = bound.get_file_active() if bound is not None else None
    if file is None:
        return -uapi.EFAULT
    npages = min(npages, slot.end_gfn - start_gfn)
    lock = file.inode.invalidate_lock
    take_lock = "populate_without_invalidate_lock" not in vm.bugs
    ret = 0
    i = 0
    try:
        if take_lock and not per_page:
            await lock.down_write()
        try:
            while i < npages:
                if signal_pending():
                    ret = -uapi.EINTR
                    break
                gfn = start_gfn + i
                if per_page and src is not None:
                    # [7.0] the source is pinned before the invalidate lock (no mmap_lock inside it);
                    # a get_user_pages_fast() error ends the loop like any other.
                    try:
                        src_folio, _ = await vm.kvm.mm.get_user_page(src + i * uapi.PAGE_SIZE)
                    except KvmError as e:
                        ret = -(e.errno or uapi.EFAULT)
                        break
                    vm.kvm.allocator.put(src_folio)
                if take_lock and per_page:
                    await lock.down_write()
                try:
                    ret = await _populate_one(vm, file, slot, gfn, src, i, post_populate, opaque)
                finally:
                    if take_lock and per_page:
                        await lock.up_write()
                if ret:
                    break
                i += 1
        finally:
            if take_lock and not per_page:
                await lock.up_write()
    finally:
        await file.fput()
    return ret if (ret and i == 0) else i


async def _populate_one(
    vm: Vm,
    file: GuestMemfd,
    slot: Memslot,
    gfn: int,
    src: int | None,
    i: int,
    post_populate: PostPopulate,
    opaque: Any,
) -> int:
    index = slot.gfn_to_pgoff(gfn)
    try:
        folio = await __kvm_gmem_get_pfn(file, slot, index)
    except KvmError as e:
        return -(e.errno or uapi.EIO)
    try:
        if hb.ACTIVE:
            hb.access(hb.LOAD_ACQUIRE, "folio_uptodate", folio)  # folio_test_uptodate()
        if vm.profile.gmem_populate_eexist and folio.uptodate and "populate_skips_uptodate_check" not in vm.bugs:
            await folio_unlock(folio)
            return -uapi.EEXIST
        await folio_unlock(folio)
        private = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        if not kvm_range_has_memory_attributes(vm, gfn, gfn + 1, private, private):
            return -uapi.EINVAL
        trace_kvm_gmem_populate(vm, gfn)
        p = src + i * uapi.PAGE_SIZE if src is not None else None
        r = -uapi.EIO
        try:
            r = await post_populate(vm, gfn, folio.pfn, p, 0, opaque)
        finally:
            trace_kvm_gmem_populated(vm, gfn, folio.pfn, r)
        if r == 0:
            if hb.ACTIVE:
                hb.access(hb.STORE_RELEASE, "folio_uptodate", folio)  # kvm_gmem_mark_prepared()
            folio.uptodate = True
            traps.emit("gmem_populated", vm, gfn=gfn, pfn=folio.pfn)
        return r
    finally:
        vm.kvm.allocator.put(folio)


# -- release ---------------------------------------------------------------------------------


async def kvm_gmem_release(file: GuestMemfd) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_release() (6.8+): unbind every slot, zap, unlink."""
    vm = file.vm
    inode = file.inode
    await vm.slots_lock.lock()
    await inode.invalidate_lock.down_write()
    try:
        for _s, _e, slot in file.bindings.items():
            check_binding_live(slot)  # WRITE_ONCE(slot->gmem.file, NULL) on a freed slot: KASAN
            slot.gmem_file = None
        # Only this file's VM: the inode's other files (other VMs' views) keep their mappings.
        await __kvm_gmem_invalidate_begin(file, 0, 1 << 62, kvm_gmem_get_invalidate_filter(inode))
        await __kvm_gmem_invalidate_end(file, 0, 1 << 62)
        inode.files.remove(file)
        file.released = True
    finally:
        await inode.invalidate_lock.up_write()
        await vm.slots_lock.unlock()
    file.bindings.clear_all()
    traps.emit("gmem_release", vm, file=file.name)
    if not inode.files:
        # The last file went: evict the inode, freeing its folios (the arch hooks run on free).
        await truncate_inode_pages_range(inode, vm, 0, 1 << 62)


async def kvm_gmem_error_folio(file: GuestMemfd, index: int) -> None:
    """virt/kvm/guest_memfd.c: kvm_gmem_error_folio() (6.8+): poison, invalidate, no truncate."""
    inode = file.inode
    folio = inode.folios.get(index)
    if folio is None:
        raise KvmError(uapi.EINVAL, "no folio at that offset")
    await inode.invalidate_lock.down_read()
    try:
        folio.hwpoison = True
        await kvm_gmem_invalidate_begin(inode, index, index + 1)
        await kvm_gmem_invalidate_end(inode, index, index + 1)
    finally:
        await inode.invalidate_lock.up_read()


def check_binding_live(slot: Memslot) -> None:
    """Lifetime oracle: a binding is dereferenced (invalidate, release), so its memslot must be live.

    This is the use-after-free KASAN reported in kvm_gmem_release() before 9935df5333aa ("KVM:
    Disallow toggling KVM_MEM_GUEST_MEMFD on an existing memslot").
    """
    if slot.freed:
        raise Violation(
            "memslot_uaf", f"guest_memfd still binds freed memslot {slot.id}", signature="memslot_uaf:binding"
        )
