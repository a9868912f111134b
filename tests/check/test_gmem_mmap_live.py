"""In live mode the host-mapping oracles follow the VMM's mm: a dropped Kvm is not kept alive."""

from __future__ import annotations

import gc
import weakref

import anyio

import asyncvm
from asyncvm import uapi


async def _map_and_write() -> weakref.ref[object]:
    kvm = asyncvm.Kvm()
    vm = await kvm.create_vm(uapi.KVM_X86_DEFAULT_VM)
    flags = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    gmem = await vm.create_guest_memfd(size=4 << 12, flags=flags)
    addr = await kvm.mm.mmap(4 << 12, fd=gmem, offset=0, shared=True)
    await kvm.mm.write(addr, b"live")
    assert await kvm.mm.read(addr, 4) == b"live"
    return weakref.ref(kvm.mm)


def test_live_oracles_do_not_keep_the_mm_alive() -> None:
    refs = [anyio.run(_map_and_write) for _ in range(3)]
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
