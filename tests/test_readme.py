"""The README's Python example runs as written and does what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The Python block of the README's "Writing a scenario" section."""
    section = README.read_text().split("### Writing a scenario", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no Python example under 'Writing a scenario'"
    return found.group(1)


def test_the_readme_example_writes_one_schedule_per_failure_signature(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(readme_example())
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    head = proc.stdout.splitlines()[0]
    distinct = int(re.search(r"(\d+) distinct", head).group(1))  # type: ignore[union-attr]
    assert distinct >= 1, proc.stdout
    saved = sorted((tmp_path / "logs" / "failures").glob("*.json"))
    assert len(saved) == distinct, (saved, proc.stdout)
    for path in saved:
        # What replay returned (the failure again) and what shrink returned (a smaller schedule).
        assert f"logs/failures/{path.name}: " in proc.stdout, proc.stdout
    assert proc.stdout.count("shrunk from ") == distinct
