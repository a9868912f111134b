"""The schemas of every file asyncvm reads back: schedule files, ``campaign.json``, the records of
``ledger.jsonl`` (and the limits a suite file is read under).

Each file is read under a size limit, parsed by pydantic-core's JSON parser (which refuses nesting
deeper than `JSON_DEPTH` instead of overflowing Python's stack), checked for non-finite numbers
anywhere, then validated against a pydantic model: strict integers and booleans, bounded ranges,
known strategy, profile and bug names. Whatever is wrong is one `FileError` line naming the file,
the field and why.

Ledger records carry a checksum of their own content (`seal`): a record edited by hand, or
damaged on disk, is refused instead of being believed.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from ..runtime.failures import ToolError

#: pydantic-core's parser refuses JSON nested deeper than this (it is the parser's own limit)
JSON_DEPTH = 200
MIB = 1 << 20
MAX_SCHEDULE_BYTES = 64 * MIB
MAX_CAMPAIGN_BYTES = 1 * MIB
MAX_LEDGER_BYTES = 1024 * MIB
MAX_SUITE_BYTES = 1 * MIB
#: no execution is longer (the executor counts steps in Python: far beyond this is hours)
MAX_STEPS_LIMIT = 10**9
#: the most executions a campaign can ask for (the CLI's "unbounded")
MAX_RUNS = 10**12
#: the largest PCT depth and DFS preemption bound a campaign may ask for
MAX_DEPTH = 10_000
#: the most worker processes a campaign may start on this machine (more is a typo, not a machine)
MAX_JOBS = 1024
#: seeds are what Python's random accepts, kept to 64 bits so every tool can print them
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


M = TypeVar("M", bound=BaseModel)


class FileError(ToolError):
    """A file asyncvm cannot use; the message is one line naming the file, the field and why."""


# -- reading ---------------------------------------------------------------------------------------


def read_text(path: Path, limit: int) -> str:
    """The file's text, refused if missing, unreadable, not UTF-8 or larger than `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except OSError as e:
        raise FileError(f"{path}: cannot read ({type(e).__name__})") from None
    if len(data) > limit:
        raise FileError(f"{path}: larger than {_size(limit)}; not a file asyncvm wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError(f"{path}: cannot read (not UTF-8 text)") from None


def parse_json(text: str, origin: str) -> Any:
    """Parse JSON: one-line errors for truncated, invalid, too deeply nested or non-finite input."""
    try:
        data = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError as e:
        why = str(e)
        if "recursion limit" in why:
            raise FileError(f"{origin}: nested deeper than {JSON_DEPTH} levels") from None
        if "EOF while parsing" in why or not text.strip():
            raise FileError(f"{origin}: truncated ({why})") from None
        raise FileError(f"{origin}: not valid JSON ({why})") from None
    where = non_finite(data)
    if where is not None:
        raise FileError(f"{origin}: {where or 'the value'}: not a finite number")
    return data


def _any_non_finite(data: Any) -> bool:
    stack = [data]
    while stack:
        value = stack.pop()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else (value,)
        for v in items:
            if type(v) is float:
                if not math.isfinite(v):
                    return True
            elif isinstance(v, (dict, list)):
                stack.append(v)
    return False


def non_finite(data: Any, path: str = "") -> str | None:
    """The dotted path of the first non-finite number in `data` (``""`` for `data` itself), or None."""
    if not _any_non_finite(data):  # the common case, without building a path per value
        return None
    stack: list[tuple[str, Any]] = [(path, data)]
    while stack:
        where, value = stack.pop()
        if type(value) is float:
            if not math.isfinite(value):
                return where
        elif isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value))
    return None


def depth(data: Any) -> int:
    """How deeply `data` nests lists and tables (a scalar is 0)."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level + 1)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


#: a suite file's tables and arrays nest a few levels; far deeper is not a suite
TOML_DEPTH = 32


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file (a suite), under the size limit and `TOML_DEPTH`, with finite numbers only."""
    text = read_text(path, MAX_SUITE_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise FileError(f"{path}: nested deeper than {TOML_DEPTH} levels") from None
    if depth(data) > TOML_DEPTH:
        raise FileError(f"{path}: nested deeper than {TOML_DEPTH} levels")
    where = non_finite(data)
    if where is not None:
        raise FileError(f"{path}: {where}: not a finite number")
    return data


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n} bytes"


def explain(e: ValidationError) -> str:
    """The first problem pydantic found, as ``field.path: why``."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in err["loc"]) or "the file"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return " ".join(f"{loc}: {msg}".split())


def validate(model: type[M], data: Any, origin: str, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise FileError(f"{origin}: malformed {what}: {explain(e)}") from None


# -- the names a file may use ----------------------------------------------------------------------


def check_profile(name: str) -> str:
    from ..profile import PROFILES

    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (choose one of: {', '.join(PROFILES)})")
    return name


def check_bug(name: str) -> str:
    from ..bugs import BUGS, unknown_bug

    if name not in BUGS:
        raise ValueError(unknown_bug(name))
    return name


def check_strategy(name: str) -> str:
    from ..runtime.strategies import STRATEGIES

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} (choose one of: {', '.join(STRATEGIES)})")
    return name


Count = Annotated[StrictInt, Field(ge=0, le=MAX_RUNS)]
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]
MaxSteps = Annotated[StrictInt, Field(ge=1, le=MAX_STEPS_LIMIT)]
Probability = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=1000)]
ProfileName = Annotated[StrictStr, AfterValidator(check_profile)]
BugName = Annotated[StrictStr, AfterValidator(check_bug)]
StrategyName = Annotated[StrictStr, AfterValidator(check_strategy)]
Params = dict[Annotated[StrictStr, Field(max_length=200)], Any]


class _Model(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", frozen=True)


class FailureModel(_Model):
    """runtime.failures.Failure.to_json()."""

    kind: Name
    signature: StrictStr
    message: StrictStr
    step: Count
    task: StrictStr | None = None
    evidence: dict[str, Any] = {}


# -- schedule files --------------------------------------------------------------------------------


class ScenarioRef(_Model):
    name: Name
    params: Params = {}
    module: Name | None = None


class ScheduleModel(_Model):
    """A schedule file (schedule.Schedule.to_json()); `format` and `version` are checked first."""

    asyncvm: StrictStr = "?"
    scenario: ScenarioRef
    profile: ProfileName = "6.18"
    bugs: list[BugName] = []
    strategy: dict[str, Any] = {}
    seed: Seed = 0
    execution: Count = 0
    max_steps: MaxSteps = 200_000
    data_probs: dict[StrictStr, Probability] = {}
    lockdep: StrictBool = True
    detect_races: StrictBool = False
    tasks: list[StrictStr] = []
    steps: Count = 0
    preemptions: Count = 0
    failure: FailureModel | None = None
    #: element checks (a task id or [value]) are schedule._decode's, which names the choice
    prelude: list[list[Any]] = []
    choices: list[Any]


# -- campaign.json ---------------------------------------------------------------------------------


class SpecModel(_Model):
    """campaign.CampaignSpec.to_json(): every field, nothing else."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", frozen=True)

    scenario: Name
    module: Name | None = None
    params: Params = {}
    profile: ProfileName = "6.18"
    bugs: list[BugName] = []
    max_steps: MaxSteps = 200_000
    data_probs: dict[StrictStr, Probability] = {}
    lockdep: StrictBool = True
    detect_races: StrictBool = False
    strategy: StrategyName = "pct"
    seed: Seed = 0
    depth: Annotated[StrictInt, Field(ge=1, le=MAX_DEPTH)] = 3
    steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS_LIMIT)] | None = None
    preemptions: Annotated[StrictInt, Field(ge=0, le=MAX_DEPTH)] = 2
    runs: Annotated[StrictInt, Field(ge=1, le=MAX_RUNS)] = 1000
    first_run: Count = 0
    stop_on_first_failure: StrictBool = False


class CampaignModel(_Model):
    """A campaign folder's campaign.json (runner.run_campaign writes it)."""

    asyncvm: StrictStr = "?"
    #: the chunk grid the ledger was written in; the driver never makes chunks larger than CHUNK
    chunk: Annotated[StrictInt, Field(ge=1, le=250)] = 250
    jobs: Annotated[StrictInt, Field(ge=0)] = 1
    shrink: StrictBool = True
    time: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = None
    spec: SpecModel


def read_campaign(path: Path) -> CampaignModel:
    text = read_text(path, MAX_CAMPAIGN_BYTES)
    try:
        data = parse_json(text, str(path))
    except FileError as e:
        raise FileError(f"{path}: malformed campaign file: {str(e).removeprefix(f'{path}: ')}") from None
    return validate(CampaignModel, data, str(path), "campaign file")


# -- ledger.jsonl ----------------------------------------------------------------------------------


class EdgeModel(_Model):
    """runtime.lockdep.Edge."""

    before: StrictStr
    after: StrictStr
    before_site: StrictStr
    after_site: StrictStr
    task: StrictStr
    execution: StrictInt


Index = Annotated[StrictInt, Field(ge=0, le=MAX_RUNS)]


class ChunkModel(_Model):
    """campaign.ChunkResult.to_json()."""

    first: Index
    count: Annotated[StrictInt, Field(ge=1, le=MAX_RUNS)]
    runs: Count
    steps: Count
    exhausted: StrictBool
    stopped: StrictBool = False
    failures: list[tuple[Index, FailureModel, list[Any]]]
    edges: list[tuple[Index, list[EdgeModel], list[Any]]]
    sizes: list[tuple[Index, Count, Count]] = []

    @model_validator(mode="after")
    def _within(self) -> ChunkModel:
        end = self.first + self.count
        if self.runs > self.count:
            raise ValueError(f"runs {self.runs} is more than the chunk's count {self.count}")
        for what, items in (("failures", self.failures), ("edges", self.edges), ("sizes", self.sizes)):
            for item in items:
                if not self.first <= item[0] < end:
                    raise ValueError(f"{what}: execution {item[0]} is outside the chunk [{self.first}, {end})")
        return self


class ChunkRecord(_Model):
    type: Literal["chunk"]
    chunk: ChunkModel
    elapsed: Annotated[StrictFloat | StrictInt, Field(ge=0)]


class FailureRecord(_Model):
    type: Literal["failure"]
    signature: StrictStr
    kind: StrictStr
    run: Index
    witness: Index
    message: StrictStr
    dir: StrictStr


class WitnessRecord(_Model):
    type: Literal["witness"]
    signature: StrictStr
    witness: Index
    preemptions: Count
    steps: Count
    dir: StrictStr


class LedgerLine(BaseModel):
    record: Annotated[ChunkRecord | FailureRecord | WitnessRecord, Field(discriminator="type")]


def checksum(record: dict[str, Any]) -> str:
    """The checksum a ledger record carries (of everything in it but the checksum)."""
    body = {k: v for k, v in record.items() if k != "sum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def seal(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "sum": checksum(record)}


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The records of a ledger, each checked (checksum, then schema). A last line without its
    newline is what a kill cut short: it is left out, everything before it is intact."""
    if not path.exists():
        return []
    text = read_text(path, MAX_LEDGER_BYTES)
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    del torn  # a kill mid-append; Ledger() cuts it off before appending
    out: list[dict[str, Any]] = []
    for n, line in enumerate(complete, 1):
        where = f"{path}: line {n}"
        data = parse_json(line, where)
        if not isinstance(data, dict):
            raise FileError(f"{where}: not a ledger record")
        if "sum" not in data:
            raise FileError(f"{where}: a ledger record without its checksum (edited, or not written by this asyncvm)")
        if data.get("sum") != checksum(data):
            raise FileError(
                f"{where}: checksum mismatch: the record was edited or damaged (asyncvm refuses to resume from it)"
            )
        try:
            LedgerLine.model_validate({"record": data})
        except ValidationError as e:
            raise FileError(f"{where}: malformed ledger record: {explain(e).removeprefix('record.')}") from None
        out.append(data)
    return out
