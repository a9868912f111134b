"""The asyncvm command line: stress, compare, replay, shrink, show, scenarios, profiles, bench.

Exit codes: 0 clean, 1 failures found (or the replayed execution failed), 2 usage or input error,
3 internal error (one line naming the crash report with its traceback). Every input problem is one
line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

app = typer.Typer(
    name="asyncvm",
    help="Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: it fits 80 columns without cutting option names short.
    rich_markup_mode=None,
)

EXIT_CLEAN, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


def _die(message: str) -> None:
    typer.echo(f"asyncvm: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_seconds(flag: str, value: float | None) -> None:
    """A time budget is a positive, finite number of seconds (nan and inf never stop)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        _die(f"{flag} must be a positive, finite number of seconds")


def _check_jobs(jobs: int, least: int = 0) -> None:
    """A number of worker processes: at least `least` (0 is all cores), at most files.MAX_JOBS."""
    from .explore.files import MAX_JOBS

    if jobs < least:
        _die("--jobs must be positive (or 0 for all cores)" if least == 0 else f"--jobs must be at least {least}")
    if jobs > MAX_JOBS:
        _die(f"--jobs must be at most {MAX_JOBS}")


def _check_seed(flag: str, seed: int | None) -> None:
    """A seed a schedule.json can record (and so replay and resume can read back)."""
    from .explore.files import SEED_MAX, SEED_MIN

    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        _die(f"{flag} must be from {SEED_MIN} to {SEED_MAX}")


#: the stress option that sets each CampaignSpec field a command line can get out of range
_SPEC_FLAGS = {"depth": "--depth", "preemptions": "--preemptions", "max_steps": "--max-steps", "runs": "--runs"}


def _check_spec(spec: Any) -> None:
    """The limits campaign.json is read back with: a campaign that starts can be resumed."""
    from pydantic import ValidationError

    from .explore.files import SpecModel

    try:
        SpecModel.model_validate(spec.to_json())
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        _die(_one_line(f"{_SPEC_FLAGS.get(field, field)}: {err['msg']}"))
    _check_json_params(spec.scenario, spec.params)


def _check_json_params(scenario: str, params: dict[str, Any]) -> None:
    """campaign.json and schedule.json record the parameters: a default that is no JSON value
    (a scenario module's own object) is refused before the campaign, not a crash writing it."""
    for key, value in params.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            _die(_one_line(f"scenario {scenario}: parameter {key}={value!r} is not a JSON value (set it with -p)"))


def _coerce(key: str, raw: str, default: Any) -> Any:
    """A --param value, read as the type of the parameter's declared default."""
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        _die(f"--param {key}={raw}: expected true or false")
    if isinstance(default, int):
        try:
            return int(raw, 0)
        except ValueError:
            _die(f"--param {key}={raw}: expected an integer")
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            _die(f"--param {key}={raw}: expected a number")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_params(items: list[str] | None, declared: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            _die(f"--param wants KEY=VALUE, got {item!r}")
        params[key] = _coerce(key, raw, declared.get(key))
    return params


def _load_modules(modules: list[str] | None) -> None:
    """Load the entry points and each --module (a module name or a .py file)."""
    from .explore.scenarios import UnknownScenario, load_bundled, load_module

    for error in load_bundled():  # a broken third-party entry point: one line, the rest still load
        typer.echo(f"asyncvm: error: {error}", err=True)
    for m in modules or []:
        try:
            load_module(m)
        except UnknownScenario as e:
            _die(str(e))
        except SystemExit as e:  # sys.exit() at import: load_module's `except Exception` lets it by
            _die(f"cannot import module {m!r}: it called sys.exit({e.code!r})")


def _file_scenario(path: str, modules: list[str] | None) -> tuple[str, list[str]]:
    """The one scenario a ``.py`` file registers, and the --module list that loads it."""
    from .explore.scenarios import REGISTRY, UnknownScenario, load_module

    try:
        source = load_module(path)
    except UnknownScenario as e:
        _die(str(e))
    except SystemExit as e:
        _die(f"cannot import module {path!r}: it called sys.exit({e.code!r})")
    names = sorted(n for n, spec in REGISTRY.items() if spec.source == source)
    if len(names) != 1:
        _die(f"{path} registers {len(names)} scenarios ({', '.join(names) or 'none'}); name one with --module {path}")
    return names[0], [*(modules or []), path]


def _resolve(name: str, modules: list[str] | None) -> Any:
    from .explore.scenarios import UnknownScenario, get_scenario

    _load_modules(modules)
    try:
        return get_scenario(name)
    except UnknownScenario as e:
        _die(str(e))


def _check_choices(strategy: str, profile: str, bugs: list[str]) -> None:
    from .bugs import BUGS, unknown_bug
    from .explore.scenarios import closest
    from .profile import PROFILES
    from .runtime.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        _die(f"unknown strategy {strategy!r}{closest(strategy, STRATEGIES)} (choose one of: {', '.join(STRATEGIES)})")
    if profile not in PROFILES:
        _die(f"unknown profile {profile!r}{closest(profile, PROFILES)} (choose one of: {', '.join(PROFILES)})")
    for b in bugs:
        if b not in BUGS:
            _die(unknown_bug(b))


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"asyncvm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler."""


@app.command()
def scenarios(
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Also import this module (a name or a .py file)."),
    ] = None,
) -> None:
    """List the registered scenarios, each with its whole description."""
    import shutil
    import textwrap

    from .explore.scenarios import REGISTRY

    _load_modules(module)
    if not REGISTRY:
        typer.echo("no scenarios registered")
        return
    width = max(40, min(100, shutil.get_terminal_size().columns)) - 1
    for n, name in enumerate(sorted(REGISTRY)):
        spec = REGISTRY[name]
        params = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
        if n:
            typer.echo("")
        typer.echo(f"{name} ({params})" if params else name)
        for k, paragraph in enumerate(spec.description.split("\n\n")):
            if k:
                typer.echo("")
            text = " ".join(paragraph.split())
            typer.echo(
                textwrap.fill(text, width, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
            )


def _stress_suite(
    suite: Path | None,
    scenario: str | None,
    given: list[str],
    out: Path,
    jobs: int,
    seed: int,
    dask: str | None,
    shrink: bool,
    module: list[str] | None,
    quiet: bool,
) -> NoReturn:
    """`asyncvm stress --suite FILE`: the suite module runs it; this checks the command line."""
    from .explore.suite import SuiteError, run_suite_file

    if suite is None:
        _die("missing a scenario: asyncvm stress SCENARIO, or asyncvm stress --suite FILE")
    if scenario is not None:
        _die(f"give a SCENARIO or --suite, not both (got {scenario!r} and --suite {suite})")
    assert suite is not None  # (_die raised otherwise)
    if given:
        _die(f"{', '.join(given)}: not with --suite (the suite file sets each campaign's budget, strategy and bugs)")
    _check_jobs(jobs)
    _check_seed("--seed", seed)
    _load_modules(module)
    try:
        rc = run_suite_file(
            suite,
            out=out,
            seed=seed,
            jobs=jobs or os.cpu_count() or 1,
            dask=dask,
            do_shrink=shrink,
            quiet=quiet,
        )
    except SuiteError as e:
        _die(str(e))
    except OSError as e:
        _die(_one_line(f"cannot write the suite folder: {e}"))
    except KeyboardInterrupt:
        typer.echo("asyncvm: interrupted", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(rc)


def _shown(flag: str, value: Any) -> str:
    """How the command line says `flag` has `value` (``--no-shrink``, ``--strategy pos``)."""
    if flag == "--shrink/--no-shrink":
        return "--shrink" if value else "--no-shrink"
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if isinstance(value, list):
        return " ".join(f"{flag} {v}" for v in value) or f"no {flag}"
    if flag.startswith("--param "):
        return f"--param {flag.split()[1]}={json.dumps(value)}"
    return f"{flag} {value}"


def _bug_names() -> str:
    from .bugs import BUGS

    return ", ".join(BUGS)


UNBOUNDED = 10**12


@app.command()
def stress(
    scenario: Annotated[
        str | None,
        typer.Argument(
            help="A registered scenario (see `asyncvm scenarios`); with --resume, the campaign's own.",
            metavar="SCENARIO",
            show_default=False,
        ),
    ] = None,
    runs: Annotated[
        int | None,
        typer.Option(metavar="N", help="Executions to run (default 1000, or unbounded with --time)."),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time", metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="random, pct, idpct, pos, dfs, feedback or portfolio.  [default: pct]"),
    ] = None,
    depth: Annotated[
        int | None, typer.Option(metavar="N", help="PCT bug depth (change points + 1).  [default: 3]")
    ] = None,
    preemptions: Annotated[int | None, typer.Option(metavar="N", help="DFS preemption bound.  [default: 2]")] = None,
    seed: Annotated[
        int | None,
        typer.Option(metavar="N", help="Campaign seed: the same seed finds the same failures.  [default: 0]"),
    ] = None,
    jobs: Annotated[
        int, typer.Option(metavar="N", show_default=False, help="Worker processes (default: all cores).")
    ] = 0,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help="A Dask scheduler to run on.")] = None,
    profile: Annotated[
        str | None, typer.Option(metavar="VERSION", help="Kernel profile: 6.10, 6.18 or 7.0.  [default: 6.18]")
    ] = None,
    bug: Annotated[
        list[str] | None,
        typer.Option(
            "--bug", metavar="NAME", help=f"Inject a named bug (repeatable): {_bug_names()}; see `asyncvm bugs`."
        ),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="A scenario parameter.")
    ] = None,
    stop_on_first_failure: Annotated[
        bool, typer.Option("--stop-on-first-failure", help="Stop at the first failing execution.")
    ] = False,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder for campaigns.")] = Path("logs"),
    shrink: Annotated[
        bool | None, typer.Option("--shrink/--no-shrink", help="Shrink each failure.  [default: shrink]")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Continue the campaign in DIR; --runs and --time extend it to a new budget."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(metavar="N", help="Steps per execution before it is a livelock.  [default: 200000]"),
    ] = None,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Import scenarios from a module (a name or a .py file)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    suite: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Run the campaigns of a suite file (stress/*.toml) instead of SCENARIO."),
    ] = None,
    race_detector: Annotated[
        bool,
        typer.Option(
            "--race-detector",
            help="Also report data races (happens-before, KCSAN's rule); executions run about 1.5-1.7x slower.",
        ),
    ] = False,
) -> None:
    """Run a stress campaign: many schedules of a scenario.

    Failures are saved with replayable schedules. With --suite FILE, run every campaign of a
    suite file and print one table (exit 0 when each campaign found what the file expects, 1
    when not).
    """
    options: dict[str, Any] = {
        "--strategy": strategy,
        "--depth": depth,
        "--preemptions": preemptions,
        "--seed": seed,
        "--profile": profile,
        "--max-steps": max_steps,
        "--bug": sorted(bug) if bug else None,
        "--stop-on-first-failure": True if stop_on_first_failure else None,
    }
    if suite is not None or (scenario is None and resume is None):
        per_campaign = {"--runs": runs, "--time": time_budget, "--param": param, "--resume": resume, **options}
        given = [flag for flag, v in per_campaign.items() if v is not None and flag != "--seed"]
        _stress_suite(
            suite, scenario, given, out, jobs, seed or 0, dask, True if shrink is None else shrink, module, quiet
        )
    from concurrent.futures.process import BrokenProcessPool

    from .explore.campaign import CampaignSpec
    from .explore.runner import Ledger, load_campaign, ran_so_far, slug
    from .explore.scenarios import UnknownScenario
    from .runtime.failures import ToolError

    if runs is not None and runs <= 0:
        _die("--runs must be positive")
    _check_seconds("--time", time_budget)
    if depth is not None and depth < 1:
        _die("--depth must be at least 1")
    if preemptions is not None and preemptions < 0:
        _die("--preemptions must not be negative")
    _check_jobs(jobs)
    _check_seed("--seed", seed)
    if max_steps is not None and max_steps <= 0:
        _die("--max-steps must be positive")
    do_shrink = True if shrink is None else shrink
    if resume is None:
        assert scenario is not None  # (the suite branch took the other case)
        strategy = "pct" if strategy is None else strategy
        profile = "6.18" if profile is None else profile
        _check_choices(strategy, profile, list(bug or []))
        if scenario.endswith(".py"):  # a scenario file, e.g. a program `asyncvm fuzz` wrote
            scenario, module = _file_scenario(scenario, module)
        spec_fn = _resolve(scenario, module)
        try:
            from .explore.engine import scenario_params

            params = scenario_params(spec_fn.fn, _parse_params(param, spec_fn.params))
        except ValueError as e:
            _die(str(e))
        spec = CampaignSpec(
            scenario=scenario,
            # Workers import the --module that registered the scenario (not just the first one).
            module=spec_fn.source,
            params=params,
            profile=profile,
            bugs=list(bug or []),
            max_steps=200_000 if max_steps is None else max_steps,
            strategy=strategy,
            seed=seed or 0,
            depth=3 if depth is None else depth,
            preemptions=2 if preemptions is None else preemptions,
            runs=runs if runs is not None else (UNBOUNDED if time_budget else 1000),
            stop_on_first_failure=stop_on_first_failure,
            detect_races=race_detector,
        )
        _check_spec(spec)
    else:
        try:
            spec, meta = load_campaign(resume)
        except ToolError as e:
            _die(str(e))
        if scenario is not None and spec.scenario != scenario:
            _die(f"{resume} is a campaign of scenario {spec.scenario!r}, not {scenario!r}")
        _check_choices(spec.strategy, spec.profile, spec.bugs)
        _load_modules(module)
        _check_resume_module(resume, spec, module)
        _check_resume_params(resume, spec)
        kept = {
            "--strategy": spec.strategy,
            "--depth": spec.depth,
            "--preemptions": spec.preemptions,
            "--seed": spec.seed,
            "--profile": spec.profile,
            "--max-steps": spec.max_steps,
            "--bug": sorted(spec.bugs),
            "--stop-on-first-failure": spec.stop_on_first_failure,
            "--shrink/--no-shrink": meta.get("shrink", True),
            **{f"--param {k}": spec.params.get(k) for k in _parse_params(param, spec.params)},
        }
        asked = {
            **options,
            "--shrink/--no-shrink": shrink,
            **{f"--param {k}": v for k, v in _parse_params(param, spec.params).items()},
        }
        for flag, value in asked.items():
            if value is not None and value != kept[flag]:
                _die(
                    f"{_shown(flag, value)} conflicts with the campaign in {resume}, started with "
                    f"{_shown(flag, kept[flag])}; resuming keeps a campaign's options (--runs and --time extend it)"
                )
        try:
            ran, used = ran_so_far(Ledger.read(resume / "ledger.jsonl"))
        except ToolError as e:
            _die(_one_line(str(e)))
        if runs is not None and runs < ran:
            _die(f"--runs {runs}: the campaign in {resume} already ran {ran} executions; resuming extends it")
        if time_budget is not None and time_budget <= used:
            _die(f"--time {time_budget:g}: the campaign in {resume} already ran {used:.1f} s; resuming extends it")
        # --runs / --time give the campaign a new budget; neither: finish the budget it had.
        if runs is not None or time_budget is not None:
            spec.runs = runs if runs is not None else UNBOUNDED
        else:
            time_budget = meta.get("time") if isinstance(meta.get("time"), (int, float)) else None
    jobs = jobs or os.cpu_count() or 1

    def started(folder: Path) -> None:
        typer.echo(f"campaign folder: {folder}")

    try:
        report, folder = _run_with_progress(spec, out, jobs, dask, time_budget, do_shrink, resume, quiet, started)
    except (ToolError, UnknownScenario) as e:
        _die(_one_line(str(e)))
    except BrokenProcessPool as e:
        _die(_one_line(f"a worker process died ({e})"))
    except OSError as e:
        _die(_one_line(f"cannot write the campaign: {e}"))
    except KeyboardInterrupt as e:
        so_far = getattr(e, "report", None)
        where = getattr(e, "folder", None)
        if so_far is not None and where is not None:
            typer.echo(so_far.summary())
            typer.echo(f"summary so far: {where / 'summary.json'}")
        resume_with = f"; continue with: asyncvm stress --resume {where}" if where is not None else ""
        typer.echo(f"asyncvm: interrupted{resume_with}", err=True)
        raise typer.Exit(130) from None
    typer.echo(report.summary())
    needs = f" --module {spec.module}" if spec.module else ""
    for f in report.failures:
        shrunk = f"; shrunk: {_size(f.shrunk)}" if f.shrunk is not None else ""
        typer.echo(f"  {f.signature}: {_size(f.schedule)} (run {f.schedule.execution}){shrunk}")
        typer.echo(f"  replay: asyncvm replay {folder / slug(f.signature) / 'schedule.json'}{needs}")
    # A failure the scenario declares as its profile's known kernel behaviour is not a finding.
    raise typer.Exit(EXIT_FAILURES if report.findings else EXIT_CLEAN)


def _check_resume_module(resume: Path, spec: Any, modules: list[str] | None) -> None:
    """A campaign of a --module scenario resumes only when the user names that module again:
    nothing a campaign.json names is imported on its say-so."""
    from .explore.scenarios import REGISTRY, load_module

    given = [load_module(m) for m in modules or []]  # (loaded already: this returns its source)
    if spec.module is None:
        return
    if spec.module not in given:
        _die(
            f"{resume}: the campaign's scenario {spec.scenario!r} comes from module {spec.module!r}; "
            f"asyncvm imports it only when you name it: add --module {spec.module}"
        )
    registered = REGISTRY.get(spec.scenario)
    if registered is None or registered.source != spec.module:
        where = "no module" if registered is None or registered.source is None else repr(registered.source)
        _die(f"{resume}: scenario {spec.scenario!r} is registered by {where}, not by {spec.module!r}")


def _check_resume_params(resume: Path, spec: Any) -> None:
    """The campaign's parameters against the scenario's declarations (campaign.json is input too)."""
    from .explore.engine import scenario_params
    from .explore.scenarios import UnknownScenario, get_scenario

    try:
        fn = get_scenario(spec.scenario).fn
    except UnknownScenario as e:
        _die(_one_line(f"{resume / 'campaign.json'}: spec.scenario: {e}"))
    try:
        scenario_params(fn, spec.params)
    except ValueError as e:
        _die(_one_line(f"{resume / 'campaign.json'}: spec.params: {e}"))


def _size(schedule: Any) -> str:
    """A schedule's size as everything reports it: preemptions and steps (and, if it was shrunk,
    whether it is 1-minimal)."""
    text = f"{schedule.preemptions} preemptions, {schedule.steps} steps"
    if schedule.strategy.get("name") == "shrink":
        stopped = "the time bound" if schedule.strategy.get("stopped") == "time" else "the attempts"
        text += ", 1-minimal" if schedule.strategy.get("minimal") else f", not 1-minimal ({stopped} ran out)"
    return text


def _run_with_progress(
    spec: Any,
    out: Path,
    jobs: int,
    dask: str | None,
    time_budget: float | None,
    do_shrink: bool,
    resume: Path | None,
    quiet: bool,
    on_start: Any,
) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .explore.runner import run_campaign

    def run(**extra: Any) -> Any:
        return run_campaign(
            spec,
            out=out,
            jobs=jobs,
            dask=dask,
            time_budget=time_budget,
            do_shrink=do_shrink,
            resume=resume,
            on_start=on_start,
            **extra,
        )

    if quiet or (not sys.stderr.isatty() and os.environ.get("ASYNCVM_PROGRESS") != "1"):
        return run()
    total = None if spec.runs >= 10**12 else spec.runs
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} runs/s"),
        TextColumn("failures {task.fields[failing]}"),
        TextColumn("signatures {task.fields[distinct]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(spec.scenario, total=total, rate=0.0, failing=0, distinct=0)

        def tick(report: Any, _n: int) -> None:
            bar.update(
                task,
                completed=report.runs,
                rate=report.runs_per_second,
                failing=report.failing_runs,
                distinct=len(report.failures),
            )

        return run(on_progress=tick)


def _load(file: Path, module: list[str] | None) -> tuple[Any, Any]:
    from .explore.scenarios import UnknownScenario, get_scenario
    from .explore.schedule import Schedule, ScheduleError

    try:
        schedule = Schedule.load(file)
    except ScheduleError as e:
        _die(str(e))
    _load_modules(module)
    try:
        spec = get_scenario(schedule.scenario)
    except UnknownScenario as e:
        if schedule.module:  # the file says where the scenario came from; only the user imports it
            _die(
                f"{file}: unknown scenario {schedule.scenario!r}: it was registered by module "
                f"{schedule.module!r}; add --module {schedule.module}"
            )
        _die(f"{file}: {e}")
    from .explore.engine import scenario_params

    try:
        # Even --force cannot run a scenario with a parameter it does not take.
        scenario_params(spec.fn, schedule.params)
    except ValueError as e:
        _die(_one_line(f"{file}: {e}"))
    return schedule, spec


@app.command()
def fuzz(
    vm_type: Annotated[
        str, typer.Option("--vm-type", metavar="TYPE", help="tdx, snp, sw, default, gmem, or any (drawn per program).")
    ] = "any",
    profile: Annotated[str, typer.Option(metavar="VERSION", help="Kernel profile.")] = "6.18",
    bug: Annotated[
        list[str] | None, typer.Option("--bug", metavar="NAME", help="Inject a named bug (repeatable).")
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time", metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    programs: Annotated[
        int | None, typer.Option(metavar="N", help="Programs to run, each with its own schedule (default 1000).")
    ] = None,
    jobs: Annotated[int, typer.Option(metavar="N", help="Worker processes (0: all cores).")] = 0,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help="A Dask scheduler to run on.")] = None,
    strategy: Annotated[str, typer.Option(metavar="NAME", help="The schedule strategy.")] = "pct",
    seed: Annotated[int, typer.Option(metavar="N", help="Campaign seed.")] = 0,
    stop_on_first_failure: Annotated[
        bool, typer.Option("--stop-on-first-failure", help="Stop at the first failing program.")
    ] = False,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder for campaigns.")] = Path("logs"),
    corpus: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Corpus of failing programs (default OUT/fuzz/corpus).")
    ] = None,
    shrink: Annotated[bool, typer.Option("--shrink/--no-shrink", help="Shrink each failure.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the campaign folder first.")] = False,
) -> None:
    """Explore generated concurrent ioctl programs (asyncvm/fuzz).

    Each failure's folder gets the program as a standalone Python file with its schedule;
    `asyncvm stress FILE.py` hunts that program again. The corpus is replayed first.
    """
    from .fuzz.run import fuzz_spec, replay_corpus, run_fuzz
    from .runtime.failures import ToolError

    _check_choices(strategy, profile, list(bug or []))
    if programs is not None and programs <= 0:
        _die("--programs must be positive")
    _check_seconds("--time", time_budget)
    _check_jobs(jobs)
    _check_seed("--seed", seed)
    try:
        spec = fuzz_spec(
            vm_type=vm_type,
            profile=profile,
            bugs=list(bug or []),
            strategy=strategy,
            seed=seed,
            programs=programs,
            timed=time_budget is not None,
            stop_on_first_failure=stop_on_first_failure,
        )
    except ValueError as e:
        _die(str(e))
    corpus = corpus or out / "fuzz" / "corpus"
    before = replay_corpus(corpus, profile, list(bug or []))
    if before.failing or before.fixed:
        typer.echo(f"corpus {corpus}: {len(before.failing)} programs still fail, {len(before.fixed)} no longer do")
    try:
        report, _folder, files = run_fuzz(
            spec,
            out=out,
            jobs=jobs or os.cpu_count() or 1,
            dask=dask,
            time_budget=time_budget,
            do_shrink=shrink,
            corpus=corpus,
            on_start=None if quiet else lambda f: typer.echo(f"campaign folder: {f}"),
        )
    except ToolError as e:
        _die(_one_line(str(e)))
    except OSError as e:  # --out or --corpus not a folder, or not writable
        _die(_one_line(f"cannot write the campaign: {e}"))
    typer.echo(report.summary())
    for f in report.failures:
        typer.echo(f"  {f.signature}: {_size(f.shrunk or f.schedule)} (run {f.first_run})")
        if f.signature in files:
            typer.echo(f"  program: {files[f.signature]}  (asyncvm stress {files[f.signature]})")
    # A failure the scenario declares as its profile's known kernel behaviour is not a finding.
    raise typer.Exit(EXIT_FAILURES if report.findings else EXIT_CLEAN)


@app.command()
def bugs() -> None:
    """List the named bugs, each with the scenario that exposes it."""
    from .bugs import BUGS

    width = max(len(name) for name in BUGS)
    for name, bug in BUGS.items():
        typer.echo(f"{name:<{width}}  {bug.scenario}: {bug.changes}")


@app.command()
def profiles() -> None:
    """List the kernel and design profiles, one line each.

    A design profile is a proposal argued on the mailing lists, merged or not; its description in
    asyncvm/profile.py says what was proposed and what the model changes.
    """
    from .profile import PROFILES

    width = max(len(name) for name in PROFILES)
    for name, p in PROFILES.items():
        typer.echo(f"{name:<{width}}  {p.kind:<6}  {p.summary}")


@app.command()
def compare(
    scenario: Annotated[
        str, typer.Argument(help="A registered scenario (see `asyncvm scenarios`).", metavar="SCENARIO")
    ],
    profiles: Annotated[
        str, typer.Option("--profiles", metavar="A,B,...", help="The profiles to compare (see `asyncvm profiles`).")
    ],
    runs: Annotated[int | None, typer.Option(metavar="N", help="Executions per profile (default 1000).")] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time", metavar="SECONDS", help="Stop each profile's campaign after this long.")
    ] = None,
    strategy: Annotated[
        str, typer.Option(metavar="NAME", help="random, pct, idpct, pos, dfs, feedback or portfolio.")
    ] = "pct",
    seed: Annotated[int, typer.Option(metavar="N", help="The seed every profile's campaign uses.")] = 0,
    jobs: Annotated[int, typer.Option(metavar="N", help="Worker processes per campaign.")] = 1,
    bug: Annotated[
        list[str] | None, typer.Option("--bug", metavar="NAME", help="Inject a named bug in every profile.")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="A scenario parameter.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table, markdown or json.")] = "table",
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder for the campaigns.")] = Path("logs"),
    shrink: Annotated[bool, typer.Option("--shrink/--no-shrink", help="Shrink each failure.")] = True,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Import scenarios from a module (a name or a .py file)."),
    ] = None,
) -> None:
    """Compare profiles on a scenario: one campaign each, one table.

    Each profile gets one campaign of SCENARIO with the same seeds and budget.

    Exit 0 when every profile ran (failures are the comparison's result, not an error), 2 on bad
    input. Each profile's campaign folder keeps replayable schedules of its signatures.
    """
    from .explore.compare import FORMATS, CompareError, compare, print_rows
    from .explore.scenarios import UnknownScenario
    from .runtime.failures import ToolError

    if fmt not in FORMATS:
        _die(f"--format {fmt}: choose one of: {', '.join(FORMATS)}")
    if runs is not None and runs <= 0:
        _die("--runs must be positive")
    _check_seconds("--time", time_budget)
    _check_jobs(jobs, least=1)
    _check_seed("--seed", seed)
    _check_choices(strategy, "6.18", list(bug or []))
    spec = _resolve(scenario, module)
    try:
        from .explore.engine import scenario_params

        params = scenario_params(spec.fn, _parse_params(param, spec.params))
    except ValueError as e:
        _die(str(e))
    _check_json_params(scenario, params)

    def started(n: int, name: str) -> None:
        if fmt == "table":
            typer.echo(f"asyncvm: [{n}] {scenario} under profile {name}", err=True)

    try:
        rows, folder = compare(
            spec,
            profiles.split(","),
            out=out,
            runs=runs if runs is not None else (UNBOUNDED if time_budget else 1000),
            seed=seed,
            strategy=strategy,
            params=params,
            bugs=list(bug or []),
            time_budget=time_budget,
            jobs=jobs,
            do_shrink=shrink,
            on_profile=started,
        )
    except CompareError as e:
        _die(str(e))
    except (ToolError, UnknownScenario) as e:
        _die(_one_line(str(e)))
    except OSError as e:
        _die(_one_line(f"cannot write the comparison: {e}"))
    except KeyboardInterrupt:
        typer.echo("asyncvm: interrupted", err=True)
        raise typer.Exit(130) from None
    print_rows(scenario, rows, folder, fmt)


@app.command()
def replay(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A schedule.json written by a campaign or by Schedule.save().")
    ],
    log_level: Annotated[
        str, typer.Option(metavar="LEVEL", help="info: the failure, its causes and the events before it; debug: all.")
    ] = "info",
    context: Annotated[
        int, typer.Option(metavar="N", help="Events shown before the failure at --log-level info.")
    ] = 25,
    force: Annotated[
        bool, typer.Option("--force", help="Replay even if asyncvm's version or the parameters differ.")
    ] = False,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Import scenarios from a module (a name or a .py file)."),
    ] = None,
) -> None:
    """Replay a schedule: the failure, its causes, what led there."""
    from .explore.engine import replay as do_replay
    from .explore.schedule import ScheduleError
    from .runtime.failures import ToolError
    from .trace.log import print_events

    if log_level not in ("info", "debug"):
        _die(f"--log-level must be info or debug, not {log_level!r}")
    if context < 0:
        _die("--context must not be negative")
    schedule, spec = _load(file, module)
    try:
        result = do_replay(schedule, spec.fn, force=force, record=True)
    except (ScheduleError, ToolError) as e:
        _die(_one_line(f"{file}: {e}"))
    # The failure's cause steps are marked by role (snapshot, invalidate_begin, install, ...).
    print_events(result.events(), sys.stdout, result.failure, None if log_level == "debug" else context)
    recorded = schedule.failure
    if result.failure is None:
        typer.echo(f"replayed {result.steps} steps: no failure")
        if recorded is not None:
            typer.echo(f"note: the file records a failure that did not happen: {recorded}")
        raise typer.Exit(EXIT_CLEAN)
    if recorded is None or recorded.signature == result.failure.signature:
        typer.echo(f"REPRODUCED {result.failure}")
    else:
        typer.echo(f"FAILED {result.failure}")
        typer.echo(f"note: the file records a different failure: {recorded}")
    raise typer.Exit(EXIT_FAILURES)


@app.command()
def shrink(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A failing schedule.json.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Where to write (default: *.shrunk.json).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Shrink even if asyncvm's version differs.")] = False,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Import scenarios from a module (a name or a .py file)."),
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option("--time", metavar="SECONDS", help="Stop shrinking after this many seconds.  [default: 60]"),
    ] = None,
) -> None:
    """Shrink a failing schedule: fewest preemptions, then steps."""
    from .explore.schedule import ScheduleError
    from .explore.shrink import DEFAULT_TIME, shrunk_path
    from .explore.shrink import shrink as do_shrink
    from .runtime.failures import ToolError

    _check_seconds("--time", time_budget)
    schedule, spec = _load(file, module)
    try:
        small = do_shrink(schedule, spec.fn, force=force, time_budget=time_budget or DEFAULT_TIME)
    except (ScheduleError, ToolError) as e:
        _die(_one_line(f"{file}: {e}"))
    target = output or shrunk_path(file)
    try:
        small.save(target)
    except OSError as e:
        _die(_one_line(f"cannot write {target}: {e.strerror or e}"))
    stopped = small.strategy.get("stopped")
    minimal = (
        "1-minimal"
        if small.strategy.get("minimal")
        else f"not 1-minimal: stopped early at the {time_budget or DEFAULT_TIME:g} s time bound"
        if stopped == "time"
        else "not 1-minimal: the attempts ran out"
    )
    typer.echo(
        f"{schedule.preemptions} -> {small.preemptions} preemptions, {schedule.steps} -> {small.steps} steps "
        f"({minimal}): {target}"
    )


@app.command()
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A schedule.json.")],
    html: Annotated[Path | None, typer.Option(metavar="FILE", help="Also write the HTML timeline here.")] = None,
    trace: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Also write Chrome/Perfetto trace JSON here.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Show even if asyncvm's version differs.")] = False,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", metavar="MODULE", help="Import scenarios from a module (a name or a .py file)."),
    ] = None,
) -> None:
    """Show a schedule's timeline, optionally as HTML and a trace.

    Prints the timeline in the terminal, a column per task, the failing step and each cause step
    marked; optionally writes the HTML timeline and the Chrome/Perfetto trace."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .explore.engine import replay as do_replay
    from .explore.schedule import ScheduleError, write_atomic
    from .runtime.failures import ToolError
    from .trace.chrome import chrome_trace
    from .trace.events import cause_steps, event_fields, marks
    from .trace.timeline import timeline_html

    schedule, spec = _load(file, module)
    try:
        result = do_replay(schedule, spec.fn, force=force, record=True)
    except (ScheduleError, ToolError) as e:
        _die(_one_line(f"{file}: {e}"))
    events = result.events()
    names = result.task_names
    table = Table(title=f"{schedule.scenario} ({result.preemptions} preemptions, {result.steps} steps)")
    table.add_column("step", justify="right")
    for n in names:
        table.add_column(n)
    table.add_column("cause", no_wrap=True)
    labels = marks(events, result.failure)
    for i, ev in enumerate(events):
        if ev["op"] in ("yield", "cond_resched") and i not in labels:
            continue
        cells = [""] * len(names)
        col = names.index(ev["task"]) if ev.get("task") in names else 0
        ranges = [f for f in event_fields(ev) if f.split("=", 1)[0] in ("gfn", "hva", "index")]
        text = escape(" ".join([ev["op"], str(ev.get("obj") or ""), *ranges]).strip())
        if ev["op"] == "failure":
            text = f"[bold red]FAILURE {escape(str(ev.get('obj')))}[/]"
        cells[col] = text
        roles = [r for r in labels.get(i, ()) if r != "failure"]
        cause = f"[bold magenta]<-- {escape(', '.join(roles))}[/]" if roles else ""
        table.add_row(str(ev.get("step")), *cells, cause, style="on grey19" if i in labels else None)
    Console(width=max(100, 24 * (len(names) + 2))).print(table)
    if result.failure is not None:
        typer.echo(f"failure: {result.failure}")
        for role, step in cause_steps(result.failure):
            typer.echo(f"  step {step:>5}  {role}")
    typer.echo(_show_size(file, schedule))
    title = f"{schedule.scenario}: {result.failure.signature}" if result.failure else schedule.scenario
    outputs = []
    if html is not None:
        outputs.append(("timeline", html, timeline_html(events, names, result.failure, title)))
    if trace is not None:
        outputs.append(("trace", trace, json.dumps(chrome_trace(events, names, result.failure))))
    for what, path, text in outputs:
        try:
            write_atomic(path, text)
        except OSError as e:
            _die(_one_line(f"cannot write {path}: {e.strerror or e}"))
        typer.echo(f"{what}: {path}")


def _show_size(file: Path, schedule: Any) -> str:
    """`show`'s size line: the schedule's, and what it was shrunk from or what it shrinks to."""
    from .explore.schedule import Schedule, ScheduleError
    from .explore.shrink import shrunk_path

    line = f"size: {_size(schedule)}"
    original = schedule.strategy.get("original") if schedule.strategy.get("name") == "shrink" else None
    if isinstance(original, dict):
        return f"{line}; shrunk from {original.get('preemptions')} preemptions, {original.get('steps')} steps"
    sibling = shrunk_path(file)
    if sibling.is_file():
        try:
            return f"{line}; shrunk: {_size(Schedule.load(sibling))} ({sibling.name})"
        except ScheduleError:
            pass
    return line


class _BenchCommand(TyperCommand):
    """`asyncvm bench`'s help: no type label beside a flag (typer prints <bool> for --help too)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


def _bench_names() -> str:
    from .bench import BENCHMARKS

    return ", ".join(BENCHMARKS)


@app.command(cls=_BenchCommand)
def bench(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="NAME", help=f"Run just this benchmark (repeatable): {_bench_names()}."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", metavar="", help="Fewer repetitions: a smoke run, not a measurement.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Write DIR/NAME.json per benchmark instead of stdout lines."),
    ] = None,
    fuzz_budget: Annotated[
        float | None,
        typer.Option("--fuzz-budget", metavar="SECONDS", help="The fuzz benchmark's time per named bug (default 5)."),
    ] = None,
    strategy_runs: Annotated[
        int | None,
        typer.Option("--strategy-runs", metavar="N", help="Runs per seed of the strategy comparison (default 100)."),
    ] = None,
) -> None:
    """Run the benchmarks: each one's JSON as soon as it finishes, progress on stderr.

    Without --out each result is one line of JSON on stdout.
    """
    from .bench import BENCHMARKS, Progress, UnknownBenchmark, check_names, run_benchmarks
    from .bench.progress import BarProgress, LineProgress, to_folder, to_stdout

    try:
        names = check_names(only) if only else list(BENCHMARKS)
    except UnknownBenchmark as e:
        _die(str(e))
    if not names:  # --only "" or --only ,
        _die("--only: no benchmark named (choose from: " + ", ".join(BENCHMARKS) + ")")
    from .bench.fuzz import BUDGET_VARIABLE
    from .bench.strategies import RUNS_VARIABLE

    if fuzz_budget is not None:
        _check_seconds("--fuzz-budget", fuzz_budget)
        os.environ[BUDGET_VARIABLE] = repr(fuzz_budget)
    elif "fuzz" in names and os.environ.get(BUDGET_VARIABLE):  # the benchmark reads it late: check it now
        try:
            _check_seconds(BUDGET_VARIABLE, float(os.environ[BUDGET_VARIABLE]))
        except ValueError:
            _die(f"{BUDGET_VARIABLE} must be a positive, finite number of seconds, not {os.environ[BUDGET_VARIABLE]!r}")
    if strategy_runs is not None:
        if strategy_runs < 1:
            _die("--strategy-runs must be a positive number of runs")
        os.environ[RUNS_VARIABLE] = str(strategy_runs)
    elif "strategy_comparison" in names and os.environ.get(RUNS_VARIABLE):
        asked = os.environ[RUNS_VARIABLE]
        if not (asked.strip().isdigit() and int(asked) >= 1):
            _die(f"{RUNS_VARIABLE} must be a positive number of runs, not {asked!r}")
    emit = to_stdout
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _die(_one_line(f"cannot create {out}: {e.strerror or e}"))
        emit = to_folder(out)
    progress: Progress = BarProgress() if sys.stderr.isatty() else LineProgress(sys.stderr)
    try:
        if isinstance(progress, BarProgress):
            if out is None and sys.stdout.isatty():
                emit = progress.to_terminal  # above the bar, not through it
            with progress:
                run_benchmarks(names, quick, emit, progress)
        else:
            run_benchmarks(names, quick, emit, progress)
    except OSError as e:
        _die(_one_line(f"cannot write a benchmark result: {e.strerror or e}"))
    except KeyboardInterrupt:
        typer.echo("asyncvm: interrupted", err=True)
        raise typer.Exit(130) from None


@app.command()
def soak(
    calls: Annotated[int, typer.Option("--calls", metavar="N", help="uAPI calls the state machine makes.")] = 2000,
    replays: Annotated[
        int, typer.Option("--replays", metavar="M", help="Schedules replayed here and in a fresh process.")
    ] = 200,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the fuzzing and of the campaigns.")] = 0,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", metavar="NAME", help="Kernel profile to fuzz (repeatable); default: every kernel."),
    ] = None,
) -> None:
    """Fuzz every ioctl and audit replay; exit 1 on any finding.

    A Hypothesis state machine makes the calls: each must succeed or fail with an errno the spec
    lists for it (a wrong Python type: a TypeError). M schedules of every bundled scenario must
    replay to the same event log here and in a fresh process with another PYTHONHASHSEED.
    """
    from .explore.soak import soak_command

    code = soak_command(calls, replays, seed, profile or [], echo=typer.echo, fail=_die)
    raise typer.Exit(code)


def _click_errors() -> tuple[type[Exception], type[Exception], type[Exception] | None, tuple[type[BaseException], ...]]:
    """(ClickException, UsageError, NoArgsIsHelpError, Abort classes) of the click that typer uses.

    Newer typer releases vendor click (``typer._click``), older ones use click itself: find the
    classes through ``typer.BadParameter`` rather than importing either by name.
    """
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    usage, base = mro["UsageError"], mro["ClickException"]
    module = sys.modules[usage.__module__]
    no_args = getattr(module, "NoArgsIsHelpError", None)
    aborts = tuple({typer.Abort, getattr(module, "Abort", typer.Abort)})
    return base, usage, no_args, aborts


EXIT_INTERNAL = 3


def _crash_report(e: BaseException, argv: list[str] | None) -> str:
    """Write the traceback of an internal error to a crash report; one line saying where."""
    import platform
    import tempfile
    import traceback
    from datetime import UTC, datetime

    from . import __version__
    from .explore.schedule import write_atomic

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"asyncvm-crash-{stamp}-{os.getpid()}.txt"
    text = (
        f"asyncvm {__version__} internal error\n"
        f"command: asyncvm {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"python: {sys.version.split()[0]} on {platform.platform()}\n\n" + "".join(traceback.format_exception(e))
    )
    try:
        write_atomic(path, text)
    except OSError as err:
        return f"could not write a crash report: {err.strerror or err}"
    return f"crash report: {path}"


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors are one line on stderr and exit 2, like input errors;
    an internal error (a bug in asyncvm) is one line naming its crash report, exit 3."""
    try:
        _main(argv)
    except Exception as e:  # noqa: BLE001 - every escaping exception is asyncvm's own bug
        where = _crash_report(e, argv)
        typer.echo(f"asyncvm: internal error: {_one_line(f'{type(e).__name__}: {e}')} ({where})", err=True)
        sys.exit(EXIT_INTERNAL)


def _main(argv: list[str] | None) -> None:
    click_exception, usage_error, no_args_is_help, aborts = _click_errors()
    try:
        rc = app(args=argv, prog_name="asyncvm", standalone_mode=False)
    except usage_error as e:
        if no_args_is_help is not None and isinstance(e, no_args_is_help):
            e.show()  # type: ignore[attr-defined]
            sys.exit(EXIT_USAGE)
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "asyncvm"
        message = e.format_message()  # type: ignore[attr-defined]
        typer.echo(f"asyncvm: error: {_one_line(message)} (see '{cmd} --help')", err=True)
        sys.exit(EXIT_USAGE)
    except click_exception as e:
        typer.echo(f"asyncvm: error: {_one_line(e.format_message())}", err=True)  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    except aborts:
        typer.echo("asyncvm: aborted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else EXIT_CLEAN)


if __name__ == "__main__":
    main()
