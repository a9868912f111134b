"""The asyncvm command line: stress, replay, shrink, show, bench, scenarios."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="asyncvm",
    help="Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Hunt races in the Linux KVM guest-memory paths under a controlled, replayable scheduler."""


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
        raise typer.BadParameter(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    results = {name: BENCHMARKS[name](quick) for name in names}
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
