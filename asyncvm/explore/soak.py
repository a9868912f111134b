"""``asyncvm soak``: fuzz the uAPI with a Hypothesis state machine, then audit replay.

Two checks that the tool can be trusted with odd input and with its own schedules:

* **uAPI fuzzing.** A Hypothesis ``RuleBasedStateMachine`` drives random sequences of every public
  ioctl-shaped call (VM, vCPU and guest_memfd creation, memslots, attributes, fallocate,
  pre-fault, KVM_RUN, the TDX and SNP launch commands, the VMM's mmap/munmap/madvise/read/write,
  closing fds) with arguments drawn at the boundaries: zero, unaligned, overlapping, wrapping at
  2**64, in the wrong state, on the wrong VM type, of the wrong Python type. Each Hypothesis
  example is one controlled execution (:class:`Session`): the state built by earlier rules is the
  state later rules act on, the oracles watch the whole sequence and run their quiescence checks
  when it ends, and the strategy's seed is drawn by Hypothesis, so an example is reproducible.
  Every call must succeed or raise ``KvmError`` with an errno the spec lists for that call
  (:data:`ALLOWED`); a call given a wrong Python type must raise ``TypeError``; anything else that
  escapes the model is an internal exception.
* **Replay audit.** Schedules from short campaigns on every bundled scenario (clean and with each
  bug that scenario declares) replay to the same event-log hash in this process and in a fresh
  process with another ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .. import uapi
from ..runtime.executor import ExecutionResult, Executor
from ..runtime.failures import Failure, Violation
from ..runtime.lockdep import Lockdep
from ..runtime.sites import model_site
from ..runtime.strategies import RandomStrategy
from ..uapi import PAGE_SIZE as PAGE
from ..uapi import U64_MAX, KvmError
from .engine import make_world

# --------------------------------------------------------------------------------------------------
# What each call may fail with: the errnos kvm-core.md / kvm-coco.md list for it
# --------------------------------------------------------------------------------------------------

_E = uapi
#: a VM ioctl on a dead (bugged) VM: kvm_vm_ioctl()/kvm_vcpu_ioctl() return -EIO first
_DEAD = {_E.EIO}
#: [T19] the TDX state ioctls take "all the locks": -EBUSY (vCPU creation in flight), -EINTR (killed)
_TDX_LOCKS = {_E.EBUSY, _E.EINTR}
#: arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl(KVM_MEMORY_ENCRYPT_OP): -ENOTTY where the vendor has
#: no vCPU sub-commands (an AMD host: kvm_x86_ops.vcpu_mem_enc_ioctl is NULL)
_NO_VCPU_OP = {_E.ENOTTY}

ALLOWED: Final[dict[str, frozenset[int]]] = {
    name: frozenset(errnos)
    for name, errnos in {
        # kvm_arch_init_vm(): unsupported type
        "kvm.create_vm": {_E.EINVAL, _E.ENOMEM},
        # kvm_vm_ioctl_create_vcpu(): id range / too many, duplicate id, TD not INITIALIZED (-EIO)
        "vm.create_vcpu": {_E.EINVAL, _E.EEXIST, _E.ENOMEM} | _DEAD,
        # kvm-core.md 2.1
        "vm.create_guest_memfd": {_E.EINVAL, _E.ENOMEM, _E.ENOENT} | _DEAD,
        # kvm-core.md 2.2 (bind: -EBADF, -EINVAL; [7.2] -EEXIST); the v1 ioctl the same
        "vm.set_user_memory_region": {_E.EINVAL, _E.EEXIST, _E.ENOMEM} | _DEAD,
        "vm.set_user_memory_region2": {_E.EINVAL, _E.EEXIST, _E.EBADF, _E.ENOMEM} | _DEAD,
        # kvm-core.md 3.1
        "vm.set_memory_attributes": {_E.EINVAL, _E.ENOMEM, _E.EFAULT} | _DEAD,
        # kvm-core.md 2.3 (vfs_fallocate() then kvm_gmem_fallocate()); a closed fd is -EBADF
        "gmem.fallocate": {_E.EINVAL, _E.EOPNOTSUPP, _E.EFBIG, _E.EINTR, _E.ENOMEM, _E.EBADF, _E.ENODEV},
        "gmem.close": {_E.EBADF},
        # [design gmem-inplace-conversion] KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd (the series'
        # errnos: -EINVAL for bad input, -EAGAIN where the host still maps or pins a page); -ENOTTY
        # on a kernel without in-place conversion
        "gmem.set_memory_attributes2": {_E.ENOTTY, _E.EBADF, _E.EINVAL, _E.EAGAIN, _E.ENOMEM, _E.EINTR},
        # kvm-core.md 1.1/1.2 (api.rst 4.143), plus the fault's own errnos (1.5): -EFAULT,
        # -EHWPOISON, -ENOMEM, -EAGAIN ([~6.18]: the slot is being deleted or moved, kvm-core.md 1.8)
        "vcpu.pre_fault_memory": {
            _E.EINVAL,
            _E.ENOENT,
            _E.EINTR,
            _E.EFAULT,
            _E.EOPNOTSUPP,
            _E.EIO,
            _E.ENOMEM,
            _E.EHWPOISON,
            _E.EAGAIN,
        },
        # KVM_RUN: a memory-fault exit is -EFAULT/-EHWPOISON; a TD vCPU not ready is refused (-EINVAL)
        "vcpu.run": {_E.EFAULT, _E.EHWPOISON, _E.EINTR, _E.EINVAL, _E.ENOMEM, _E.EIO, _E.EAGAIN},
        # kvm-coco.md 1.4 (a non-TD VM: vt_mem_enc_ioctl() -ENOTTY)
        "vm.tdx_init_vm": {_E.EINVAL, _E.E2BIG, _E.EBUSY, _E.EAGAIN, _E.ENOMEM, _E.EFAULT, _E.ENOTTY}
        | _DEAD
        | _TDX_LOCKS,
        # kvm-coco.md 1.5 (a non-TD vCPU: vt_vcpu_mem_enc_ioctl() -EINVAL)
        "vcpu.tdx_init_vcpu": {_E.EINVAL, _E.ENOMEM, _E.EFAULT} | _DEAD | _TDX_LOCKS | _NO_VCPU_OP,
        # kvm-coco.md 1.6 and 3.4
        "vcpu.tdx_init_mem_region": {
            _E.EINVAL,
            _E.EFAULT,
            _E.ENOMEM,
            _E.EEXIST,
            _E.EHWPOISON,
            _E.EBUSY,
        }
        | _DEAD
        | _TDX_LOCKS
        | _NO_VCPU_OP,
        # kvm-coco.md 1.7
        "vm.tdx_finalize_vm": {_E.EINVAL, _E.EFAULT, _E.ENOTTY} | _DEAD | _TDX_LOCKS,
        # kvm-coco.md 1.8
        "vcpu.tdx_get_cpuid": {_E.EINVAL, _E.E2BIG, _E.EFAULT, _E.ENOMEM} | _DEAD | {_E.EINTR} | _NO_VCPU_OP,
        # kvm-coco.md 4.1 (a TDX machine answers SEV commands with -ENOTTY too)
        "vm.snp_launch_start": {_E.ENOTTY, _E.EFAULT, _E.EINVAL, _E.ENOMEM} | _DEAD,
        "vm.snp_launch_update": {_E.EINVAL, _E.EFAULT, _E.ENOTTY} | _DEAD,
        "vm.snp_launch_finish": {_E.ENOTTY, _E.EINVAL, _E.EFAULT, _E.EBUSY, _E.ENOMEM} | _DEAD,
        # the VMM's own address space (mm/mmap.c: do_mmap(), mm/madvise.c; kvm-core.md 2.1 for a
        # guest_memfd: -ENODEV without GUEST_MEMFD_FLAG_MMAP, -EINVAL for a private mapping); a
        # load or store the kernel cannot serve is -EFAULT here (SIGBUS is its own outcome)
        "mm.mmap": {_E.EINVAL, _E.ENOMEM, _E.ENODEV, _E.EBADF, _E.EOVERFLOW},
        "mm.munmap": {_E.EINVAL},
        "mm.madvise": {_E.EINVAL, _E.ENOMEM, _E.EAGAIN, _E.EIO, _E.EPERM},
        "mm.read": {_E.EFAULT, _E.ENOMEM},
        "mm.write": {_E.EFAULT, _E.ENOMEM},
        "kvm.check_extension": set(),
        "vm.check_extension": set(),
    }.items()
}

#: outcomes that are not errnos, as the per-call tally names them
OK, TYPE_ERROR, SIGBUS = "ok", "TypeError", "SIGBUS"


# --------------------------------------------------------------------------------------------------
# One controlled execution that runs calls handed to it one at a time
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one call did: its value, the exception it raised, or the end of the execution."""

    value: Any = None
    exc: Exception | None = None
    #: the execution ended during this call (an oracle fired, a task crashed, a deadlock)
    ended: ExecutionResult | None = None


class Session:
    """A controlled execution whose main task runs the calls a state machine hands it.

    The executor drives its tasks in a thread of its own, and the main task takes one call at a
    time from a queue; the state machine's thread waits for each call's outcome before drawing the
    next rule. Only one of the two threads runs at any time, so the execution is exactly as
    deterministic as a scenario: the same seed and the same calls give the same choices.
    """

    def __init__(
        self,
        seed: int,
        profile: str,
        data_probs: dict[str, float],
        max_steps: int = 2_000_000,
        bugs: tuple[str, ...] = (),
    ) -> None:
        from .. import check  # noqa: F401 - importing it attaches the oracles

        self.seed = seed
        self.profile = profile
        self.bugs = bugs
        self._requests: queue.SimpleQueue[Callable[[], Awaitable[Any]] | None] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.kvm: Any = None
        self.result: ExecutionResult | None = None
        strategy = RandomStrategy(seed)
        strategy.new_execution(0)
        self._exe = Executor(strategy, max_steps=max_steps, lockdep=Lockdep(), data_probs=data_probs)
        self._thread = threading.Thread(target=self._run, name=f"soak-session-{seed}", daemon=True)
        self._thread.start()
        first = self._replies.get()
        if first.ended is not None:
            self.result = first.ended

    @property
    def alive(self) -> bool:
        return self.result is None

    def _run(self) -> None:
        result = self._exe.run(self._main)
        self._replies.put(Outcome(ended=result))

    async def _main(self) -> None:
        self.kvm = make_world(self.profile, self.bugs)
        self._replies.put(Outcome())
        while True:
            make = self._requests.get()
            if make is None:
                return
            try:
                value = await make()
            except Violation:
                raise  # an oracle's verdict ends the execution, as in any scenario
            except Exception as e:  # noqa: BLE001 - the state machine classifies it
                self._replies.put(Outcome(exc=e))
                continue
            self._replies.put(Outcome(value=value))

    def call(self, make: Callable[[], Awaitable[Any]]) -> Outcome:
        """Run ``await make()`` as the main task's next step of work; wait for its outcome."""
        if self.result is not None:
            return Outcome(ended=self.result)
        self._requests.put(make)
        out = self._replies.get()
        if out.ended is not None:
            self.result = out.ended
        return out

    def finish(self) -> ExecutionResult:
        """End the main task; the other tasks finish and the oracles' quiescence checks run."""
        if self.result is None:
            self._requests.put(None)
            out = self._replies.get()
            while out.ended is None:  # pragma: no cover - a stray reply cannot happen
                out = self._replies.get()
            self.result = out.ended
        self._thread.join()
        return self.result


# --------------------------------------------------------------------------------------------------
# Tallies
# --------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """Something that must not happen: an internal exception, an unlisted errno, an oracle."""

    kind: str
    call: str
    message: str
    where: str = ""
    #: the calls of this example up to the finding (the reproducer)
    steps: list[str] = field(default_factory=list)

    def line(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.kind}: {self.call}: {self.message}{at}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What makes two findings the same one: kind, call, the error's first word, site."""
        return (self.kind, self.call, self.message.split(" (")[0][:120], self.where)


def _distinct(findings: list[Finding], limit: int) -> list[str]:
    """One line per distinct finding (the first example of each), most frequent first."""
    counts = Counter(f.key for f in findings)
    first: dict[tuple[str, str, str, str], Finding] = {}
    for f in findings:
        first.setdefault(f.key, f)
    return [f"  {n}x {first[k].line()}" for k, n in counts.most_common(limit)]


@dataclass
class SoakStats:
    #: told how far the fuzzing got, now and then (a long soak on stderr)
    progress: Callable[[str], None] | None = None
    calls: int = 0
    examples: int = 0
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    internal: list[Finding] = field(default_factory=list)
    unlisted: list[Finding] = field(default_factory=list)
    oracle: list[Finding] = field(default_factory=list)
    #: oracle failures that are a profile's real kernel behaviour (a bundled scenario declares it)
    known: list[Finding] = field(default_factory=list)


def _known_behaviour(profile: str, failure: Failure) -> str | None:
    """The kernel reference if `failure` is what `profile`'s kernel really does: a bundled scenario
    declares it as that profile's known behaviour (e.g. 6.10 PAGE.ADDs a page twice: the populate
    -EEXIST check came in 6.11). Such a failure is no finding of the soak."""
    from .scenarios import REGISTRY, load_bundled

    load_bundled()
    for spec in REGISTRY.values():
        known = (getattr(spec.fn, "scenario_known", None) or {}).get(profile)
        for k in known if isinstance(known, (tuple, list)) else (known,) if known else ():
            if k.matches(failure):
                return f"known {profile} kernel behaviour: {k}"
    return None


def _site(e: BaseException) -> str:
    try:
        return model_site(e)
    except Exception:  # noqa: BLE001 - best effort for the report
        tb = traceback.extract_tb(e.__traceback__)
        return f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"


# --------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------

_VM_TYPES = (
    uapi.KVM_X86_DEFAULT_VM,
    uapi.KVM_X86_SW_PROTECTED_VM,
    uapi.KVM_X86_SEV_VM,
    uapi.KVM_X86_SEV_ES_VM,
    uapi.KVM_X86_SNP_VM,
    uapi.KVM_X86_TDX_VM,
)
#: the TDX shared bit of a GPAW-48 TD (kvm-coco.md 1.4): private GPAs are below it
_TDX_SHARED = 1 << 47
_WRAP = (1 << 64) - PAGE


def _machine_class() -> type:
    """The RuleBasedStateMachine class (built on first use: Hypothesis is imported only by soak)."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

    pages = st.integers(0, 32).map(lambda n: n * PAGE)

    def mostly(valid: Any, *edges: int) -> Any:
        """Four draws in five from `valid` (they get deep into the state), the rest at the edges."""
        # (one_of() would merge repeated branches: the weight has to come from a draw)
        edge = st.sampled_from(edges)
        return st.integers(0, 4).flatmap(lambda i: valid if i else edge)

    _edges = (1, PAGE - 1, PAGE + 1, _WRAP, U64_MAX, 1 << 63, -PAGE, -1, 1 << 64, (1 << 64) + PAGE)
    #: ("slot", pick, page): a page of one of the VM's memslots, resolved when the rule runs
    in_slot = st.tuples(st.just("slot"), st.integers(0, 63), st.integers(0, 16))
    gpas = mostly(st.one_of(pages, in_slot), *_edges, _TDX_SHARED, _TDX_SHARED + PAGE, 1 << 52, 0x100000)
    small_sizes = st.integers(1, 16).map(lambda n: n * PAGE)
    #: sizes that may wrap or fail alignment, but never ask for a huge amount of real work
    sizes = mostly(small_sizes, 0, 1, PAGE - 1, PAGE + 1, _WRAP, U64_MAX, 1 << 63, -PAGE, 1 << 64)
    flags64 = mostly(st.just(0), 1, 2, 4, 1 << 31, 1 << 63, -1, 1 << 64)
    picks = st.integers(0, 63)
    hvas = mostly(
        st.tuples(picks, st.integers(0, 8).map(lambda n: n * PAGE)),
        0,
        1,
        PAGE,
        1 << 46,
        (1 << 47) - PAGE,
        1 << 47,
        _WRAP,
        -PAGE,
        1 << 64,
    )
    wrongs = st.sampled_from([0.0, 4096.0, "0", None, (0, 4096, 0), b"\0" * 8, [0]])

    class UapiMachine(RuleBasedStateMachine):
        """Every public ioctl-shaped call, on the objects earlier calls made."""

        stats: SoakStats
        profiles: tuple[str, ...] = ("6.18",)
        data_probs: dict[str, float] = {}  # noqa: RUF012 - set per run, read only
        budget: int = 0
        bugs: tuple[str, ...] = ()

        def __init__(self) -> None:
            super().__init__()
            self.session: Session | None = None
            self.vms: list[Any] = []
            self.vcpus: list[Any] = []
            self.gmems: list[Any] = []
            self.hvas: list[int] = []
            self.steps: list[str] = []
            type(self).stats.examples += 1

        # -- plumbing --------------------------------------------------------------------------
        @property
        def done(self) -> bool:
            return self.session is None or not self.session.alive or self.stats.calls >= self.budget

        def _pick(self, items: list[Any], i: int) -> Any:
            return items[i % len(items)] if items else None

        def _pick_vm(self, i: int, vm_type: int) -> Any:
            """Mostly a VM of `vm_type` (where a command belongs), else any VM (the wrong type)."""
            fits = [vm for vm in self.vms if vm.type == vm_type]
            return self._pick(fits if fits and i % 8 < 6 else self.vms, i // 8 if fits else i)

        def _pick_vcpu(self, i: int, vm_type: int) -> Any:
            fits = [v for v in self.vcpus if v.vm.type == vm_type]
            return self._pick(fits if fits and i % 8 < 6 else self.vcpus, i // 8 if fits else i)

        def _gpa(self, spec: Any, vm: Any) -> int:
            if not isinstance(spec, tuple):
                return int(spec)
            _tag, i, page = spec
            slots = [slot for memslots in vm.memslots for slot in memslots.by_id.values()] if vm is not None else []
            slot = self._pick(sorted(slots, key=lambda m: (m.as_id, m.id)), i)
            if slot is None:
                return page * PAGE
            return (slot.base_gfn + page % max(slot.npages, 1)) * PAGE

        def _hva(self, spec: Any) -> int:
            if isinstance(spec, tuple):
                base = self._pick(self.hvas, spec[0])
                return (base if base is not None else 0x7F0000000000) + spec[1]
            return int(spec)

        def _do(self, name: str, make: Callable[[], Awaitable[Any]], what: str, *, wrong_type: bool = False) -> Any:
            stats = self.stats
            assert self.session is not None
            stats.calls += 1
            if stats.progress is not None and stats.calls % 10_000 == 0:
                stats.progress(f"{stats.calls} calls")
            self.steps.append(f"{name}({what})")
            out = self.session.call(make)
            tally = stats.outcomes[name]
            if out.ended is not None:
                self._ended(name, out.ended)
                return None
            e = out.exc
            if e is None:
                tally[OK] += 1
                if wrong_type:
                    stats.internal.append(
                        Finding("no TypeError", name, f"a wrong Python type was accepted ({what})", "", self._steps())
                    )
                return out.value
            if isinstance(e, TypeError) and wrong_type:
                tally[TYPE_ERROR] += 1
            elif isinstance(e, KvmError) and not wrong_type:
                tally[e.name] += 1
                if e.errno not in ALLOWED[name]:
                    stats.unlisted.append(
                        Finding("unlisted errno", name, f"{e} ({what}); the spec lists "
                                f"{', '.join(sorted(uapi.errno_name(x) for x in ALLOWED[name])) or 'none'}",
                                _site(e), self._steps())
                    )  # fmt: skip
            elif type(e).__name__ == "SigBus" and name in ("mm.read", "mm.write") and not wrong_type:
                tally[SIGBUS] += 1
            elif wrong_type:
                tally[type(e).__name__] += 1
                message = f"a wrong Python type gave {type(e).__name__}: {e} ({what})"
                stats.internal.append(Finding("no TypeError", name, message, _site(e), self._steps()))
            else:
                tally[type(e).__name__] += 1
                stats.internal.append(Finding(type(e).__name__, name, f"{e} ({what})", _site(e), self._steps()))
            return None

        def _steps(self) -> list[str]:
            return list(self.steps[-40:])

        def _ended(self, name: str, result: ExecutionResult) -> None:
            failure = result.failure
            if failure is None:
                return
            self._failure_finding(name, failure)

        def _failure_finding(self, name: str, failure: Failure) -> None:
            where = str(failure.evidence.get("site", "")) if failure.evidence else ""
            kind = "internal exception" if failure.kind == "exception" else f"oracle {failure.kind}"
            finding = Finding(kind, name, f"{failure.signature}: {failure.message}", where, self._steps())
            if failure.kind == "exception":
                self.stats.internal.append(finding)
                return
            assert self.session is not None
            known = _known_behaviour(self.session.profile, failure)
            if known is not None:
                finding.kind, finding.where = f"known {failure.kind}", known
                self.stats.known.append(finding)
                return
            self.stats.oracle.append(finding)

        # -- session ---------------------------------------------------------------------------
        @initialize(seed=st.integers(0, 2**32 - 1), profile_pick=picks)
        def start(self, seed: int, profile_pick: int) -> None:
            if self.stats.calls >= self.budget:
                return
            profile = self.profiles[profile_pick % len(self.profiles)]
            self.session = Session(seed, profile, dict(self.data_probs), bugs=self.bugs)
            self.steps.append(f"Session(seed={seed}, profile={profile!r})")

        def teardown(self) -> None:
            if self.session is None:
                return
            session = self.session
            if session.alive:
                # Close what is still open, so the release paths run under the oracles too.
                for gmem in self.gmems:
                    if gmem.refcount > 0:
                        self._do("gmem.close", gmem.close, "teardown")
            ended_before = not session.alive
            result = session.finish()
            if result.failure is not None and not ended_before:
                self._failure_finding("quiescence", result.failure)

        # -- /dev/kvm and VMs ---------------------------------------------------------------------
        @rule(vm_type=mostly(st.sampled_from(_VM_TYPES), -1, 6, 63, 64, (1 << 32) | 5, 1 << 64))
        def create_vm(self, vm_type: int) -> None:
            if self.done or len(self.vms) >= 4:
                return
            kvm = self.session.kvm  # type: ignore[union-attr]
            vm = self._do("kvm.create_vm", lambda: kvm.create_vm(vm_type), f"{vm_type}")
            if vm is not None:
                self.vms.append(vm)

        @rule(cap=st.sampled_from([0, 3, 9, 10, 66, 207, 231, 232, 233, 234, 235, 236, 244, -1, 1 << 40]), pick=picks)
        def check_extension(self, cap: int, pick: int) -> None:
            if self.done:
                return
            vm = self._pick(self.vms, pick)
            kvm = self.session.kvm  # type: ignore[union-attr]

            async def kvm_cap() -> int:
                return int(kvm.check_extension(cap))

            async def vm_cap() -> int:
                return int(vm.check_extension(cap))

            self._do("kvm.check_extension", kvm_cap, f"{cap}")
            if vm is not None:
                self._do("vm.check_extension", vm_cap, f"{cap}")

        @rule(pick=picks, vcpu_id=mostly(st.integers(0, 3), -1, 4095, 4096, 1 << 32))
        def create_vcpu(self, pick: int, vcpu_id: int) -> None:
            vm = self._pick(self.vms, pick)
            if self.done or vm is None or len(self.vcpus) >= 6:
                return
            vcpu = self._do("vm.create_vcpu", lambda: vm.create_vcpu(vcpu_id), f"{vm}, {vcpu_id}")
            if vcpu is not None:
                self.vcpus.append(vcpu)

        @rule(
            pick=picks,
            size=mostly(st.integers(1, 64).map(lambda n: n * PAGE), 0, 1, 1 << 40, _WRAP, 1 << 63, -PAGE, 1 << 64),
            flags=mostly(st.sampled_from([0, 0, 1, 2, 3]), 4, 1 << 63, -1),
            as_struct=st.booleans(),
        )
        def create_guest_memfd(self, pick: int, size: int, flags: int, as_struct: bool) -> None:
            vm = self._pick(self.vms, pick)
            if self.done or vm is None or len(self.gmems) >= 6:
                return
            if as_struct:
                args = uapi.CreateGuestMemfd(size, flags)
                gmem = self._do("vm.create_guest_memfd", lambda: vm.create_guest_memfd(args), f"{vm}, {args}")
            else:
                gmem = self._do(
                    "vm.create_guest_memfd", lambda: vm.create_guest_memfd(size=size, flags=flags), f"{vm}, {size}"
                )
            if gmem is not None:
                self.gmems.append(gmem)

        @rule(
            pick=picks,
            slot=mostly(st.integers(0, 3), 1 << 16, (1 << 16) | 1, 2 << 16, 32764, 32767, 0xFFFF, -1),
            flags=mostly(st.sampled_from([0, uapi.KVM_MEM_GUEST_MEMFD, 1]), 2, 3, 6, 8, -1),
            gpa=gpas,
            size=st.one_of(st.just(0), sizes, st.just((uapi.KVM_MEM_MAX_NR_PAGES + 1) * PAGE)),
            hva=hvas,
            gmem_pick=mostly(picks, -1, -2, -3),
            offset=mostly(pages, 1, -PAGE, _WRAP, 1 << 63),
            v1=st.integers(0, 7),
        )
        def set_user_memory_region(
            self, pick: int, slot: int, flags: int, gpa: int, size: int, hva: Any, gmem_pick: int, offset: int, v1: int
        ) -> None:
            vm = self._pick(self.vms, pick)
            if self.done or vm is None:
                return
            userspace_addr = self._hva(hva)
            if v1 == 0:
                r1 = uapi.UserspaceMemoryRegion(slot, flags, self._gpa(gpa, vm), size, userspace_addr)
                self._do("vm.set_user_memory_region", lambda: vm.set_user_memory_region(r1), f"{vm}, {r1}")
                return
            fd: object = (
                {-1: None, -2: 3, -3: vm}.get(gmem_pick) if gmem_pick < 0 else self._pick(self.gmems, gmem_pick)
            )
            r2 = uapi.UserspaceMemoryRegion2(slot, flags, self._gpa(gpa, vm), size, userspace_addr, offset, fd)
            self._do("vm.set_user_memory_region2", lambda: vm.set_user_memory_region2(r2), f"{vm}, {r2}")

        @rule(
            pick=picks,
            address=gpas,
            size=sizes,
            attributes=mostly(st.sampled_from([uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0]), 1, -1, 1 << 63),
            flags=flags64,
        )
        def set_memory_attributes(self, pick: int, address: int, size: int, attributes: int, flags: int) -> None:
            vm = self._pick(self.vms, pick)
            if self.done or vm is None:
                return
            a = uapi.MemoryAttributes(self._gpa(address, vm), size, attributes, flags)
            self._do("vm.set_memory_attributes", lambda: vm.set_memory_attributes(a), f"{vm}, {a}")

        @rule(
            type_pick=st.sampled_from(_VM_TYPES[:2] + _VM_TYPES[4:]), npages=st.integers(1, 16), base=st.integers(0, 8)
        )
        def build_guest(self, type_pick: int, npages: int, base: int) -> None:
            """A coherent guest in one go (VM, backing, memslot, private attributes, vCPU, launch
            start), so the other rules also act on the states a real VMM reaches."""
            if self.done or len(self.vms) >= 4:
                return
            kvm = self.session.kvm  # type: ignore[union-attr]
            size, gpa = npages * PAGE, base * 16 * PAGE
            vm = self._do("kvm.create_vm", lambda: kvm.create_vm(type_pick), f"{type_pick}")
            if vm is None:
                return
            self.vms.append(vm)

            async def do_mmap() -> int:
                return int(kvm.mm.mmap(size))

            hva = self._do("mm.mmap", do_mmap, f"{size}")
            if hva is None:
                return
            self.hvas.append(hva)
            private = type_pick != uapi.KVM_X86_DEFAULT_VM
            gmem = None
            if private:
                gmem = self._do("vm.create_guest_memfd", lambda: vm.create_guest_memfd(size=size), f"{vm}, {size}")
                if gmem is None:
                    return
                self.gmems.append(gmem)
            if type_pick == uapi.KVM_X86_TDX_VM:
                self._do("vm.tdx_init_vm", lambda: vm.tdx_init_vm(), f"{vm}")
            flags = uapi.KVM_MEM_GUEST_MEMFD if private else 0
            region = uapi.UserspaceMemoryRegion2(len(self.vms), flags, gpa, size, hva, 0, gmem)
            self._do("vm.set_user_memory_region2", lambda: vm.set_user_memory_region2(region), f"{vm}, {region}")
            if private:
                attrs = uapi.MemoryAttributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
                self._do("vm.set_memory_attributes", lambda: vm.set_memory_attributes(attrs), f"{vm}, {attrs}")
            vcpu = self._do("vm.create_vcpu", lambda: vm.create_vcpu(0), f"{vm}, 0")
            if vcpu is not None:
                self.vcpus.append(vcpu)
                if type_pick == uapi.KVM_X86_TDX_VM:
                    self._do("vcpu.tdx_init_vcpu", lambda: vcpu.tdx_init_vcpu(), f"{vcpu}")
            if type_pick == uapi.KVM_X86_SNP_VM:
                start = uapi.SevSnpLaunchStart(0x30000)
                self._do("vm.snp_launch_start", lambda: vm.snp_launch_start(start), f"{vm}, {start}")

        # -- guest_memfd ------------------------------------------------------------------------
        @rule(
            pick=picks,
            mode=st.sampled_from(
                [
                    uapi.FALLOC_FL_KEEP_SIZE,
                    uapi.FALLOC_FL_KEEP_SIZE,
                    uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE,
                    uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE,
                    0,
                    uapi.FALLOC_FL_PUNCH_HOLE,
                    uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_ZERO_RANGE,
                    0x100,
                    -1,
                    1 << 32 | uapi.FALLOC_FL_KEEP_SIZE,
                ]
            ),
            offset=mostly(st.integers(0, 8).map(lambda n: n * PAGE), 1, -PAGE, 1 << 62, 1 << 63, _WRAP),
            length=mostly(st.integers(1, 8).map(lambda n: n * PAGE), 0, 1, 1 << 62, (1 << 63) - PAGE, -PAGE, U64_MAX),
        )
        def fallocate(self, pick: int, mode: int, offset: int, length: int) -> None:
            gmem = self._pick(self.gmems, pick)
            if self.done or gmem is None:
                return
            if mode & uapi.FALLOC_FL_PUNCH_HOLE == 0 and uapi.s64(length) > 64 * PAGE:
                length = 64 * PAGE  # an allocation that big is real work, not a boundary
            self._do(
                "gmem.fallocate", lambda: gmem.fallocate(mode, offset, length), f"{gmem}, {mode}, {offset}, {length}"
            )

        @rule(
            pick=picks,
            offset=mostly(st.integers(0, 8).map(lambda n: n * PAGE), 1, -PAGE, _WRAP, 1 << 63),
            size=sizes,
            attributes=mostly(st.sampled_from([uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0]), 1, -1),
            flags=flags64,
        )
        def set_memory_attributes2(self, pick: int, offset: int, size: int, attributes: int, flags: int) -> None:
            gmem = self._pick(self.gmems, pick)
            if self.done or gmem is None or not hasattr(gmem, "set_memory_attributes2"):
                return
            a = uapi.MemoryAttributes2(offset, size, attributes, flags)
            self._do("gmem.set_memory_attributes2", lambda: gmem.set_memory_attributes2(a), f"{gmem}, {a}")

        @rule(pick=picks)
        def close_gmem(self, pick: int) -> None:
            gmem = self._pick(self.gmems, pick)
            if self.done or gmem is None:
                return
            self._do("gmem.close", gmem.close, f"{gmem}")

        # -- vCPU ioctls -------------------------------------------------------------------------
        @rule(pick=picks, gpa=gpas, size=sizes, flags=flags64)
        def pre_fault_memory(self, pick: int, gpa: int, size: int, flags: int) -> None:
            vcpu = self._pick(self.vcpus, pick)
            if self.done or vcpu is None:
                return
            r = uapi.PreFaultMemory(self._gpa(gpa, vcpu.vm), size, flags)
            self._do("vcpu.pre_fault_memory", lambda: vcpu.pre_fault_memory(r), f"{vcpu}, {r}")

        @rule(
            pick=picks,
            program=st.lists(
                st.tuples(st.sampled_from(["read", "write"]), gpas, st.sampled_from([None, True, False])), max_size=4
            ),
        )
        def run(self, pick: int, program: list[tuple[str, Any, bool | None]]) -> None:
            from ..kvm.vcpu import GuestAccess

            vcpu = self._pick(self.vcpus, pick)
            if self.done or vcpu is None:
                return
            accesses = [
                GuestAccess.read(u64, 8, private) if op == "read" else GuestAccess.write(u64, b"soak", private)
                for op, gpa, private in program
                for u64 in [uapi.u64(self._gpa(gpa, vcpu.vm))]
            ]

            async def run() -> Any:
                if vcpu.pc >= len(vcpu.program):
                    vcpu.load_program(accesses)
                return await vcpu.run()

            self._do("vcpu.run", run, f"{vcpu}, {program}")

        # -- TDX ---------------------------------------------------------------------------------
        @rule(pick=picks, flags=flags64, nent=st.sampled_from([0, 0, 1, 256, 257]), reserved=st.booleans())
        def tdx_init_vm(self, pick: int, flags: int, nent: int, reserved: bool) -> None:
            vm = self._pick_vm(pick, uapi.KVM_X86_TDX_VM)
            if self.done or vm is None:
                return
            flags = uapi.u32(flags)  # a __u32 field of struct kvm_tdx_cmd
            params = uapi.TdxInitVm(cpuid=uapi.Cpuid2(nent), reserved=(1,) + (0,) * 11 if reserved else (0,) * 12)
            self._do("vm.tdx_init_vm", lambda: vm.tdx_init_vm(params, flags=flags), f"{vm}, flags={flags}, nent={nent}")

        @rule(pick=picks, data=st.sampled_from([0, 1, U64_MAX]), flags=flags64)
        def tdx_init_vcpu(self, pick: int, data: int, flags: int) -> None:
            vcpu = self._pick_vcpu(pick, uapi.KVM_X86_TDX_VM)
            if self.done or vcpu is None:
                return
            flags, data = uapi.u32(flags), uapi.u64(data)
            self._do("vcpu.tdx_init_vcpu", lambda: vcpu.tdx_init_vcpu(data, flags=flags), f"{vcpu}, {data}, {flags}")

        @rule(
            pick=picks,
            source=hvas,
            gpa=gpas,
            nr_pages=mostly(st.integers(0, 8), 1 << 52, U64_MAX, 1 << 35, -1),
            flags=mostly(st.sampled_from([0, uapi.KVM_TDX_MEASURE_MEMORY_REGION]), 2, 1 << 31),
        )
        def tdx_init_mem_region(self, pick: int, source: Any, gpa: int, nr_pages: int, flags: int) -> None:
            vcpu = self._pick_vcpu(pick, uapi.KVM_X86_TDX_VM)
            if self.done or vcpu is None:
                return
            r = uapi.TdxInitMemRegion(self._hva(source), self._gpa(gpa, vcpu.vm), nr_pages)
            self._do(
                "vcpu.tdx_init_mem_region", lambda: vcpu.tdx_init_mem_region(r, flags), f"{vcpu}, {r}, flags={flags}"
            )

        @rule(pick=picks, nent=st.sampled_from([0, 1, 2, 256]))
        def tdx_get_cpuid(self, pick: int, nent: int) -> None:
            vcpu = self._pick_vcpu(pick, uapi.KVM_X86_TDX_VM)
            if self.done or vcpu is None:
                return
            cpuid = uapi.Cpuid2(nent)
            self._do("vcpu.tdx_get_cpuid", lambda: vcpu.tdx_get_cpuid(cpuid), f"{vcpu}, nent={nent}")

        @rule(pick=picks, flags=flags64)
        def tdx_finalize_vm(self, pick: int, flags: int) -> None:
            vm = self._pick_vm(pick, uapi.KVM_X86_TDX_VM)
            if self.done or vm is None:
                return
            flags = uapi.u32(flags)
            self._do("vm.tdx_finalize_vm", lambda: vm.tdx_finalize_vm(flags=flags), f"{vm}, flags={flags}")

        # -- SEV-SNP -----------------------------------------------------------------------------
        @rule(
            pick=picks,
            policy=st.sampled_from([0x30000, 0x30000, 0x20000, 0, 1 << 17, 1 << 63, -1]),
            flags=st.sampled_from([0, 0, 1, 0xFFFF]),
        )
        def snp_launch_start(self, pick: int, policy: int, flags: int) -> None:
            vm = self._pick_vm(pick, uapi.KVM_X86_SNP_VM)
            if self.done or vm is None:
                return
            p = uapi.SevSnpLaunchStart(policy, flags=flags)
            self._do("vm.snp_launch_start", lambda: vm.snp_launch_start(p), f"{vm}, {p}")

        @rule(
            pick=picks,
            gfn=mostly(in_slot, 0, 1, 1 << 40, U64_MAX >> 12, -1, 1 << 64),
            uaddr=hvas,
            length=mostly(small_sizes, 0, 1, 1 << 40, _WRAP, -PAGE),
            page_type=mostly(st.sampled_from([1, 3, 4, 5, 6]), 0, 2, 7, 255),
            flags=mostly(st.just(0), 1, 0xFFFF),
        )
        def snp_launch_update(self, pick: int, gfn: int, uaddr: Any, length: int, page_type: int, flags: int) -> None:
            vm = self._pick_vm(pick, uapi.KVM_X86_SNP_VM)
            if self.done or vm is None:
                return
            p = uapi.SevSnpLaunchUpdate(
                self._gpa(gfn, vm) >> 12 if isinstance(gfn, tuple) else gfn,
                self._hva(uaddr),
                length,
                page_type,
                flags=flags,
            )
            self._do("vm.snp_launch_update", lambda: vm.snp_launch_update(p), f"{vm}, {p}")

        @rule(pick=picks, flags=st.sampled_from([0, 0, 1]))
        def snp_launch_finish(self, pick: int, flags: int) -> None:
            vm = self._pick_vm(pick, uapi.KVM_X86_SNP_VM)
            if self.done or vm is None:
                return
            p = uapi.SevSnpLaunchFinish(flags=flags)
            self._do("vm.snp_launch_finish", lambda: vm.snp_launch_finish(p), f"{vm}, flags={flags}")

        # -- the VMM's address space -------------------------------------------------------------
        @rule(
            length=mostly(small_sizes, 0, 1, -1, 1 << 30, 1 << 64),
            page_size=st.sampled_from([PAGE, PAGE, 512 * PAGE, 3 * PAGE]),
            file=st.one_of(st.none(), st.tuples(picks, mostly(pages, 1, -PAGE, 1 << 62), st.booleans())),
        )
        def mmap(self, length: int, page_size: int, file: tuple[int, int, bool] | None) -> None:
            """Anonymous memory, or a guest_memfd (MAP_SHARED or not) at an offset."""
            if self.done or len(self.hvas) >= 8:
                return
            mm = self.session.kvm.mm  # type: ignore[union-attr]
            gmem = self._pick(self.gmems, file[0]) if file is not None else None

            async def do_mmap() -> int:
                if gmem is None or file is None:
                    return int(mm.mmap(length, page_size=page_size))
                return int(mm.mmap(length, fd=gmem, offset=file[1], shared=file[2]))

            what = f"{length}, page_size={page_size}" if gmem is None else f"{length}, fd={gmem}, file={file}"
            addr = self._do("mm.mmap", do_mmap, what)
            if addr is not None:
                self.hvas.append(addr)

        @rule(
            op=st.sampled_from(["munmap", "madvise", "madvise", "read", "write"]),
            addr=hvas,
            length=mostly(small_sizes, 0, 1, -PAGE, 1 << 64),
            advice=st.sampled_from(
                [uapi.MADV_DONTNEED, uapi.MADV_DONTNEED, uapi.MADV_REMOVE, uapi.MADV_FREE, uapi.MADV_WILLNEED, 7, -1]
            ),
        )
        def mm_op(self, op: str, addr: Any, length: int, advice: int) -> None:
            if self.done:
                return
            mm = self.session.kvm.mm  # type: ignore[union-attr]
            a = self._hva(addr)
            n = min(length, 4 * PAGE)  # a load or store of that much is the same boundary
            if op == "munmap":
                self._do("mm.munmap", lambda: mm.munmap(a, length), f"{a:#x}, {length}")
            elif op == "madvise":
                self._do("mm.madvise", lambda: mm.madvise(a, length, advice), f"{a:#x}, {length}, {advice}")
            elif op == "read":
                self._do("mm.read", lambda: mm.read(a, n), f"{a:#x}, {n}")
            else:
                self._do("mm.write", lambda: mm.write(a, b"\xa5" * max(n, 0)), f"{a:#x}, {n}")

        # -- the wrong Python type, anywhere -----------------------------------------------------
        @rule(target_pick=st.integers(0, 24), bad=wrongs, pick=picks)
        def wrong_type(self, target_pick: int, bad: Any, pick: int) -> None:
            if self.done:
                return
            kvm = self.session.kvm  # type: ignore[union-attr]
            vm, vcpu, gmem = self._pick(self.vms, pick), self._pick(self.vcpus, pick), self._pick(self.gmems, pick)
            mm = kvm.mm

            async def sync(fn: Callable[[], Any]) -> Any:
                return fn()

            calls: list[tuple[str, Callable[[], Awaitable[Any]] | None]] = [
                ("kvm.create_vm", lambda: kvm.create_vm(bad)),
                ("vm.create_vcpu", vm and (lambda: vm.create_vcpu(bad))),
                ("vm.create_guest_memfd", vm and (lambda: vm.create_guest_memfd(size=bad))),
                ("vm.set_user_memory_region2", vm and (lambda: vm.set_user_memory_region2(bad))),
                ("vm.set_user_memory_region", vm and (lambda: vm.set_user_memory_region(bad))),
                ("vm.set_memory_attributes", vm and (lambda: vm.set_memory_attributes(bad))),
                ("gmem.fallocate", gmem and (lambda: gmem.fallocate(bad, 0, PAGE))),
                ("vcpu.pre_fault_memory", vcpu and (lambda: vcpu.pre_fault_memory(bad))),
                ("vcpu.tdx_init_mem_region", vcpu and (lambda: vcpu.tdx_init_mem_region(bad))),
                ("vm.tdx_finalize_vm", vm and (lambda: vm.tdx_finalize_vm(flags=bad))),
                ("vm.snp_launch_start", vm and (lambda: vm.snp_launch_start(bad))),
                ("vm.snp_launch_update", vm and (lambda: vm.snp_launch_update(bad))),
                ("mm.munmap", lambda: mm.munmap(bad, PAGE)),
                ("mm.madvise", lambda: mm.madvise(0, PAGE, bad)),
                ("mm.read", lambda: mm.read(bad, 8)),
                ("mm.write", lambda: mm.write(0x7F0000000000, bad if not isinstance(bad, bytes) else 1.5)),
                ("mm.mmap", lambda: sync(lambda: mm.mmap(bad))),
                ("kvm.check_extension", lambda: sync(lambda: kvm.check_extension(bad))),
                ("vm.check_extension", vm and (lambda: sync(lambda: vm.check_extension(bad)))),
                ("vm.tdx_init_vm", vm and (lambda: vm.tdx_init_vm(bad))),
                ("vm.snp_launch_finish", vm and (lambda: vm.snp_launch_finish(bad))),
                ("vcpu.tdx_init_vcpu", vcpu and (lambda: vcpu.tdx_init_vcpu(bad))),
                ("vcpu.tdx_get_cpuid", vcpu and (lambda: vcpu.tdx_get_cpuid(bad))),
                ("gmem.set_memory_attributes2", gmem and (lambda: gmem.set_memory_attributes2(bad))),
            ]
            name, make = calls[target_pick % len(calls)]
            if make is None or (bad is None and name in ("vm.tdx_init_vm", "vm.snp_launch_finish")):
                return
            self._do(name, make, f"{bad!r}", wrong_type=True)

    return UapiMachine


def run_fuzz(
    calls: int,
    seed: int,
    *,
    profiles: Iterable[str] = ("6.18",),
    steps_per_example: int = 50,
    data_probs: dict[str, float] | None = None,
    machine: type | None = None,
    progress: Callable[[str], None] | None = None,
    bugs: tuple[str, ...] = (),
) -> SoakStats:
    """Run the state machine until `calls` calls were made; Hypothesis examples of
    `steps_per_example` rules each, seeded from `seed`."""
    from hypothesis import configuration

    stats = SoakStats(progress=progress)
    # Hypothesis caches what it learns in .hypothesis/ of the current directory; a soak keeps
    # nothing between runs (database=None), so it leaves nothing behind in the user's folder either.
    previous_home = getattr(configuration, "__hypothesis_home_directory", None)
    with tempfile.TemporaryDirectory(prefix="asyncvm-soak-hypothesis-") as home:
        configuration.set_hypothesis_home_dir(home)
        try:
            _fuzz_batches(stats, calls, seed, profiles, steps_per_example, data_probs, machine, bugs)
        finally:
            configuration.set_hypothesis_home_dir(previous_home)
    return stats


def _fuzz_batches(
    stats: SoakStats,
    calls: int,
    seed: int,
    profiles: Iterable[str],
    steps_per_example: int,
    data_probs: dict[str, float] | None,
    machine: type | None,
    bugs: tuple[str, ...],
) -> None:
    """Hypothesis runs of the machine, each seeded anew, until `calls` calls were made."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.stateful import run_state_machine_as_test

    base = machine or _machine_class()
    probs = {"signal": 0.02, "fatal_signal": 0.002, "alloc_fail": 0.002, **(data_probs or {})}
    batch = idle = 0
    while stats.calls < calls:
        cls = type(
            f"UapiSoak{batch}",
            (base,),
            {"stats": stats, "profiles": tuple(profiles), "data_probs": probs, "budget": calls, "bugs": bugs},
        )
        hypothesis_seed(seed * 1_000_003 + batch)(cls)
        remaining = calls - stats.calls
        config = settings(
            # at least a few: the first example Hypothesis tries can be the empty one
            max_examples=max(10, min(1000, remaining // max(1, steps_per_example // 2) + 1)),
            stateful_step_count=steps_per_example,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        before = stats.calls
        run_state_machine_as_test(cls, settings=config)
        batch += 1
        idle = idle + 1 if stats.calls == before else 0
        if idle >= 3:  # pragma: no cover - the machine makes no calls any more: do not spin
            break


# --------------------------------------------------------------------------------------------------
# Replay audit
# --------------------------------------------------------------------------------------------------


def event_hash(result: ExecutionResult) -> str:
    """SHA-256 of the event log as ``events.jsonl`` writes it."""
    from ..trace.log import render_jsonl

    return hashlib.sha256(render_jsonl(result.events()).encode()).hexdigest()


@dataclass
class ReplayStats:
    replays: int = 0
    subprocess_replays: int = 0
    failing_schedules: int = 0
    scenarios: int = 0
    divergences: list[str] = field(default_factory=list)


def _audit_programs(limit_bugs: bool = True) -> list[Any]:
    """One clean program per bundled scenario, and one per bug that scenario reproduces."""
    from ..bugs import BUGS
    from .engine import Program
    from .scenarios import REGISTRY, load_bundled

    load_bundled()
    programs = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        programs.append(Program(spec.fn, dict(spec.params)))
        for bug in BUGS.values():
            if getattr(bug, "scenario", None) == name:
                profile = getattr(bug, "profile", None) or "6.18"
                programs.append(Program(spec.fn, dict(spec.params), profile, (bug.name,)))
    return programs


def collect_schedules(count: int, seed: int, programs: list[Any] | None = None) -> list[tuple[Any, str, Any]]:
    """`count` schedules, spread over the programs (default: the audit programs) and three
    strategies: each with the event-log hash of its first (recorded) run, and its scenario."""
    from ..runtime.strategies import make_strategy
    from .engine import calibrate_steps
    from .schedule import Schedule

    programs = programs if programs is not None else _audit_programs()
    strategies = ("random", "pct", "pos")
    steps = {i: calibrate_steps(p, seed) for i, p in enumerate(programs)}
    out: list[tuple[Any, str, Any]] = []
    i = 0
    while len(out) < count:
        k = i % len(programs)
        program = programs[k]
        name = strategies[(i // len(programs)) % len(strategies)]
        strategy = make_strategy(name, seed + i, steps=steps[k])
        strategy.new_execution(0)
        result = program.run(strategy, record=True)
        schedule = Schedule.from_execution(program, result, strategy={"name": name}, seed=seed + i, execution=0)
        out.append((schedule, event_hash(result), program.scenario))
        i += 1
    return out


def replay_hash(schedule: Any, scenario: Any = None) -> str:
    """The event-log hash of replaying `schedule` (its scenario looked up by name if not given)."""
    from .engine import replay

    return event_hash(replay(schedule, scenario or schedule.scenario, force=True, record=True))


def audit_replays(
    count: int,
    seed: int,
    *,
    subprocess_check: bool = True,
    programs: list[Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplayStats:
    """Replay `count` fresh schedules here and in a fresh process with another PYTHONHASHSEED."""
    stats = ReplayStats()
    if count <= 0:
        return stats
    say = progress or (lambda _msg: None)
    say(f"recording {count} schedules")
    schedules = collect_schedules(count, seed, programs)
    say("replaying them in this process")
    stats.scenarios = len({s.scenario for s, _, _ in schedules})
    stats.failing_schedules = sum(1 for s, _, _ in schedules if s.failure is not None)
    for n, (schedule, first, fn) in enumerate(schedules):
        stats.replays += 1
        try:
            again = replay_hash(schedule, fn)
        except Exception as e:  # noqa: BLE001 - a replay that cannot finish diverged
            stats.divergences.append(f"#{n} {schedule.scenario} (same process): {type(e).__name__}: {e}")
            continue
        if again != first:
            stats.divergences.append(f"#{n} {schedule.scenario} (same process): event log hash differs")
    if subprocess_check:
        say("replaying them in a fresh process")
        hashes = _replay_in_subprocess([s for s, _, _ in schedules], seed)
        for n, ((schedule, first, _fn), got) in enumerate(zip(schedules, hashes, strict=True)):
            stats.subprocess_replays += 1
            if got != first:
                stats.divergences.append(f"#{n} {schedule.scenario} (fresh process): {got[:80]}")
    return stats


def _replay_in_subprocess(schedules: list[Any], seed: int) -> list[str]:
    """Hashes of replaying `schedules` in a new interpreter whose PYTHONHASHSEED differs from ours."""
    mine = os.environ.get("PYTHONHASHSEED", "")
    other = str((int(mine) + 1 if mine.isdigit() else seed + 7919) % 4294967296)
    with tempfile.TemporaryDirectory(prefix="asyncvm-soak-") as tmp:
        path = Path(tmp) / "schedules.json"
        path.write_text(json.dumps([s.to_json() for s in schedules]), encoding="utf-8")
        env = {**os.environ, "PYTHONHASHSEED": other}
        proc = subprocess.run(
            [sys.executable, "-m", "asyncvm.explore.soak", "--replay-worker", str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return [f"replay worker exited {proc.returncode}: {reason}"] * len(schedules)
        hashes = json.loads(proc.stdout)
    if len(hashes) != len(schedules):
        return ["replay worker returned the wrong number of hashes"] * len(schedules)
    return [str(h) for h in hashes]


def _replay_worker(path: str) -> None:
    """The fresh process: replay each schedule of `path`, print the hashes as a JSON list."""
    from .scenarios import load_bundled
    from .schedule import Schedule

    load_bundled()
    out: list[str] = []
    for raw in json.loads(Path(path).read_text(encoding="utf-8")):
        try:
            out.append(replay_hash(Schedule.from_json(raw)))
        except Exception as e:  # noqa: BLE001 - reported as that schedule's divergence
            out.append(f"{type(e).__name__}: {e}")
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass
class SoakReport:
    fuzz: SoakStats
    replay: ReplayStats

    @property
    def internal_exceptions(self) -> int:
        return len(self.fuzz.internal)

    @property
    def failed(self) -> bool:
        return bool(self.fuzz.internal or self.fuzz.unlisted or self.fuzz.oracle or self.replay.divergences)

    def lines(self, *, examples: int = 3) -> list[str]:
        f, r = self.fuzz, self.replay
        out = [f"calls made: {f.calls} ({f.examples} Hypothesis examples)"]
        out.append("outcomes per call:")
        width = max((len(n) for n in f.outcomes), default=0)
        for name in sorted(f.outcomes):
            tally = f.outcomes[name]
            errnos = sorted(k for k in tally if k.startswith("E"))
            parts = ", ".join(f"{k} {tally[k]}" for k in sorted(tally, key=lambda k: (-tally[k], k)))
            out.append(f"  {name:<{width}}  {len(errnos)} distinct errnos: {parts}")
        oracles = [x for x in f.oracle if x.kind != "internal exception"]
        for title, found in (
            ("internal exceptions", f.internal),
            ("unlisted errnos", f.unlisted),
            ("oracle failures", oracles),
        ):
            distinct = len({x.key for x in found})
            out.append(f"{title}: {len(found)}" + (f" ({distinct} distinct)" if found else ""))
            out.extend(_distinct(found, examples))
        if f.known:
            out.append(f"known kernel behaviours (not findings): {len(f.known)}")
            out.extend(_distinct(f.known, examples))
        findings = f.internal + f.unlisted + oracles
        if findings and findings[0].steps:
            out.append("  calls of the first finding's example:")
            out.extend(f"    {s}" for s in findings[0].steps)
        out.append(
            f"replays: {r.replays} in this process, {r.subprocess_replays} in a fresh process "
            f"({r.scenarios} scenarios, {r.failing_schedules} failing schedules)"
        )
        out.append(f"divergences: {len(r.divergences)}")
        out.extend(f"  {d}" for d in r.divergences[:examples])
        return out


def soak(
    calls: int,
    replays: int,
    seed: int = 0,
    *,
    profiles: Iterable[str] = ("6.18",),
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """``asyncvm soak``: the fuzzing, then the replay audit."""
    fuzz = run_fuzz(calls, seed, profiles=profiles, progress=progress) if calls > 0 else SoakStats()
    return SoakReport(fuzz, audit_replays(replays, seed, progress=progress))


def soak_command(
    calls: int,
    replays: int,
    seed: int,
    profiles: list[str],
    *,
    echo: Callable[..., Any],
    fail: Callable[[str], Any],
) -> int:
    """What ``asyncvm soak`` does after parsing: check the input, run, print; the exit code."""
    from ..profile import PROFILES

    if calls < 0 or replays < 0:
        fail("--calls and --replays must not be negative")
    if not 0 <= seed < 2**63:
        fail("--seed must be between 0 and 2**63 - 1")
    names = [n.strip() for p in profiles for n in p.split(",") if n.strip()]
    if profiles and not names:
        # an empty --profile names nothing: not a request for the default
        fail("--profile needs a profile name; choose from: " + ", ".join(PROFILES))
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        fail(f"unknown profile {unknown[0]!r}; choose from: {', '.join(PROFILES)}")
    chosen = tuple(names) or tuple(n for n, p in PROFILES.items() if p.kind == "kernel")
    echo(f"asyncvm: soak: {calls} calls on profiles {', '.join(chosen)}, {replays} replays, seed {seed}", err=True)
    report = soak(calls, replays, seed, profiles=chosen, progress=lambda msg: echo(f"asyncvm: soak: {msg}", err=True))
    for line in report.lines():
        echo(line)
    return 1 if report.failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replay-worker":
        _replay_worker(sys.argv[2])
    else:
        print("usage: python -m asyncvm.explore.soak --replay-worker FILE", file=sys.stderr)
        sys.exit(2)
