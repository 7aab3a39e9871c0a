"""The report's tables: ``report.csv`` (every field of every run) and ``report.md`` (the columns
that vary, percentages, warnings and failed points); columns named as in ``docs/metrics.md``."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from stds.results.record import RunRecord, at_zero_connectivity, point_label
from stds.results.columns import COLUMNS, Column, percent
from stds.results.paper import PAPER_CIFAR10_STDS, PAPER_LABEL, PAPER_SETTING
from stds.run.files.atomic import write_atomic

def _relative(path: Path, base: Path) -> str:
    try:
        name = os.path.relpath(path, base)
    except ValueError:  # another drive
        return str(path)
    return "." if name == "." else name


def csv_columns() -> list[Column]:
    """``report.csv``'s columns (`stds.results.columns.COLUMNS` with ``csv``): the names of
    ``docs/metrics.md``, plus run, status, error, dataset, model, method, T, firing_rate_mean (the
    unweighted mean of ``firing_rates``) and overrides; for trials of a search: trial (its
    number), params (the searched values) and pareto (front, infeasible, or empty when dominated)."""
    return [column for column in COLUMNS.values() if column.csv]


def _csv_row(run: RunRecord, base: Path) -> dict[str, Any]:
    """Raw values (fractions, counts per sample); absent values are empty cells; the per-layer
    firing rates and the warnings as JSON."""
    values = {column.name: column.value(run) for column in csv_columns()}
    values["run"] = _relative(run.path, base)
    return {key: "" if value is None else value for key, value in values.items()}


def write_csv(runs: list[RunRecord], path: Path, base: Path) -> None:
    """``report.csv`` by `stds.run.files.atomic.write_atomic` (a symlink at ``path`` is replaced)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[column.name for column in csv_columns()])
    writer.writeheader()
    for run in runs:
        writer.writerow(_csv_row(run, base))
    write_atomic(path, text.getvalue())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_columns(runs: list[RunRecord]) -> list[Column]:
    """The table's columns: those with ``md``, less those whose ``shown`` no run meets
    (``target_sparsity`` only when a run has one; trial, params and pareto only for searches)."""
    shown = [c for c in COLUMNS.values() if c.md and (c.shown is None or c.shown(runs))]
    return sorted(shown, key=lambda c: c.last)  # stable: registration order within each part


def _md_cell(run: RunRecord, column: Column, base: Path) -> str:
    if column.name == "run":
        return _relative(run.path, base)
    return column.cell(column.value(run))


def markdown(runs: list[RunRecord], base: Path, image: str | None = "report.png") -> str:
    """The report as Markdown: counts by status, the table, warnings, firing rates, the plot
    (with the runs at 0% connectivity listed under it)."""
    counts = {s: sum(r.status == s for r in runs)
              for s in ("finished", "pruned", "running", "stopped", "failed", "damaged")}
    columns = _md_columns(runs)
    lines = [
        "# Sweep report", "",
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}: {counts['finished']} finished, "
        f"{counts['running']} running, {counts['failed']} failed"
        + "".join(f", {counts[s]} {s}" for s in ("pruned", "stopped", "damaged") if counts[s])
        + ". Figures of the last evaluated "
        "epoch, named as in docs/metrics.md: flat_width = D, d = the threshold reached; "
        "connectivity = 1 - sparsity; synops per test sample (spikes x non-zero weights, summed "
        "over T); firing_rate_mean: mean over spiking layers of spikes per neuron per step.",
        "",
        "| " + " | ".join(c.title for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(_md_cell(run, c, base)) for c in columns) + " |"
              for run in runs]
    lines += _warning_lines(runs, base)
    with_rates = [run for run in runs if run.firing_rates]
    if with_rates:
        lines += ["", "## Firing rates per spiking layer", ""]
        for run in with_rates:
            rates = ", ".join(f"{name} {rate:.4f}" for name, rate in run.firing_rates.items())
            lines.append(f"- `{_relative(run.path, base)}`: {rates}")
    if any((r.dataset, r.model) == PAPER_SETTING for r in runs):
        lines += ["", f"Reference points: {PAPER_LABEL}, final test_acc1 at final sparsity: " + "; ".join(
            f"flat_width={d:g}: {100 * a:.2f}% at {100 * s:.2f}%" for d, a, s in PAPER_CIFAR10_STDS) + "."]
    if image:
        lines += ["", f"![test_acc1 against connectivity]({image})"]
    lines += _zero_connectivity_lines(runs, base)
    return "\n".join(lines) + "\n"


def _warning_lines(runs: list[RunRecord], base: Path) -> list[str]:
    """The ``warnings`` of ``metrics.json``, one item per warning, under the table."""
    warned = [run for run in runs if run.warnings]
    if not warned:
        return []
    lines = ["", "## Warnings", ""]
    for run in warned:
        lines += [f"- `{_relative(run.path, base)}`: {_cell(w)}" for w in run.warnings]
    return lines


def _zero_connectivity_lines(runs: list[RunRecord], base: Path) -> list[str]:
    zero = [run for run in runs if at_zero_connectivity(run)]
    if not zero:
        return []
    items = ", ".join(
        f"`{_relative(run.path, base)}` ({run.method}, {point_label(run) or '-'}: test_acc1 "
        f"{percent(run.test_acc1)}, {run.status})" for run in zero)
    return ["", "Runs at 0% connectivity (every weight pruned) have no place on the log axis; "
            f"the plot draws them at its left edge as triangles (◀): {items}."]


