"""The embedding examples run unchanged on asyncio and trio (live mode), oracles included."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import asyncio_vmm
import trio_vmm


def test_asyncio_vmm_boots_and_sees_zeros_after_the_punch() -> None:
    before, after = asyncio.run(asyncio_vmm.boot())
    assert before == b"hello, guest"
    assert after == bytes(12)


def test_trio_vmm_race_leaves_a_coherent_vm() -> None:
    seq = trio.run(trio_vmm.race)
    assert seq >= 1  # the punch hole's invalidation ended
