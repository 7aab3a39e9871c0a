"""A run's figures as a search's objectives and constraints (`trial_outcome`), read from its files.

Constraints follow Optuna's convention: one value per bound, met when <= 0. A bound ``min`` asks
for ``value >= min`` (``min - value``), a bound ``max`` for ``value <= max`` (``value - max``).
The run that is a trial (`stds.run.life.study_link`) and the search that started it
(`stds.cli.study.driver`) both tell the study what this module reads, so the two always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from stds.run.files.safe import first_line, read_json

__all__ = ["OBJECTIVE_METRICS", "Bound", "Outcome", "constraint_values", "trial_outcome"]

OBJECTIVE_METRICS = ("test_acc1", "best_test_acc1", "test_acc5", "sparsity", "d", "synops",
                     "first_layer_macs", "energy_uj")
"""Names of ``metrics.json`` (``docs/metrics.md``) a search may optimise or constrain."""


@dataclass(frozen=True)
class Bound:
    """Allowed range of one metric: ``min <= value <= max``; None leaves that side open."""

    min: float | None = None
    max: float | None = None


def constraint_values(values: Mapping[str, float | None], bounds: Mapping[str, Bound]) -> list[float]:
    """One value per set bound, in ``bounds`` order: <= 0 where it holds; a missing or
    non-finite metric counts as violated (inf)."""
    out: list[float] = []
    for name, bound in bounds.items():
        value = values.get(name)
        known = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if bound.min is not None:
            out.append(bound.min - value if known else math.inf)  # type: ignore[operator]
        if bound.max is not None:
            out.append(value - bound.max if known else math.inf)  # type: ignore[operator]
    return out


@dataclass(frozen=True)
class Outcome:
    """What a trial's run directory says: objective values, or why it failed (``error``);
    ``pruned``: the run was stopped early by the study's pruner (no values then)."""

    values: list[float] | None
    constraints: list[float] = field(default_factory=list)
    error: str = ""
    pruned: bool = False


def _first_line(path: Path) -> str | None:
    try:
        return first_line(path, path.parent)  # a refused file gives its refusal, never its content
    except OSError:
        return None


def read_metrics(run_dir: Path) -> dict | None:
    """``metrics.json`` of ``run_dir`` as a dict, or None (missing, refused -- a symlink, a FIFO --,
    cut, not an object), read by `stds.run.files.safe`."""
    try:
        metrics = read_json(run_dir / "metrics.json", run_dir)
    except OSError:
        return None
    return metrics if isinstance(metrics, dict) else None


def trial_outcome(run_dir: Path, objectives: Sequence[str], bounds: Mapping[str, Bound],
                  job_error: str | None = None) -> Outcome:
    """The trial's result from its files: the objectives of ``metrics.json`` (each a finite
    number; ``pruned`` when the run says it was stopped by the pruner), else the first line of
    ``error.txt``, else ``job_error``, else "died"."""
    metrics = read_metrics(run_dir)
    if metrics is not None:
        if metrics.get("pruned") is True:
            return Outcome(None, error="stopped early by the pruner", pruned=True)
        values: list[float] = []
        for name in objectives:
            value = metrics.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return Outcome(None, error=f"metrics.json has {name}={value!r}, not a finite number")
            values.append(float(value))
        return Outcome(values, constraint_values(metrics, bounds))
    why = _first_line(run_dir / "error.txt") or job_error
    return Outcome(None, error=why or f"the trial ended without metrics.json or error.txt (its job "
                                      f"died or was stopped); see {run_dir}")
