"""Event recording and rendering: event dicts, structlog logs, Chrome traces, HTML timelines."""
