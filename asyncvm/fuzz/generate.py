"""The program generator: a set-up prefix, then 2-6 actors running short call sequences.

Every choice is a draw from one source (`Gen.draw`): under `asyncvm fuzz` that is the execution's
recorded choice stream, so the program is part of the schedule; it replays with it, and shrinking
the stream's draws toward 0 shrinks the program. Draws are laid out so that 0 is the simpler
program: a call's guard at 0 skips the call (its arguments are still drawn, so dropping one call
leaves the others' draws where they were), 0 more actors, 0 extra memslots, the first page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .describe import VM_TYPES, Ctx, applicable

#: (kind, outcomes, p) -> value in [0, outcomes); p is the chance of 1 for a yes/no draw
Draw = Callable[[str, int, float], int]

#: the longest range one call covers, in pages: short ranges make actors meet on a page
MAX_RANGE = 4


class Gen:
    """Draws for one program, counted (the count is where the program's draws end)."""

    def __init__(self, draw: Draw, pages: int, slot1_pages: int = 4, g1_pages: int = 4) -> None:
        self.draw = draw
        self.pages = pages
        self.slot1_pages = slot1_pages
        self.g1_pages = g1_pages
        self.count = 0
        #: the page many ranges start at (drawn first, see range())
        self.hot = self.pick("fuzz.hot", pages)

    def pick(self, kind: str, n: int) -> int:
        """A value in [0, n); no draw when there is no choice."""
        if n <= 1:
            return 0
        self.count += 1
        return self.draw(kind, n, 0.5)

    def coin(self, kind: str, p: float) -> bool:
        self.count += 1
        return bool(self.draw(kind, 2, p))

    def range(self, span: int) -> tuple[int, int]:
        """(first, count) inside [0, span): where the range starts, then how long it is. Half the
        ranges start at the program's hot page, so that actors meet on it."""
        at_hot = self.coin("fuzz.at_hot", 0.5) and self.hot < span
        first = self.hot if at_hot else self.pick("fuzz.first", span)
        return first, 1 + self.pick("fuzz.count", min(MAX_RANGE, span - first))


@dataclass
class Program:
    """A generated program: its set-up lines, each actor's calls, and how many draws made it."""

    vm_type: str
    pages: int
    slot1_pages: int
    g1_pages: int
    setup: list[str] = field(default_factory=list)
    actors: list[list[str]] = field(default_factory=list)
    draws: int = 0

    @property
    def calls(self) -> int:
        return sum(len(a) for a in self.actors)

    def source(self, name: str = "program") -> str:
        """The program as the body of ``async def name(kvm)`` over the prelude's helpers."""
        out = [f"async def {name}(kvm):"]
        out.append(f"    PAGES, SLOT1, G1 = {self.pages}, {self.slot1_pages}, {self.g1_pages}")
        out += [f"    {line}" for line in self.setup]
        live = [(i, calls) for i, calls in enumerate(self.actors) if calls]
        for i, calls in live:
            out.append("")
            out.append(f"    async def actor{i}():")
            out += [f"        await call({c})" for c in calls]
        out.append("")
        out.append("    async with TaskGroup() as tg:")
        out += [f'        tg.spawn(actor{i}, name="actor{i}")' for i, _ in live] or ["        pass"]
        return "\n".join(out) + "\n"


def generate(
    draw: Draw,
    *,
    vm_type: str = "any",
    pages: int = 8,
    max_actors: int = 6,
    max_calls: int = 3,
    convertible: bool = False,
) -> Program:
    """Draw one program for `vm_type` ("any" draws it too) over a guest of `pages` pages;
    `convertible`: the profile converts guest_memfd pages in place (more calls to draw from)."""
    g = Gen(draw, pages)
    names = list(VM_TYPES)
    kind = names[g.pick("fuzz.vm_type", len(names))] if vm_type == "any" else vm_type
    if kind not in VM_TYPES:
        raise ValueError(f"unknown VM type {vm_type!r} (choose one of: {', '.join(VM_TYPES)}, any)")
    p = Program(kind, pages, g.slot1_pages, g.g1_pages)
    private = kind not in ("default", "gmem")
    coco = kind in ("tdx", "snp")
    slot1 = g.coin("fuzz.slot1", 0.5)
    g1 = private and g.coin("fuzz.g1", 0.4)
    vcpus = 1 + g.pick("fuzz.vcpus", 3)
    s = p.setup
    s.append(f"vm = await kvm.create_vm(uapi.{VM_TYPES[kind]})")
    if kind == "tdx":
        s.append("await vm.tdx_init_vm()")
    elif kind == "snp":
        s.append("await vm.snp_launch_start(uapi.SevSnpLaunchStart(policy=SNP_POLICY))")
    if private:
        s.append("g0 = await vm.create_guest_memfd(size=PAGES * PAGE)")
    if kind == "gmem":
        s.append("g0 = await vm.create_guest_memfd(size=PAGES * PAGE, flags=MMAP_SHARED)")
        s.append("h0 = await kvm.mm.mmap(PAGES * PAGE, fd=g0, shared=True)")
    else:
        s.append("h0 = await kvm.mm.mmap(PAGES * PAGE)")
    s.append("await call(set_slot(vm, 0, 0, PAGES, h0" + (", g0))" if kind != "default" else "))"))
    if slot1:
        s.append("h1 = await kvm.mm.mmap(SLOT1 * PAGE)")
        s.append("await call(set_slot(vm, 1, PAGES, SLOT1, h1))")
    if g1:
        s.append("g1 = await vm.create_guest_memfd(size=G1 * PAGE)")
        s.append("h2 = await kvm.mm.mmap(G1 * PAGE)")
    if coco:
        s.append("await call(set_attributes(vm, 0, PAGES, private=True))")
    elif private:
        # none, all, or the first half of the guest private to start with
        shape = g.pick("fuzz.private_setup", 3)
        if shape:
            s.append(f"await call(set_attributes(vm, 0, {pages if shape == 1 else pages // 2}, private=True))")
    s += [f"v{i} = await vm.create_vcpu({i})" for i in range(vcpus)]
    launched = False
    if coco:
        s.append("src = await image(kvm, PAGES)")
        launched = g.coin("fuzz.launched", 0.5)
        built = g.pick("fuzz.image", pages + 1)
        if kind == "tdx":
            for i in range(vcpus):
                # before the launch some vCPUs may be left for an actor to INIT_VCPU
                if g.coin("fuzz.init_vcpu", 0.7) or launched:
                    s.append(f"await call(init_vcpu(v{i}))")
            if launched:
                if built:
                    s.append(f"await call(init_mem_region(v0, src, 0, {built}))")
                s.append("await call(finalize(vm))")
        elif launched:
            if built:
                s.append(f"await call(launch_update(vm, src, 0, {built}))")
            s.append("await call(launch_finish(vm))")
    for i in range(2 + g.pick("fuzz.actors", max_actors - 1)):
        ctx = Ctx(kind, launched, f"v{i}" if i < vcpus else None, slot1, g1, convertible)
        calls = applicable(ctx)
        seq: list[str] = []
        for j in range(max_calls):
            keep = g.coin("fuzz.call", 0.9 if j == 0 else 0.6)
            c = calls[g.pick("fuzz.op", len(calls))]
            args = c.args(g, ctx)
            if keep:
                seq.append(f"{c.name}({args})")
        p.actors.append(seq)
    p.draws = g.count
    return p
