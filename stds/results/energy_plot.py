"""``report_energy.png``: test top-1 against the energy per image (``energy_uj``, log scale), one
panel per (dataset, model), one series per method; written beside ``report.png`` when a run has
``energy_uj`` (``docs/metrics.md``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stds.results.record import RunRecord
from stds.run.files.atomic import write_atomic


def energy_of(run: RunRecord) -> float | None:
    """The run's ``energy_uj`` (µJ per image) if it is a positive finite number."""
    value = run.metrics.get("energy_uj")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _panels(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    panels: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        if run.test_acc1 is not None and energy_of(run) is not None and run.method is not None:
            panels.setdefault((run.dataset or "?", run.model or "?"), []).append(run)
    return panels


def _draw(ax: Any, setting: tuple[str, str], runs: list[RunRecord]) -> None:
    for index, method in enumerate(dict.fromkeys(r.method for r in runs)):
        members = sorted((r for r in runs if r.method == method), key=lambda r: energy_of(r) or 0.0)
        done = [r for r in members if r.status == "finished"]
        color = f"C{index % 10}"
        ax.plot([energy_of(r) for r in done], [100 * r.test_acc1 for r in done],  # type: ignore[operator]
                marker="o", color=color, linewidth=1.6, label=method)
        others = [r for r in members if r.status != "finished"]
        ax.plot([energy_of(r) for r in others], [100 * r.test_acc1 for r in others],  # type: ignore[operator]
                marker="o", markerfacecolor="white", color=color, linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel("energy_uj: energy per image [µJ] (log scale; docs/metrics.md)")
    ax.set_ylabel("test_acc1 [%]")
    ax.set_title(f"{setting[0]} / {setting[1]}")
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(fontsize=8, frameon=False)


def plot_energy(runs: list[RunRecord], path: Path) -> bool:
    """Write the figure to ``path`` if any run has an accuracy and an energy; whether it did."""
    panels = _panels(runs)
    if not panels:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7.0 * columns, 5.0 * rows), dpi=120)
    FigureCanvasAgg(fig)
    for index, (setting, members) in enumerate(panels.items()):
        _draw(fig.add_subplot(rows, columns, index + 1), setting, members)
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png"))  # never through a planted link
    return True
