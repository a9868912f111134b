"""Call sites: where in the model a primitive was called, captured cheaply and formatted once."""

from __future__ import annotations

import sys
from typing import Any

_RUNTIME_DIR = __file__.rsplit("/", 1)[0]
_runtime_files: dict[str, bool] = {}

#: (code object, line) of a call in model code, or None when unknown
Site = tuple[Any, int] | None


def caller_site() -> Site:
    """(code, line) of the model code that called a primitive; cheap enough for every acquire."""
    f: Any = sys._getframe(2)
    files = _runtime_files
    while f is not None:
        name = f.f_code.co_filename
        inside = files.get(name)
        if inside is None:
            inside = files[name] = name.startswith(_RUNTIME_DIR)
        if not inside:
            return (f.f_code, f.f_lineno)
        f = f.f_back
    return None


#: formatted sites: each execution's lockdep graph records the same few edges again
_formatted: dict[tuple[Any, int], str] = {}


def fmt_site(site: Site) -> str:
    """``file.py:line (function)``, or ``?``."""
    if site is None:
        return "?"
    text = _formatted.get(site)
    if text is None:
        code, line = site
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
