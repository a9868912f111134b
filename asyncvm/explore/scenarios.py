"""The scenario registry: ``@asyncvm.scenario(name=..., params=...)`` and lookup by name.

A schedule file names its scenario by registered name and parameters. Looking a name up loads the
entry points of the ``asyncvm.scenarios`` group (the bundled ``asyncvm.scenarios.*`` modules and any
installed package's own), or a module the user names explicitly (``--module``), never a path taken
from a file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

ScenarioFn = Callable[..., Coroutine[Any, Any, Any]]


@dataclass
class ScenarioSpec:
    """A registered scenario: its function, declared parameters with defaults, and description."""

    name: str
    fn: ScenarioFn
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    module: str = ""


REGISTRY: dict[str, ScenarioSpec] = {}


class UnknownScenario(LookupError):
    pass


def scenario(
    name: str | None = None,
    params: Mapping[str, Any] | None = None,
    data: Mapping[str, float] | None = None,
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register an ``async def scenario(kvm, **params)`` under `name` with parameter defaults.

    `data` overrides the probabilities of nondeterministic draws for this scenario, e.g.
    ``{"signal": 0.0}`` where a signal would only end the run through an ABI path (an ioctl that
    collapses -EINTR into -EIO) that has nothing to do with the race being hunted.
    """

    def register(fn: ScenarioFn) -> ScenarioFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"scenario {fn.__qualname__} must be an async def")
        key = name or fn.__name__
        declared = dict(params or {})
        sig = inspect.signature(fn)
        for p in list(sig.parameters.values())[1:]:
            if p.default is not inspect.Parameter.empty:
                declared.setdefault(p.name, p.default)
        doc = inspect.getdoc(fn) or ""
        REGISTRY[key] = ScenarioSpec(key, fn, declared, doc.splitlines()[0] if doc else "", fn.__module__)
        fn.scenario_name = key  # type: ignore[attr-defined]
        fn.scenario_params = declared  # type: ignore[attr-defined]
        fn.scenario_data = dict(data or {})  # type: ignore[attr-defined]
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


def load_module(module: str) -> None:
    """Import a user module that registers scenarios (``--module``); a bad name is a one-line error."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises is one line
        raise UnknownScenario(f"cannot import module {module!r}: {type(e).__name__}: {e}") from None


def get_scenario(name: str, module: str | None = None) -> ScenarioSpec:
    """Find a registered scenario; unknown names list the known ones."""
    if module:
        load_module(module)
    if name not in REGISTRY:
        load_bundled()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "none"
        broken = f"; entry points that failed to load: {', '.join(sorted(LOAD_ERRORS))}" if LOAD_ERRORS else ""
        raise UnknownScenario(f"unknown scenario {name!r}; registered scenarios: {known}{broken}") from None
