"""What a report knows of one run (`RunRecord`, fields named as in ``docs/metrics.md``), how its
method is named (`method_label`), and the report's order and point labels."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

_METHOD_ORDER = ("dense", "STDS-sine", "STDS-linear", "STDS-constant", "STDS-target", "Grad R", "GMP")


@dataclass
class RunRecord:
    """What a report shows of one run, under the names of ``docs/metrics.md``; figures a run has
    not produced yet are None."""

    path: Path
    status: str  # finished / pruned / running / stopped / failed / damaged (a file refused or cut)
    error: str = ""
    dataset: str | None = None
    model: str | None = None
    method: str | None = None
    flat_width: float | None = None  # D, the config value (None for dense runs)
    alpha_gr: float | None = None  # α
    target_sparsity: float | None = None  # S of scheduler=target (None for other schedules)
    T: int | None = None
    epoch: int = 0  # epochs completed
    epochs_planned: int | None = None
    test_acc1: float | None = None
    best_test_acc1: float | None = None
    best_epoch: int | None = None
    test_acc5: float | None = None
    sparsity: float | None = None
    d: float | None = None  # the threshold at the last evaluated epoch
    synops: float | None = None
    first_layer_macs: float | None = None
    firing_rates: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    # trials of a search (stds.results.trials.mark_trials): number, searched values, and
    # "front" / "infeasible" / "" (dominated); None for runs no search started
    trial: int | None = None
    params: str | None = None
    pareto: str | None = None
    # the run's metrics.json as read (else its last metrics.jsonl line): what registered report
    # columns (stds.results.columns.register_column(metric=...)) read their values from
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def connectivity(self) -> float | None:
        """1 - sparsity: the fraction of weights kept."""
        return None if self.sparsity is None else 1.0 - self.sparsity

    @property
    def firing_rate_mean(self) -> float | None:
        """Unweighted mean of the per-layer firing rates."""
        rates = list(self.firing_rates.values())
        return sum(rates) / len(rates) if rates else None


def method_label(method: str | None, schedule: str | None, alpha_gr: float | None) -> str | None:
    """dense (identity) / GMP (gmp: its schedule is its own) / Grad R (pruned, α > 0) /
    STDS-<schedule> (stmod; STDS-target for ``scheduler=target``) / st-<schedule>."""
    if method is None:
        return None
    if method == "identity":
        return "dense"
    if method == "gmp":
        return "GMP"
    if alpha_gr is not None and alpha_gr > 0:
        return "Grad R"
    suffix = f"-{schedule}" if schedule else ""
    if method == "stmod":
        return f"STDS{suffix}"
    return f"{method}{suffix}"


def natural_key(path: Path) -> list[Any]:
    """Path order with numbers compared as numbers (``2`` before ``10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _sort_key(run: RunRecord) -> tuple:
    method = run.method or ""
    rank = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)

    def low_first(value: float | None) -> float:
        return -math.inf if value is None else value

    return (run.dataset or "", run.model or "", rank, method, low_first(run.target_sparsity),
            low_first(run.flat_width), low_first(run.alpha_gr), natural_key(run.path))


def sort_runs(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Report order: dataset, model, method (dense first), target_sparsity, flat_width,
    alpha_gr, path."""
    return sorted(runs, key=_sort_key)


def point_label(run: RunRecord) -> str:
    """What a plotted point varies: target_sparsity, alpha_gr (Grad R) or flat_width."""
    if run.target_sparsity is not None:
        return f"target_sparsity={run.target_sparsity:g}"
    if run.method == "Grad R":
        return f"alpha_gr={run.alpha_gr:g}" if run.alpha_gr is not None else ""
    return f"flat_width={run.flat_width:g}" if run.flat_width is not None else ""


def at_zero_connectivity(run: RunRecord) -> bool:
    """Every weight pruned: off a log axis, drawn at its floor instead."""
    return run.test_acc1 is not None and run.connectivity is not None and run.connectivity <= 0
