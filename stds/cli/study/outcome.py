"""What a trial's run directory says: its objective values and constraints, or why it failed."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from stds.cli.study.settings import SearchSettings
from stds.errors import error_line
from stds.results.pareto import constraint_values

__all__ = ["Outcome", "reason", "trial_outcome"]


@dataclass(frozen=True)
class Outcome:
    """What a trial's run directory says: objective values, or why it failed (``error``)."""

    values: list[float] | None
    constraints: list[float] = field(default_factory=list)
    error: str = ""


def _first_line(path: Path) -> str | None:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[0] if lines else None


def trial_outcome(run_dir: Path, settings: SearchSettings, job_error: str | None = None) -> Outcome:
    """The trial's result from its files: the objectives of ``metrics.json`` (each a finite
    number), else the first line of ``error.txt``, else ``job_error``, else "died"."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if isinstance(metrics, dict):
        values: list[float] = []
        for name in settings.objectives:
            value = metrics.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return Outcome(None, error=f"metrics.json has {name}={value!r}, not a finite number")
            values.append(float(value))
        return Outcome(values, constraint_values(metrics, settings.constraints))
    why = _first_line(run_dir / "error.txt") or job_error
    return Outcome(None, error=why or f"the trial ended without metrics.json or error.txt (its job "
                                         f"died or was stopped); see {run_dir}")


def reason(exc: BaseException) -> str:
    """``Type: message`` on one line: why a trial failed, as ``error.txt`` would say it."""
    return error_line(exc).strip()
