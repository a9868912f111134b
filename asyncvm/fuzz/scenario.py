"""The `fuzz` scenario: draw a program from the execution's own choice stream, then run it.

The program is drawn first, in the first step of the main task, before the program makes any
call; its draws are the stream's first data draws. So a fuzz schedule replays and shrinks like any
other (shrinking a call's guard to 0 drops the call), and the same stream without those draws is
the schedule of the program written out as a file (write.py).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncvm
from asyncvm.explore.params import Param
from asyncvm.runtime import draw

from . import prelude
from .describe import VM_TYPES
from .generate import Program, generate

ProgramFn = Callable[[Any], Coroutine[Any, Any, None]]

#: compiled programs by source text (a campaign's chunk meets the same small program again)
_COMPILED: dict[str, ProgramFn] = {}
_CACHE_LIMIT = 512


def compile_program(program: Program) -> ProgramFn:
    """The program's ``async def program(kvm)``, defined in the prelude's namespace."""
    source = program.source()
    fn = _COMPILED.get(source)
    if fn is None:
        namespace = dict(vars(prelude))
        exec(compile(source, "<asyncvm fuzz program>", "exec"), namespace)  # our own text
        fn = namespace["program"]
        if len(_COMPILED) >= _CACHE_LIMIT:
            _COMPILED.clear()
        _COMPILED[source] = fn
    return fn


def draw_program(vm_type: str, pages: int, actors: int, calls: int, convertible: bool = False) -> Program:
    """Draw a program from the running execution's stream (live mode: the all-zero program)."""
    return generate(
        lambda kind, n, p: draw(kind, p, n),
        vm_type=vm_type,
        pages=pages,
        max_actors=actors,
        max_calls=calls,
        convertible=convertible,
    )


# A failed RMPUPDATE (the firmware refusing to assign a page) is a legal outcome a VMM must live
# with; the scenarios keep it off unless they hunt it, a fuzz program meets it now and then.
@asyncvm.scenario(
    name="fuzz",
    params={
        "vm_type": Param("any", choices=("any", *VM_TYPES), help="the kind of VM the program builds"),
        # bounded so that one program stays one execution's worth of work (a huge actor count
        # only spawns tasks that never finish before the step bound)
        "pages": Param(8, ge=2, le=512, help="guest size in pages; small, so actors collide"),
        "actors": Param(6, ge=2, le=16, help="at most this many concurrent actors"),
        "calls": Param(3, ge=1, le=32, help="at most this many calls per actor"),
    },
    data={"rmpupdate_error": 0.1},
)
async def fuzz(kvm: Any, vm_type: str = "any", pages: int = 8, actors: int = 6, calls: int = 3) -> None:
    """A generated concurrent program: set-up, then 2 to `actors` actors of up to `calls` calls each.

    The calls (asyncvm/fuzz/describe.py) are pre-fault, guest_memfd fallocate and PUNCH_HOLE,
    attribute changes, memslot create/move/flags/delete, munmap and MADV_DONTNEED, KVM_RUN with
    conversions, TDX INIT_VCPU / INIT_MEM_REGION / FINALIZE, SNP LAUNCH_UPDATE / FINISH and close,
    over ranges of a small guest (`pages`) so that actors collide; for gmem (a default VM on an
    MMAP|INIT_SHARED guest_memfd the VMM maps) also host loads and stores through that mapping.
    `vm_type` is sw, default, tdx, snp, gmem or any. An errno the kernel does not return for a
    call is a failure, as is any oracle.
    """
    if actors < 2 or calls < 1 or pages < 2:
        raise ValueError("fuzz needs actors >= 2, calls >= 1 and pages >= 2")
    program = draw_program(vm_type, pages, actors, calls, kvm.profile.gmem_in_place_conversion)
    await compile_program(program)(kvm)
