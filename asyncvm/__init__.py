"""asyncvm: an emulator of the Linux KVM guest-memory paths under a controlled, replayable scheduler."""

__version__ = "0.1.0"

from . import uapi
from .explore import FoundFailure, Report, Schedule, ScheduleError, explore, replay, shrink
from .kvm.kvm import Kvm
from .runtime import TaskGroup
from .runtime.failures import Failure, ReplayDivergence, ToolError, Violation
from .uapi import KvmError

__all__ = [
    "Failure",
    "FoundFailure",
    "Kvm",
    "KvmError",
    "ReplayDivergence",
    "Report",
    "Schedule",
    "ScheduleError",
    "TaskGroup",
    "ToolError",
    "Violation",
    "__version__",
    "explore",
    "replay",
    "shrink",
    "uapi",
]
