"""The report's figure ``report.png``: test top-1 against connectivity per (dataset, model), one
series per method, the published CIFAR-10 points beside runs of that setting, and the trials on a
search's Pareto front ringed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stds.results.record import RunRecord, at_zero_connectivity, point_label
from stds.results.paper import PAPER_CIFAR10_STDS, PAPER_LABEL, PAPER_SETTING
from stds.results.trials import FRONT
from stds.run.files.atomic import write_atomic

def _plottable(run: RunRecord) -> bool:
    return run.test_acc1 is not None and run.connectivity is not None


def _panels(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """Runs with an accuracy and a sparsity, grouped by (dataset, model), in report order."""
    panels: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        if _plottable(run) and run.method is not None:
            panels.setdefault((run.dataset or "?", run.model or "?"), []).append(run)
    return panels


def _draw_dense(ax: Any, runs: list[RunRecord]) -> None:
    """The dense accuracy (mean over finished dense runs) as a horizontal reference."""
    dense = [r.test_acc1 for r in runs if r.method == "dense" and r.status == "finished"]
    if dense:
        mean = sum(dense) / len(dense)  # type: ignore[arg-type]
        what = "dense" if len(dense) == 1 else f"dense, mean of {len(dense)}"
        ax.axhline(100 * mean, color="0.35", linestyle="--", linewidth=1.2,
                   label=f"{what}: {100 * mean:.2f}%")


def _draw_method(
    ax: Any, method: str, runs: list[RunRecord], color: str, hollow_label: str | None, below: bool
) -> bool:
    """One method: finished runs as a line sorted by connectivity, others as hollow markers;
    point labels (flat_width, alpha_gr or target_sparsity) above the points, or below them if
    ``below``. ``runs`` all have connectivity > 0.

    Returns whether a hollow marker was drawn.
    """
    ordered = sorted(runs, key=lambda r: r.connectivity)  # type: ignore[arg-type, return-value]
    done = [r for r in ordered if r.status == "finished"]
    xs = [100 * r.connectivity for r in done]  # type: ignore[operator]
    ys = [100 * r.test_acc1 for r in done]  # type: ignore[operator]
    ax.plot(xs, ys, marker="o", color=color, linewidth=1.6, label=method)
    hollow = False
    for run in ordered:
        x, y = 100 * run.connectivity, 100 * run.test_acc1  # type: ignore[operator]
        if run.status != "finished":
            ax.plot([x], [y], marker="o", markerfacecolor="white", color=color,
                    linestyle="none", label=None if hollow else hollow_label)
            hollow = True
        ax.annotate(point_label(run), (x, y), textcoords="offset points",
                    xytext=(4, -11) if below else (4, 5), fontsize=7, color=color)
    return hollow


FLOOR_LABEL = "0% connectivity (all pruned), drawn at the axis floor"
PARETO_LABEL = "Pareto front of the search (ringed)"


def _draw_pareto(ax: Any, runs: list[RunRecord]) -> None:
    """The trials on their search's Pareto front (``pareto == "front"``): a ring around each,
    joined by a dashed line in order of connectivity."""
    front = sorted((r for r in runs if r.pareto == FRONT), key=lambda r: r.connectivity)  # type: ignore[arg-type, return-value]
    if front:
        ax.plot([100 * r.connectivity for r in front], [100 * r.test_acc1 for r in front],  # type: ignore[operator]
                marker="o", markersize=13, markerfacecolor="none", markeredgecolor="crimson",
                markeredgewidth=1.6, color="crimson", linestyle="--", linewidth=1, label=PARETO_LABEL)


def _draw_floor(ax: Any, runs: list[RunRecord], colors: dict[str, str], floor: float) -> None:
    """Runs at 0% connectivity as left-pointing triangles on the left edge (x = ``floor``),
    hollow unless finished, labelled like the other points."""
    for index, run in enumerate(runs):
        color = colors.get(run.method or "", "black")
        face = color if run.status == "finished" else "white"
        y = 100 * run.test_acc1  # type: ignore[operator]
        ax.plot([floor], [y], marker="<", markersize=9, color=color, markerfacecolor=face,
                linestyle="none", clip_on=False, label=FLOOR_LABEL if index == 0 else None)
        ax.annotate(f"{point_label(run)} (0%)", (floor, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=7, color=color)


def _x_limits(xs: list[float]) -> tuple[float, float]:
    """Log-axis limits around the connectivities ``xs`` (percent), at least a decade wide."""
    low, high = min(xs) / 1.5, max(xs) * 1.5
    if high / low < 10:
        centre = math.sqrt(low * high)
        low, high = centre / math.sqrt(10), centre * math.sqrt(10)
    return low, high


def _draw_panel(ax: Any, setting: tuple[str, str], runs: list[RunRecord]) -> None:
    zero = [r for r in runs if at_zero_connectivity(r)]
    shown = [r for r in runs if not at_zero_connectivity(r)]
    xs = [100 * r.connectivity for r in shown if r.method != "dense"]  # type: ignore[operator]
    if setting == PAPER_SETTING:
        xs += [100 * (1 - s) for _, _, s in PAPER_CIFAR10_STDS]
    low, high = _x_limits(xs or [100.0])
    _draw_dense(ax, shown)
    methods = [m for m in dict.fromkeys(r.method for r in runs) if m != "dense"]
    colors = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    hollow_label: str | None = "running or failed (hollow)"
    for index, method in enumerate(methods):
        members = [r for r in shown if r.method == method]
        # the first method's labels go below its line, clear of the published points above it
        if _draw_method(ax, method, members, colors[method], hollow_label, below=index % 2 == 0):
            hollow_label = None
    _draw_pareto(ax, shown)
    if setting == PAPER_SETTING:
        _draw_paper(ax)
    _draw_floor(ax, zero, colors, low)
    _style_axes(ax, setting, (low, high))


def _draw_paper(ax: Any) -> None:
    """The published CIFAR-10 points, starred and labelled with their flat_width."""
    paper_xs = [100 * (1 - s) for _, _, s in PAPER_CIFAR10_STDS]
    paper_ys = [100 * a for _, a, _ in PAPER_CIFAR10_STDS]
    ax.plot(paper_xs, paper_ys, marker="*", markersize=9, color="black", linestyle=":",
            linewidth=1, label=PAPER_LABEL)
    for (d, _, _), x, y in zip(PAPER_CIFAR10_STDS, paper_xs, paper_ys):
        ax.annotate(f"flat_width={d:g}", (x, y), textcoords="offset points", xytext=(-6, 7),
                    ha="right", fontsize=7, color="0.25")


def _style_axes(ax: Any, setting: tuple[str, str], limits: tuple[float, float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_xlim(*limits)
    ax.margins(y=0.1)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("connectivity = 1 − sparsity (log scale)")
    ax.set_ylabel("test_acc1 [%]")
    ax.set_title(f"{setting[0]} / {setting[1]}")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def figure(runs: list[RunRecord]) -> Any:
    """The report's matplotlib Figure: test_acc1 against connectivity (log x), one panel per
    (dataset, model); each panel's D sweeps, target_sparsity sweeps and Grad R side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(runs)
    columns = max(min(len(panels), 2), 1)
    rows = max(math.ceil(len(panels) / columns), 1)
    fig = Figure(figsize=(7.0 * columns, 5.6 * rows), dpi=120)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no run has test_acc1 and sparsity yet", ha="center", va="center")
    for index, (setting, members) in enumerate(panels.items()):
        _draw_panel(fig.add_subplot(rows, columns, index + 1), setting, members)
    fig.tight_layout()
    return fig


def plot(runs: list[RunRecord], path: Path) -> None:
    """``report.png``: see `figure` (written by `stds.run.files.atomic.write_atomic`)."""
    fig = figure(runs)
    write_atomic(path, lambda handle: fig.savefig(handle, format="png"))


