"""Where `asyncvm bench` reports: progress on stderr (lines, or a bar on a terminal), results on
stdout (one JSON line per benchmark) or in a folder (one JSON file per benchmark)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from ..explore.schedule import write_atomic
from . import Progress

#: the least time between two progress lines of one benchmark (its first and last always print)
LINE_EVERY = 2.0


class LineProgress(Progress):
    """One line per step on a stream that is not a terminal: `asyncvm bench: NAME done/total (what)`."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.name = ""
        self.header = ""
        self.last = 0.0
        self.said: tuple[int, int] | None = None

    def _say(self, text: str) -> None:
        self.stream.write(f"asyncvm bench: {text}\n")
        self.stream.flush()

    def start(self, index: int, count: int, name: str) -> None:
        self.name, self.header, self.last, self.said = name, f"[{index + 1}/{count}] {name}", 0.0, None
        self._say(f"{self.header} started")

    def tick(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if (done < total and now - self.last < LINE_EVERY) or (done, total) == self.said:
            return
        self.last, self.said = now, (done, total)
        self._say(f"{self.header} {done}/{total}" + (f" ({what})" if what else ""))

    def finish(self, name: str, seconds: float, where: str) -> None:
        self._say(f"{self.header} done in {seconds:.1f} s" + (f": {where}" if where else ""))


class BarProgress(Progress):
    """A rich progress bar on stderr, one row per benchmark (for a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task: Any = None

    def __enter__(self) -> BarProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, index: int, count: int, name: str) -> None:
        self.task = self.bar.add_task(f"[{index + 1}/{count}] {name}", total=None, what="")

    def tick(self, done: int, total: int, what: str) -> None:
        self.bar.update(self.task, completed=done, total=total, what=what)

    def finish(self, name: str, seconds: float, where: str) -> None:
        task = self.bar.tasks[-1]
        self.bar.update(self.task, completed=task.total or 1, total=task.total or 1, what=where or "done")

    def to_terminal(self, name: str, result: dict[str, Any]) -> str:
        """An emitter for a stdout that is the bar's terminal: each line above the bar, unwrapped."""
        self.bar.console.print(json.dumps(result), soft_wrap=True, markup=False, highlight=False)
        return ""


def to_stdout(name: str, result: dict[str, Any]) -> str:
    """One line of JSON per benchmark, flushed at once."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return ""


def to_folder(folder: Path) -> Any:
    """An emitter writing FOLDER/NAME.json atomically (a temporary file, then a rename)."""

    def emit(name: str, result: dict[str, Any]) -> str:
        return str(write_atomic(folder / f"{name}.json", json.dumps(result, indent=1) + "\n"))

    return emit
