"""The scenario registry: ``@asyncvm.scenario(name=..., params=...)`` and lookup by name.

A schedule file names its scenario by registered name and parameters. Looking a name up loads the
entry points of the ``asyncvm.scenarios`` group (the bundled ``asyncvm.scenarios.*`` modules and any
installed package's own), or a module the user names explicitly (``--module``: a module name,
importable from the current directory, or a ``.py`` file). A schedule of a ``--module`` scenario
records that module as data, so that replaying it can say which ``--module`` it needs; nothing a
file names is ever imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import defaults

ScenarioFn = Callable[..., Coroutine[Any, Any, Any]]


@dataclass
class ScenarioSpec:
    """A registered scenario: its function, declared parameters with defaults, and description
    (the whole docstring)."""

    name: str
    fn: ScenarioFn
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    module: str = ""
    #: the ``--module`` that registered it (a module name or a file's absolute path); None for
    #: entry points, which every process loads by itself
    source: str | None = None
    #: the profiles (kernel or design) a comparison of this scenario is meaningful for; empty: any
    profiles: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The description's first line."""
        return self.description.splitlines()[0] if self.description else ""


REGISTRY: dict[str, ScenarioSpec] = {}


class UnknownScenario(LookupError):
    pass


#: the package of the bundled scenarios: their names are not for other modules to take
BUNDLED_PACKAGE = "asyncvm.scenarios."


def scenario(
    name: str | None = None,
    params: Mapping[str, Any] | None = None,
    data: Mapping[str, float] | None = None,
    profiles: Iterable[str] | None = None,
    known: Mapping[str, Any] | None = None,
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register an ``async def scenario(kvm, **params)`` under `name` with parameter defaults.

    A parameter is declared by its default (its type) or by a `params.Param` with its range or
    choices; values are checked against the declarations before any run.

    `data` overrides the probabilities of nondeterministic draws for this scenario, e.g.
    ``{"signal": 0.0}`` where a signal would only end the run through an ABI path (an ioctl that
    collapses -EINTR into -EIO) that has nothing to do with the race being hunted.

    `profiles` names the profiles (kernel versions or design profiles, ``asyncvm profiles``) that
    ``asyncvm compare`` may run it under; none: any profile.

    `known` maps a profile to the `known.Known` kernel behaviour (or a tuple of them) the scenario
    shows there: a campaign reports such a failure as known, with its kernel reference, not as a
    new finding.
    """

    def register(fn: ScenarioFn) -> ScenarioFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"scenario {fn.__qualname__} must be an async def")
        key = name or fn.__name__
        taken = REGISTRY.get(key)
        if taken is not None and taken.module.startswith(BUNDLED_PACKAGE) and fn.__module__ != taken.module:
            # a module's scenario would silently replace a bundled one (and schedules of it)
            raise ValueError(
                f"scenario name {key!r} is taken by the bundled scenario in {taken.module}; choose another"
            )
        decls = dict(params or {})
        sig = inspect.signature(fn)
        for p in list(sig.parameters.values())[1:]:
            if p.default is not inspect.Parameter.empty:
                decls.setdefault(p.name, p.default)
        declared = defaults(decls)
        meaningful = tuple(profiles or ())
        REGISTRY[key] = ScenarioSpec(key, fn, declared, inspect.getdoc(fn) or "", fn.__module__, profiles=meaningful)
        fn.scenario_name = key  # type: ignore[attr-defined]
        fn.scenario_params = declared  # type: ignore[attr-defined]
        fn.scenario_param_decls = decls  # type: ignore[attr-defined]
        fn.scenario_known = dict(known or {})  # type: ignore[attr-defined]
        fn.scenario_data = dict(data or {})  # type: ignore[attr-defined]
        fn.scenario_profiles = meaningful  # type: ignore[attr-defined]
        return fn

    return register


ENTRY_POINT_GROUP = "asyncvm.scenarios"

#: one line per entry point of the group that failed to load, by "name = value"
LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()


def load_bundled() -> list[str]:
    """Load every entry point of the ``asyncvm.scenarios`` group, so their scenarios register.

    asyncvm's own (the bundled scenarios) load first. An entry point that fails to load is skipped
    and reported, in one line, in the returned list (and in `LOAD_ERRORS`); the others still load.
    """
    eps = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda ep: (getattr(ep.dist, "name", None) != "asyncvm", ep.name, ep.value),
    )
    errors: list[str] = []
    for ep in eps:
        key = f"{ep.name} = {ep.value}"
        if key in _LOADED:
            continue
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party entry point is one line
            dist = getattr(ep, "dist", None)
            where = f" of {dist.name}" if dist is not None else ""
            LOAD_ERRORS[key] = " ".join(
                f"scenario entry point {ep.name!r}{where} ({ep.value}) failed to load: {type(e).__name__}: {e}".split()
            )
            errors.append(LOAD_ERRORS[key])
            continue
        LOAD_ERRORS.pop(key, None)
        _LOADED.add(key)
    return errors


def load_module(module: str) -> str:
    """Import a user module that registers scenarios (``--module``): a module name, importable
    from the current directory, or the path of a ``.py`` file. Importing it again does nothing.

    Returns how a schedule records it (the name, or the file's absolute path); anything the
    module raises is a one-line `UnknownScenario`.
    """
    is_path = module.endswith(".py") or "/" in module or os.sep in module
    try:
        if is_path:
            source = str(Path(module).resolve())
            name = _import_file(Path(source))
        else:
            source = name = module
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises is one line
        raise UnknownScenario(_import_failure(module, e)) from None
    for spec in REGISTRY.values():
        if spec.module == name:
            spec.source = source
            spec.fn.scenario_source = source  # type: ignore[attr-defined]
    return source


def _import_file(path: Path) -> str:
    """Import a ``.py`` file as the module named by its stem; returns that name."""
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", None) or "").resolve() == path:
            return name
        raise ImportError(f"another module named {name!r} is already imported ({loaded!r})")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    return name


def _import_failure(module: str, e: BaseException) -> str:
    """One line: the module, what it raised and where (the innermost frame)."""
    where = ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and not tb.tb_frame.f_code.co_filename.startswith(("<frozen", __file__)):
        where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
    return " ".join(f"cannot import module {module!r}: {type(e).__name__}: {e}{where}".split())


def param_mismatch(value: Any, default: Any) -> str | None:
    """Why `value` cannot stand for a parameter whose default is `default` (None if it can)."""
    if default is None:
        return None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (str, list, dict)):
        ok = isinstance(value, type(default))
    else:
        ok = True
    return None if ok else f"{value!r} is not a {type(default).__name__} like its default {default!r}"


def closest(name: str, known: Iterable[str]) -> str:
    """``; did you mean 'a', 'b'?`` for the known names closest to `name` (difflib), or ``""``."""
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def get_scenario(name: str, module: str | None = None) -> ScenarioSpec:
    """Find a registered scenario; an unknown name suggests the closest and lists the known ones."""
    if module:
        load_module(module)
    if name not in REGISTRY:
        load_bundled()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "none"
        broken = f"; entry points that failed to load: {', '.join(sorted(LOAD_ERRORS))}" if LOAD_ERRORS else ""
        raise UnknownScenario(
            f"unknown scenario {name!r}{closest(name, REGISTRY)} (registered scenarios: {known}){broken}"
        ) from None
