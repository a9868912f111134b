"""The asyncvm command line: stress, replay, shrink, show, scenarios, bench.

Exit codes: 0 clean, 1 failures found (or the replayed execution failed), 2 usage or input error.
Every input problem is one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="asyncvm",
    help="Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_CLEAN, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


def _die(message: str) -> None:
    typer.echo(f"asyncvm: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _die(f"--param wants KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _load_modules(modules: list[str] | None) -> None:
    from .explore.scenarios import UnknownScenario, load_bundled, load_module

    load_bundled()
    for m in modules or []:
        try:
            load_module(m)
        except UnknownScenario as e:
            _die(str(e))


def _resolve(name: str, modules: list[str] | None) -> Any:
    from .explore.scenarios import UnknownScenario, get_scenario

    _load_modules(modules)
    try:
        return get_scenario(name)
    except UnknownScenario as e:
        _die(str(e))


@app.callback()
def _root() -> None:
    """Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler."""


@app.command()
def scenarios(
    module: Annotated[list[str] | None, typer.Option("--module", "-m", help="Also import this module.")] = None,
) -> None:
    """List the registered scenarios with a one-line description and their parameters."""
    from .explore.scenarios import REGISTRY

    _load_modules(module)
    if not REGISTRY:
        typer.echo("no scenarios registered")
        return
    width = max(len(n) for n in REGISTRY)
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        params = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
        typer.echo(f"{name:<{width}}  {spec.description}")
        if params:
            typer.echo(f"{'':<{width}}    params: {params}")


@app.command()
def stress(
    scenario: Annotated[str, typer.Argument(help="A registered scenario (see `asyncvm scenarios`).")],
    runs: Annotated[
        int | None, typer.Option(help="Executions to run (default 1000, or unbounded with --time).")
    ] = None,
    time_budget: Annotated[float | None, typer.Option("--time", help="Stop after this many seconds.")] = None,
    strategy: Annotated[str, typer.Option(help="random, pct, idpct, pos, dfs or portfolio.")] = "pct",
    depth: Annotated[int, typer.Option(help="PCT bug depth (priority change points + 1).")] = 3,
    preemptions: Annotated[int, typer.Option(help="DFS preemption bound.")] = 2,
    seed: Annotated[int, typer.Option(help="Campaign seed: the same seed finds the same failures.")] = 0,
    jobs: Annotated[int, typer.Option(help="Worker processes (default: all cores).")] = 0,
    dask: Annotated[str | None, typer.Option(help="Address of a Dask distributed scheduler.")] = None,
    profile: Annotated[str, typer.Option(help="Kernel profile: 6.10, 6.18 or 7.0.")] = "6.18",
    bug: Annotated[list[str] | None, typer.Option("--bug", help="Inject a named bug (repeatable).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Scenario parameter KEY=VALUE.")] = None,
    stop_on_first_failure: Annotated[bool, typer.Option(help="Stop at the first failing execution.")] = False,
    out: Annotated[Path, typer.Option(help="Output folder for campaigns.")] = Path("logs"),
    shrink: Annotated[bool, typer.Option("--shrink/--no-shrink", help="Shrink each failure.")] = True,
    resume: Annotated[Path | None, typer.Option(help="Continue the campaign in this folder.")] = None,
    max_steps: Annotated[int, typer.Option(help="Steps per execution before it counts as a livelock.")] = 200_000,
    module: Annotated[list[str] | None, typer.Option("--module", "-m", help="Import scenarios from a module.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run a stress campaign: many schedules of SCENARIO, failures saved with replayable schedules."""
    from .bugs import BUGS
    from .explore.campaign import CampaignSpec
    from .profile import PROFILES
    from .runtime.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        _die(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if profile not in PROFILES:
        _die(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    for b in bug or []:
        if b not in BUGS:
            _die(f"unknown bug {b!r}; known bugs: {', '.join(sorted(BUGS))}")
    if runs is not None and runs <= 0:
        _die("--runs must be positive")
    if depth < 1:
        _die("--depth must be at least 1")
    if resume is None:
        spec_fn = _resolve(scenario, module)
        try:
            from .explore.engine import scenario_params

            params = scenario_params(spec_fn.fn, _parse_params(param))
        except ValueError as e:
            _die(str(e))
        total = runs if runs is not None else (10**12 if time_budget else 1000)
        spec = CampaignSpec(
            scenario=scenario,
            module=module[0] if module else None,
            params=params,
            profile=profile,
            bugs=list(bug or []),
            max_steps=max_steps,
            strategy=strategy,
            seed=seed,
            depth=depth,
            preemptions=preemptions,
            runs=total,
            stop_on_first_failure=stop_on_first_failure,
        )
    else:
        _load_modules(module)
        spec = CampaignSpec(scenario=scenario)
    jobs = jobs or os.cpu_count() or 1
    from .explore.schedule import ScheduleError

    try:
        report, folder = _run_with_progress(spec, out, jobs, dask, time_budget, shrink, resume, quiet)
    except ScheduleError as e:
        _die(str(e))
    typer.echo(report.summary())
    typer.echo(f"campaign folder: {folder}")
    for f in report.failures:
        from .explore.runner import slug

        typer.echo(f"  replay: asyncvm replay {folder / slug(f.signature) / 'schedule.json'}")
    raise typer.Exit(EXIT_FAILURES if report.failures else EXIT_CLEAN)


def _run_with_progress(
    spec: Any,
    out: Path,
    jobs: int,
    dask: str | None,
    time_budget: float | None,
    do_shrink: bool,
    resume: Path | None,
    quiet: bool,
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .explore.runner import run_campaign

    if quiet or (not sys.stderr.isatty() and os.environ.get("ASYNCVM_PROGRESS") != "1"):
        return run_campaign(
            spec, out=out, jobs=jobs, dask=dask, time_budget=time_budget, do_shrink=do_shrink, resume=resume
        )
    total = None if spec.runs >= 10**12 else spec.runs
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} runs/s"),
        TextColumn("failures {task.fields[failing]}"),
        TextColumn("signatures {task.fields[distinct]}"),
        TimeElapsedColumn(),
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

        return run_campaign(
            spec,
            out=out,
            jobs=jobs,
            dask=dask,
            time_budget=time_budget,
            do_shrink=do_shrink,
            resume=resume,
            on_progress=tick,
        )


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
        _die(f"{file}: {e}")
    return schedule, spec


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="A schedule.json written by a campaign or by Schedule.save().")],
    log_level: Annotated[
        str, typer.Option(help="info: the failure and the events around it; debug: every event.")
    ] = "info",
    context: Annotated[int, typer.Option(help="Events shown before the failure at --log-level info.")] = 25,
    force: Annotated[bool, typer.Option(help="Replay even if asyncvm's version or the parameters differ.")] = False,
    module: Annotated[list[str] | None, typer.Option("--module", "-m", help="Import scenarios from a module.")] = None,
) -> None:
    """Replay a schedule exactly and print the failure with the events around it."""
    from .explore.engine import replay as do_replay
    from .explore.schedule import ScheduleError
    from .runtime.failures import ToolError
    from .trace.log import print_events

    schedule, spec = _load(file, module)
    try:
        result = do_replay(schedule, spec.fn, force=force, record=True)
    except (ScheduleError, ToolError) as e:
        _die(f"{file}: {e}")
    events = result.events()
    if log_level != "debug" and result.failure is not None:
        events = events[-(context + 1) :]
    elif log_level != "debug":
        events = events[-context:]
    print_events(events, sys.stdout)
    if result.failure is None:
        typer.echo(f"replayed {result.steps} steps: no failure")
        raise typer.Exit(EXIT_CLEAN)
    typer.echo(f"REPRODUCED {result.failure}")
    raise typer.Exit(EXIT_FAILURES)


@app.command()
def shrink(
    file: Annotated[Path, typer.Argument(help="A failing schedule.json.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write (default: *.shrunk.json).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Shrink even if asyncvm's version differs.")] = False,
    module: Annotated[list[str] | None, typer.Option("--module", "-m", help="Import scenarios from a module.")] = None,
) -> None:
    """Shrink a failing schedule to the fewest preemptions (then steps) that keep its failure."""
    from .explore.schedule import ScheduleError
    from .explore.shrink import shrink as do_shrink
    from .explore.shrink import shrunk_path
    from .runtime.failures import ToolError

    schedule, spec = _load(file, module)
    try:
        small = do_shrink(schedule, spec.fn, force=force)
    except (ScheduleError, ToolError) as e:
        _die(f"{file}: {e}")
    target = output or shrunk_path(file)
    small.save(target)
    typer.echo(
        f"{schedule.preemptions} -> {small.preemptions} preemptions, {len(schedule.choices)} -> "
        f"{len(small.choices)} choices: {target}"
    )


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="A schedule.json.")],
    html: Annotated[Path | None, typer.Option(help="Also write the HTML timeline here.")] = None,
    trace: Annotated[Path | None, typer.Option(help="Also write Chrome/Perfetto trace JSON here.")] = None,
    force: Annotated[bool, typer.Option(help="Show even if asyncvm's version differs.")] = False,
    module: Annotated[list[str] | None, typer.Option("--module", "-m", help="Import scenarios from a module.")] = None,
) -> None:
    """Print the schedule's timeline in the terminal (a column per task); optionally write HTML/trace."""
    from rich.console import Console
    from rich.table import Table

    from .explore.engine import replay as do_replay
    from .explore.schedule import ScheduleError, write_atomic
    from .runtime.failures import ToolError
    from .trace.chrome import chrome_trace
    from .trace.timeline import timeline_html

    schedule, spec = _load(file, module)
    try:
        result = do_replay(schedule, spec.fn, force=force, record=True)
    except (ScheduleError, ToolError) as e:
        _die(f"{file}: {e}")
    events = result.events()
    names = result.task_names
    table = Table(title=f"{schedule.scenario} ({len(schedule.choices)} choices, {result.preemptions} preemptions)")
    table.add_column("step", justify="right")
    for n in names:
        table.add_column(n)
    for ev in events:
        if ev["op"] in ("yield", "cond_resched"):
            continue
        cells = [""] * len(names)
        col = names.index(ev["task"]) if ev.get("task") in names else 0
        text = f"{ev['op']} {ev.get('obj') or ''}".strip()
        if ev["op"] == "failure":
            text = f"[bold red]FAILURE {ev.get('obj')}[/]"
        cells[col] = text
        table.add_row(str(ev.get("step")), *cells)
    Console(width=max(100, 24 * (len(names) + 1))).print(table)
    if result.failure is not None:
        typer.echo(f"failure: {result.failure}")
    if html is not None:
        write_atomic(html, timeline_html(events, names, result.failure, f"{schedule.scenario}"))
        typer.echo(f"timeline: {html}")
    if trace is not None:
        write_atomic(trace, json.dumps(chrome_trace(events, names, result.failure)))
        typer.echo(f"trace: {trace}")


@app.command()
def bench(
    only: Annotated[list[str] | None, typer.Option("--only", help="Run just these benchmarks (repeatable).")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer repetitions: a smoke run, not a measurement.")] = False,
) -> None:
    """Run the benchmarks and print their measurements and ratios as JSON."""
    from .bench import BENCHMARKS

    names = only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        _die(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    results = {name: BENCHMARKS[name](quick) for name in names}
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
