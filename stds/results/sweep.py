"""Sweep reports: one row per run, and top-1 accuracy against connectivity (the paper's figure).

`collect_runs(paths)` (`stds.results.collect`) reads every run under ``paths`` into a `RunRecord`;
`write_report(runs, out_dir)` marks the trials of searches and their Pareto front
(`stds.results.trials`), then writes ``report.csv`` and ``report.md`` (`stds.results.tables`) and
``report.png`` (`stds.results.plot`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from stds.results.collect import collect_runs, find_run_dirs, read_run
from stds.results.record import RunRecord, method_label, sort_runs
from stds.results.paper import PAPER_CIFAR10_STDS
from stds.results.plot import plot
from stds.results.trials import mark_trials
from stds.results.energy_plot import plot_energy
from stds.results.tables import markdown, write_csv
from stds.run.files.atomic import write_atomic

__all__ = [
    "PAPER_CIFAR10_STDS",
    "RunRecord",
    "collect_runs",
    "find_run_dirs",
    "method_label",
    "read_run",
    "write_report",
]


def write_report(runs: Iterable[RunRecord], out_dir: Path | str) -> dict[str, Path]:
    """Write ``report.csv``, ``report.md``, ``report.png`` and, when a run has ``energy_uj``,
    ``report_energy.png`` into ``out_dir``; their paths (``energy_png`` only when written). Each is
    written by `stds.run.files.atomic.write_atomic`: a symlink planted at one is replaced."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sort_runs(runs)
    mark_trials(ordered)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("csv", "md", "png")}
    write_csv(ordered, paths["csv"], out_dir)
    energy_png = out_dir / "report_energy.png"
    with_energy = plot_energy(ordered, energy_png)
    text = markdown(ordered, out_dir, image=paths["png"].name)
    if with_energy:
        text += f"\n![test_acc1 against energy_uj]({energy_png.name})\n"
        paths["energy_png"] = energy_png
    write_atomic(paths["md"], text)
    plot(ordered, paths["png"])
    return paths
