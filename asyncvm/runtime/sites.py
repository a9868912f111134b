"""Call sites: where in the model a primitive was called, captured cheaply and formatted once."""

from __future__ import annotations

import sys
from typing import Any

_RUNTIME_DIR = __file__.rsplit("/", 1)[0]
_runtime_files: dict[str, bool] = {}

#: (code object, instruction offset) of a call in model code, or None when unknown
Site = tuple[Any, int] | None


def caller_site() -> Site:
    """(code, instruction offset) of the model code that called a primitive; cheap enough for every
    acquire. The line is worked out only when the site is shown (``f_lineno`` scans the code's
    line table from its start on every read; ``f_lasti`` is a field)."""
    f: Any = sys._getframe(2)
    files = _runtime_files
    while f is not None:
        code = f.f_code
        name = code.co_filename
        inside = files.get(name)
        if inside is None:
            inside = files[name] = name.startswith(_RUNTIME_DIR)
        if not inside:
            return (code, f.f_lasti)
        f = f.f_back
    return None


def _line(code: Any, offset: int) -> int | None:
    """The line of the instruction at `offset` (bytes), as ``frame.f_lineno`` gives it."""
    if offset < 0:
        return int(code.co_firstlineno)
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return int(line) if line is not None else None
    return None


#: formatted sites: each execution's lockdep graph records the same few edges again
_formatted: dict[tuple[Any, int], str] = {}


def fmt_site(site: Site) -> str:
    """``file.py:line (function)``, or ``?``."""
    if site is None:
        return "?"
    text = _formatted.get(site)
    if text is None:
        code, offset = site
        line = _line(code, offset)
        text = _formatted[site] = f"{code.co_filename.rsplit('/', 1)[-1]}:{line} ({code.co_name})"
    return text


def model_site(e: BaseException) -> str:
    """The innermost frame of the failing traceback outside the runtime, as file:function."""
    tb = e.__traceback__
    site = "?"
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith(_RUNTIME_DIR):
            site = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
        tb = tb.tb_next
    return site


def short_site(site: Site) -> str:
    """``file.py:function``: a site that does not move when lines are added (for signatures)."""
    if site is None:
        return "?"
    code = site[0]
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
