"""Exploring schedules: explore(), replay(), shrink() (and their awaitable forms aexplore(),
areplay(), ashrink()), campaigns and the schedule file format."""

from .awaitable import aexplore, areplay, ashrink
from .campaign import CampaignSpec, FoundFailure, Report
from .driver import explore
from .engine import Program, replay
from .scenarios import REGISTRY, scenario
from .schedule import Schedule, ScheduleError
from .shrink import shrink, shrunk_path

__all__ = [
    "REGISTRY",
    "CampaignSpec",
    "FoundFailure",
    "Program",
    "Report",
    "Schedule",
    "ScheduleError",
    "aexplore",
    "areplay",
    "ashrink",
    "explore",
    "replay",
    "scenario",
    "shrink",
    "shrunk_path",
]
