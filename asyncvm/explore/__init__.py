"""Exploring schedules: explore(), replay(), shrink() and the schedule file format."""

from .engine import FoundFailure, Program, Report, explore, replay
from .schedule import Schedule, ScheduleError
from .shrink import shrink, shrunk_path

__all__ = [
    "FoundFailure",
    "Program",
    "Report",
    "Schedule",
    "ScheduleError",
    "explore",
    "replay",
    "shrink",
    "shrunk_path",
]
