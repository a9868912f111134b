"""asyncvm: an emulator of the Linux KVM guest-memory paths under a controlled, replayable scheduler."""

__version__ = "0.1.0"

# Loading x86 fills generic KVM's arch slots; loading check attaches the oracles' probes.
from . import check, runtime, uapi, x86  # noqa: F401
from .explore import (
    CampaignSpec,
    FoundFailure,
    Report,
    Schedule,
    ScheduleError,
    aexplore,
    areplay,
    ashrink,
    explore,
    replay,
    scenario,
    shrink,
)
from .host.mm import SigBus
from .kvm.kvm import Kvm
from .kvm.vcpu import GuestAccess
from .profile import PROFILES, Profile
from .runtime import TaskGroup
from .runtime.failures import Failure, ReplayDivergence, ToolError, Violation
from .uapi import KvmError

__all__ = [
    "PROFILES",
    "CampaignSpec",
    "Failure",
    "FoundFailure",
    "GuestAccess",
    "Kvm",
    "KvmError",
    "Profile",
    "ReplayDivergence",
    "Report",
    "Schedule",
    "ScheduleError",
    "SigBus",
    "TaskGroup",
    "ToolError",
    "Violation",
    "__version__",
    "aexplore",
    "areplay",
    "ashrink",
    "explore",
    "replay",
    "runtime",
    "scenario",
    "shrink",
    "uapi",
]
