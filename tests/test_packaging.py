"""Packaging for users: a version, ``python -m asyncvm``, PEP 561 types, docstrings (issue 17)."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncvm

ROOT = Path(__file__).resolve().parent.parent
ASYNCVM = ROOT / ".venv" / "bin" / "asyncvm"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_version_agrees_everywhere() -> None:
    installed = importlib.metadata.version("asyncvm")
    assert asyncvm.__version__ == installed
    script = _run(str(ASYNCVM) if ASYNCVM.exists() else "asyncvm", "--version")
    module = _run(sys.executable, "-m", "asyncvm", "--version")
    for proc in (script, module):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"asyncvm {installed}"


def test_python_dash_m_is_the_command() -> None:
    proc = _run(sys.executable, "-m", "asyncvm", "bugs")
    assert proc.returncode == 0, proc.stderr
    assert "drop_invalidate_retry" in proc.stdout
    bad = _run(sys.executable, "-m", "asyncvm", "no-such-command")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_the_package_ships_py_typed() -> None:
    assert (Path(asyncvm.__file__).parent / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["asyncvm"]


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in asyncvm.__all__:
        obj = getattr(asyncvm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(name)
    assert not missing


def test_mypy_strict_is_clean_on_the_examples_and_the_embedding_api() -> None:
    """A user's strictly typed code gets no Any or untyped call from asyncvm's public API."""
    files = [
        *sorted(str(p) for p in (ROOT / "examples").glob("*.py")),
        "asyncvm/__init__.py",
        "asyncvm/__main__.py",
        "asyncvm/explore/awaitable.py",
        "asyncvm/scenarios/tdx_launcher.py",
        "asyncvm/runtime/live.py",
        "asyncvm/runtime/traps.py",
    ]
    strict = ["--strict", "--follow-imports=silent", "--no-incremental", "--no-error-summary"]
    proc = _run(sys.executable, "-m", "mypy", *strict, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
