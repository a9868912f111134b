"""Scenario parameters declared with their types and ranges, checked before any run.

A scenario declares each parameter by its default (``params={"pages": 4}``: an int, any value)
or as a `Param` with bounds or choices (``params={"pages": Param(4, ge=2, le=512)}``). Values
are checked by a pydantic model built from the declarations: a value of the wrong type or out of
range is a one-line `ValueError` naming the parameter, raised before the scenario runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)


@dataclass(frozen=True)
class Param:
    """A scenario parameter: its default, and optionally bounds (``ge``/``le``, for numbers) or
    the values it may take (``choices``), with a line of help."""

    default: Any
    ge: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def describe(self) -> str:
        """``4 (2..512)`` / ``'dontneed' (one of 'dontneed', 'munmap')``: for `asyncvm scenarios`."""
        if self.choices:
            return f"{self.default!r} (one of {', '.join(repr(c) for c in self.choices)})"
        if self.ge is not None or self.le is not None:
            return f"{self.default!r} ({_num(self.ge)}..{_num(self.le)})"
        return repr(self.default)


def _num(x: float | None) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else repr(x)


def declare(value: Any) -> Param:
    """A declaration as a `Param` (a bare default declares the type only)."""
    return value if isinstance(value, Param) else Param(value)


def defaults(declared: Mapping[str, Any]) -> dict[str, Any]:
    return {k: declare(v).default for k, v in declared.items()}


def _annotation(p: Param) -> Any:
    """The pydantic type a value of `p` must have: the default's type, strictly (an int is not a
    bool, a float may be given as an int), within p's bounds or choices."""
    d = p.default
    if p.choices:
        return Literal[tuple(p.choices)]
    bounds = Field(ge=p.ge, le=p.le)
    if isinstance(d, bool):
        return StrictBool
    if isinstance(d, int):
        return Annotated[StrictInt, bounds]
    if isinstance(d, float):
        return Annotated[StrictFloat | StrictInt, bounds, Field(allow_inf_nan=False)]
    if isinstance(d, str):
        return StrictStr
    if isinstance(d, list):
        return list[Any]
    if isinstance(d, dict):
        return dict[str, Any]
    return Any


#: one model per distinct set of declarations (keyed by their repr: a default may be a list)
_MODELS: dict[str, type[BaseModel]] = {}


def _model(declared: Mapping[str, Any]) -> type[BaseModel]:
    decls = sorted((k, declare(v)) for k, v in declared.items())
    key = repr(decls)
    model = _MODELS.get(key)
    if model is None:
        fields: dict[str, Any] = {k: (_annotation(p), p.default) for k, p in decls}
        model = create_model("ScenarioParams", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)
        _MODELS[key] = model
    return model


def check_params(scenario: str, declared: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Each given value against its declaration; the first problem is a one-line ValueError."""
    try:
        _model(declared).model_validate(dict(given))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        name = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ValueError(
                f"scenario {scenario} has no parameter {name} (it takes: {', '.join(sorted(declared)) or 'none'})"
            ) from None
        p = declare(declared[str(err["loc"][0])])
        raise ValueError(
            f"parameter {name}={err.get('input')!r} of scenario {scenario}: {err['msg']} "
            f"(declared: {p.describe()}{'; ' + p.help if p.help else ''})"
        ) from None
