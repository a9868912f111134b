"""What can go wrong in an execution: oracle violations raised by model code and the Failure record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import traps


class Violation(Exception):
    """An oracle saw the model break a kernel invariant (a bug in the code under test).

    `kind` groups violations (``deadlock``, ``lockdep``, ``stale_spte``, ...); `signature` is the
    stable identity used to deduplicate failures and to check that a shrunk schedule still fails
    the same way, so it must not contain step numbers, pfns or other schedule-dependent values.
    """

    def __init__(self, kind: str, message: str, *, signature: str | None = None, **evidence: Any):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.signature = signature or kind
        self.evidence = evidence
        #: the scheduling step that found it (None outside a controlled execution)
        self.step: int | None = _exe_step()


def _exe_step() -> int | None:
    exe = traps._get_exe()
    return None if exe is None else exe.step


class ToolError(Exception):
    """The tool itself cannot go on (bad schedule file, replay divergence): not a finding."""


class ReplayDivergence(ToolError):
    """A replayed schedule no longer fits the program: the step it broke at is named."""

    def __init__(self, step: int, message: str):
        super().__init__(f"replay diverged at step {step}: {message}")
        self.step = step


@dataclass
class Failure:
    """One failing execution: what broke, where in the schedule, and the evidence."""

    kind: str
    signature: str
    message: str
    step: int
    task: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        where = f" in task {self.task}" if self.task else ""
        return f"{self.kind}{where} at step {self.step}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "signature": self.signature,
            "message": self.message,
            "step": self.step,
            "task": self.task,
            "evidence": {k: _jsonable(v) for k, v in self.evidence.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        return cls(
            kind=str(data["kind"]),
            signature=str(data["signature"]),
            message=str(data["message"]),
            step=int(data["step"]),
            task=data.get("task"),
            evidence=dict(data.get("evidence") or {}),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
