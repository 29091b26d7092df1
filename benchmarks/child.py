"""Helpers shared by the vLLM benchmarks: run a script in a fresh interpreter and collect its JSON result, and
print / save a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_child(script: str, args: list[str], what: str, timeout: int) -> tuple[dict, str]:
    """Run `python -c script *args`; returns (the JSON after its "RESULT " line, its stderr + stdout)."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    return result, proc.stderr + proc.stdout


def emit(report: dict, out: Path | None, filename: str) -> None:
    """Print the report as JSON, and write it to out/filename when out is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / filename).write_text(text)
