"""Schedule files: versioned JSON naming the scenario, its parameters and every recorded choice.

A schedule is data, never code: the scenario is named by its registered name, with the
``--module`` that registered it where it came from one (replay never imports anything the file
names: it tells the user which ``--module`` to give), and the choice stream is a JSON list in which an integer is the
id of the task that ran and a one-element list ``[v]`` is the value a nondeterministic draw took.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from ..runtime.executor import Choice, ExecutionResult
from ..runtime.failures import Failure
from .files import MAX_SCHEDULE_BYTES, FileError, ScheduleModel, non_finite, parse_json, read_text, validate

FORMAT = "asyncvm-schedule"
#: 2: a scheduling point with a single enabled task is no longer a recorded choice
FORMAT_VERSION = 2


class ScheduleError(FileError):
    """A schedule file that cannot be used; the message is one line naming the file and why."""


class Recipe(Protocol):
    """What a schedule records about the program an execution ran: an ``engine.Program``, or the
    schedule an execution was replayed from."""

    @property
    def name(self) -> str: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def profile(self) -> str: ...
    @property
    def bugs(self) -> Sequence[str]: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def data_probs(self) -> Mapping[str, float]: ...
    @property
    def lockdep(self) -> bool: ...
    @property
    def module(self) -> str | None: ...


@dataclass
class Schedule:
    """Everything needed to re-run one execution exactly."""

    scenario: str
    choices: list[Choice]
    params: dict[str, Any] = field(default_factory=dict)
    profile: str = "6.18"
    bugs: list[str] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    execution: int = 0
    tasks: list[str] = field(default_factory=list)
    steps: int = 0
    preemptions: int = 0
    failure: Failure | None = None
    max_steps: int = 200_000
    data_probs: dict[str, float] = field(default_factory=dict)
    #: choice streams of earlier executions that must run first (lockdep edges they contributed)
    prelude: list[list[Choice]] = field(default_factory=list)
    lockdep: bool = True
    #: whether the execution ran the data-race detector (a replay must, to fail the same way)
    detect_races: bool = False
    #: the --module that registered the scenario (a module name or a .py path), as data
    module: str | None = None
    asyncvm_version: str = __version__

    @classmethod
    def from_execution(
        cls,
        program: Recipe,
        result: ExecutionResult,
        *,
        strategy: Mapping[str, Any],
        seed: int,
        execution: int,
        prelude: Iterable[list[Choice]] = (),
    ) -> Schedule:
        """The schedule of one execution of `program` (the one way to build a Schedule)."""
        return cls(
            scenario=program.name,
            params=dict(program.params),
            profile=program.profile,
            bugs=list(program.bugs),
            strategy=dict(strategy),
            seed=seed,
            execution=execution,
            tasks=list(result.task_names),
            steps=result.steps,
            preemptions=result.preemptions,
            failure=result.failure,
            max_steps=program.max_steps,
            data_probs=dict(program.data_probs),
            prelude=[list(p) for p in prelude],
            lockdep=program.lockdep,
            detect_races=bool(getattr(program, "detect_races", False)),
            module=program.module,
            choices=result.choices,
        )

    @property
    def name(self) -> str:
        """The scenario's name (as ``Program.name``), so a schedule is a `Recipe` too."""
        return self.scenario

    @property
    def signature(self) -> str | None:
        return self.failure.signature if self.failure else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "asyncvm": self.asyncvm_version,
            "scenario": {"name": self.scenario, "params": self.params}
            | ({"module": self.module} if self.module else {}),
            "profile": self.profile,
            "bugs": self.bugs,
            "strategy": self.strategy,
            "seed": self.seed,
            "execution": self.execution,
            "max_steps": self.max_steps,
            "data_probs": self.data_probs,
            "lockdep": self.lockdep,
            "detect_races": self.detect_races,
            "tasks": self.tasks,
            "steps": self.steps,
            "preemptions": self.preemptions,
            "failure": self.failure.to_json() if self.failure else None,
            "prelude": [_encode(p) for p in self.prelude],
            "choices": _encode(self.choices),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a reader (or a killed run) never sees half a file."""
        return write_atomic(Path(path), self.dumps() + "\n")

    @classmethod
    def from_json(cls, data: Any, origin: str = "schedule", *, parsed: bool = False) -> Schedule:
        """A schedule from parsed JSON, validated against `files.ScheduleModel` (one-line errors)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ScheduleError(f"{origin}: not an asyncvm schedule file")
        if data.get("version") != FORMAT_VERSION:
            raise ScheduleError(
                f"{origin}: schedule format version {data.get('version')!r} is not supported "
                f"(this asyncvm reads version {FORMAT_VERSION})"
            )
        where = None if parsed else non_finite(data)  # (parse_json checked a file's numbers already)
        if where is not None:
            raise ScheduleError(f"{origin}: malformed schedule: {where}: not a finite number")
        try:
            m = validate(ScheduleModel, data, origin, "schedule")
        except FileError as e:
            raise ScheduleError(str(e)) from None
        return cls(
            scenario=m.scenario.name,
            params=dict(m.scenario.params),
            profile=m.profile,
            bugs=list(m.bugs),
            strategy=dict(m.strategy),
            seed=m.seed,
            execution=m.execution,
            max_steps=m.max_steps,
            data_probs={k: float(v) for k, v in m.data_probs.items()},
            tasks=list(m.tasks),
            steps=m.steps,
            preemptions=m.preemptions,
            failure=None if m.failure is None else Failure.from_json(m.failure.model_dump()),
            prelude=[_decode(p, origin) for p in m.prelude],
            lockdep=m.lockdep,
            detect_races=m.detect_races,
            module=m.scenario.module,
            choices=_decode(m.choices, origin),
            asyncvm_version=m.asyncvm,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schedule:
        """Read a schedule file: size and nesting limits, then the schema (one-line errors)."""
        p = Path(path)
        try:
            data = parse_json(read_text(p, MAX_SCHEDULE_BYTES), str(p))
        except FileError as e:
            raise ScheduleError(str(e)) from None
        return cls.from_json(data, str(p), parsed=True)


def _encode(choices: list[Choice]) -> list[Any]:
    return [c if type(c) is int else [c[0]] for c in choices]  # type: ignore[index]


def _decode(raw: Any, origin: str) -> list[Choice]:
    if not isinstance(raw, list):
        raise ScheduleError(f"{origin}: choices must be a list")
    out: list[Choice] = []
    for i, c in enumerate(raw):
        if type(c) is int and c >= 0:
            out.append(c)
        elif isinstance(c, list) and len(c) == 1 and type(c[0]) is int and c[0] >= 0:
            out.append((c[0],))
        else:
            raise ScheduleError(f"{origin}: choice {i} is {c!r}, expected a task id or [value]")
    return out


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename, with the mode an ordinary
    ``open(path, "w")`` gives (mkstemp's temporary file is private to its owner).

    A path that is not a regular file (/dev/null, /dev/stdout, a FIFO) is written in place: the
    rename would replace the device itself (as root, ``--html /dev/null`` once did)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "w") as f:
            f.write(text)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
