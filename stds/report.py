"""Sweep reports: one row per run, and top-1 accuracy against connectivity (the paper's figure).

`collect_runs(paths)` finds every run directory under ``paths`` (a directory holding
``.hydra/config.yaml``; Hydra multirun layouts ``<sweep>/<n>/``, nested to any depth) and reads it
into a `RunRecord`; `write_report(runs, out_dir)` writes ``report.csv``, ``report.md`` and
``report.png``. The files of a run directory are described in ``docs/architecture.md``.

Status: ``metrics.json`` present -> finished (its figures); otherwise ``error.txt`` -> failed
(its first line is shown); otherwise running (figures of the last line of ``metrics.jsonl``).
Connectivity = 1 - sparsity. SynOps are per evaluated sample (`stds.synops`). The mean firing
rate is the unweighted mean over spiking layers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from stds.errors import StdsError

__all__ = [
    "PAPER_CIFAR10_STDS",
    "RunRecord",
    "collect_runs",
    "find_run_dirs",
    "method_label",
    "read_run",
    "write_report",
]

PAPER_CIFAR10_STDS: tuple[tuple[float, float, float], ...] = (
    # (D, final test top-1, final sparsity) from the published CIFAR-10 training logs of
    # Chen et al. (ICML 2022): STDS, sine schedule, T=8, the 6-conv/2-fc net, 2048 epochs
    (1.0, 0.9249, 0.9536),
    (2.0, 0.9249, 0.9777),
    (3.0, 0.9164, 0.9860),
    (4.0, 0.9106, 0.9901),
    (5.0, 0.9021, 0.9925),
)
PAPER_LABEL = "Chen et al. 2022 logs (STDS-sine, T=8, 2048 epochs)"
PAPER_SETTING = ("cifar10", "CIFAR10Net")
"""(dataset, model) of runs next to which the published points are drawn."""

_METHOD_ORDER = ("dense", "STDS-sine", "STDS-linear", "STDS-constant", "Grad R")
_RUN_MARKER = Path(".hydra") / "config.yaml"
_NOT_RUN_CHILDREN = {".hydra", "tb", "checkpoints"}


@dataclass
class RunRecord:
    """What a report shows of one run; figures a run has not produced yet are None."""

    path: Path
    status: str  # finished / running / failed
    error: str = ""
    dataset: str | None = None
    model: str | None = None
    method: str | None = None
    flat_width: float | None = None  # D (None for dense runs)
    alpha_gr: float | None = None  # α
    T: int | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    top1_final: float | None = None
    top1_best: float | None = None
    top5: float | None = None
    sparsity: float | None = None
    synops: float | None = None
    first_layer_macs: float | None = None
    firing_rates: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

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
    """dense (identity) / Grad R (pruned, α > 0) / STDS-<schedule> (stmod) / st-<schedule>."""
    if method is None:
        return None
    if method == "identity":
        return "dense"
    if alpha_gr is not None and alpha_gr > 0:
        return "Grad R"
    suffix = f"-{schedule}" if schedule else ""
    if method == "stmod":
        return f"STDS{suffix}"
    return f"{method}{suffix}"


def _natural_key(path: Path) -> list[Any]:
    """Path order with numbers compared as numbers (``2`` before ``10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    return (path / _RUN_MARKER).is_file()


def find_run_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """Every run directory at or under ``paths``, in natural path order, without duplicates."""
    found: dict[Path, None] = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise StdsError(f"{root} is not a directory; give sweep or run directories")
        for current, children, _files in os.walk(root):
            here = Path(current)
            if _is_run_dir(here):
                found[here.resolve()] = None
                children[:] = [c for c in children if c not in _NOT_RUN_CHILDREN]
            children.sort(key=lambda name: _natural_key(Path(name)))
    return sorted(found, key=_natural_key)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line being written (unparsable) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _select(cfg: DictConfig | None, key: str) -> Any:
    """``key`` of the run config, interpolations resolved; None if absent or unresolvable."""
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # a resolver this process does not know
        return None


def _short_target(target: Any) -> str | None:
    return None if target is None else str(target).rsplit(".", 1)[-1]


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_config(run_dir: Path) -> tuple[DictConfig | None, list[str]]:
    config, overrides = None, []
    try:
        loaded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config = loaded if isinstance(loaded, DictConfig) else None
    except Exception:
        pass
    try:
        listed = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
        overrides = [str(o) for o in listed if not str(o).startswith("hydra.")]  # type: ignore[union-attr]
    except Exception:
        pass
    return config, overrides


def _status(run_dir: Path, final: dict[str, Any] | None) -> tuple[str, str]:
    if final is not None:
        return "finished", ""
    error_file = run_dir / "error.txt"
    if error_file.exists():
        lines = [line.strip() for line in error_file.read_text().splitlines() if line.strip()]
        return "failed", lines[0] if lines else "unknown error"
    return "running", ""


def read_run(run_dir: Path | str) -> RunRecord:
    """One run directory as a `RunRecord` (a missing or partial file leaves its fields None)."""
    run_dir = Path(run_dir)
    cfg, overrides = _read_config(run_dir)
    final = _read_json(run_dir / "metrics.json")
    history = _read_jsonl(run_dir / "metrics.jsonl")
    status, error = _status(run_dir, final)
    alpha = _number(_select(cfg, "alpha_gr"))
    record = RunRecord(
        path=run_dir, status=status, error=error, overrides=overrides,
        dataset=_short_target(_select(cfg, "dataset._target_")),
        model=_short_target(_select(cfg, "model._target_")),
        method=method_label(_select(cfg, "sparse.method"), _select(cfg, "scheduler.kind"), alpha),
        alpha_gr=alpha,
        T=None if _number(_select(cfg, "T")) is None else int(_select(cfg, "T")),
        epochs_planned=None if _number(_select(cfg, "epochs")) is None else int(_select(cfg, "epochs")),
    )
    if record.method != "dense":  # a dense run has no threshold
        record.flat_width = _number(_select(cfg, "flat_width"))
    last = history[-1] if history else {}
    source = final if final is not None else last
    record.epochs_done = int(source.get("epoch") or 0)
    if final is not None and _number(final.get("epochs_planned")) is not None:
        record.epochs_planned = int(final["epochs_planned"])
    record.top1_final = _number(source.get("test_acc1"))
    record.top5 = _number(source.get("test_acc5"))
    record.sparsity = _number(source.get("sparsity"))
    record.synops = _number(source.get("synops"))
    record.first_layer_macs = _number(source.get("first_layer_macs"))
    rates = source.get("firing_rates") or last.get("firing_rates") or {}
    record.firing_rates = {str(k): float(v) for k, v in rates.items() if _number(v) is not None}
    best = [_number(r.get("test_acc1")) for r in history]
    best_values = [b for b in best if b is not None]
    if final is not None and _number(final.get("best_test_acc1")) is not None:
        record.top1_best = _number(final["best_test_acc1"])
    elif best_values:
        record.top1_best = max(best_values)
    return record


def collect_runs(paths: Iterable[Path | str]) -> list[RunRecord]:
    """A `RunRecord` for every run directory under ``paths`` (see `find_run_dirs`)."""
    paths = list(paths)
    runs = [read_run(run_dir) for run_dir in find_run_dirs(paths)]
    if not runs:
        shown = ", ".join(str(p) for p in paths)
        raise StdsError(f"no run directories (holding .hydra/config.yaml) under {shown}")
    return runs


def _sort_key(run: RunRecord) -> tuple:
    method = run.method or ""
    rank = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    return (run.dataset or "", run.model or "", rank, method,
            -math.inf if run.flat_width is None else run.flat_width,
            -math.inf if run.alpha_gr is None else run.alpha_gr, _natural_key(run.path))


def sort_runs(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Report order: dataset, model, method (dense first), D, α, path."""
    return sorted(runs, key=_sort_key)


def _relative(path: Path, base: Path) -> str:
    try:
        name = os.path.relpath(path, base)
    except ValueError:  # another drive
        return str(path)
    return "." if name == "." else name


_CSV_COLUMNS = (
    "run", "status", "error", "dataset", "model", "method", "D", "alpha", "T", "epochs_done",
    "epochs_planned", "top1_final", "top1_best", "top5", "sparsity", "connectivity", "synops",
    "first_layer_macs", "firing_rate_mean", "firing_rates", "overrides",
)


def _csv_row(run: RunRecord, base: Path) -> dict[str, Any]:
    """Raw values (fractions, counts per sample); absent values are empty cells."""
    values = {
        "run": _relative(run.path, base), "status": run.status, "error": run.error,
        "dataset": run.dataset, "model": run.model, "method": run.method, "D": run.flat_width,
        "alpha": run.alpha_gr, "T": run.T, "epochs_done": run.epochs_done,
        "epochs_planned": run.epochs_planned, "top1_final": run.top1_final,
        "top1_best": run.top1_best, "top5": run.top5, "sparsity": run.sparsity,
        "connectivity": run.connectivity, "synops": run.synops,
        "first_layer_macs": run.first_layer_macs, "firing_rate_mean": run.firing_rate_mean,
        "firing_rates": json.dumps(run.firing_rates) if run.firing_rates else None,
        "overrides": "; ".join(run.overrides),
    }
    return {key: "" if value is None else value for key, value in values.items()}


def write_csv(runs: list[RunRecord], path: Path, base: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            writer.writerow(_csv_row(run, base))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _plain(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def si(value: float | None) -> str:
    """``3287052.0`` -> ``3.29M``: three significant digits and k / M / G / T."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _status_cell(run: RunRecord) -> str:
    return f"failed: {run.error}" if run.status == "failed" else run.status


_MD_HEADER = (
    "run", "dataset", "model", "method", "D", "α", "T", "epochs", "top-1 final", "top-1 best",
    "top-5", "sparsity", "connectivity", "SynOps/sample", "1st-layer MACs", "firing rate",
    "status",
)


def _md_row(run: RunRecord, base: Path) -> list[str]:
    planned = "?" if run.epochs_planned is None else str(run.epochs_planned)
    return [
        _relative(run.path, base), run.dataset or "-", run.model or "-", run.method or "-",
        _plain(run.flat_width), _plain(run.alpha_gr), _plain(run.T),
        f"{run.epochs_done}/{planned}", _percent(run.top1_final), _percent(run.top1_best),
        _percent(run.top5), _percent(run.sparsity), _percent(run.connectivity), si(run.synops),
        si(run.first_layer_macs),
        "-" if run.firing_rate_mean is None else f"{run.firing_rate_mean:.4f}",
        _status_cell(run),
    ]


def markdown(runs: list[RunRecord], base: Path, image: str | None = "report.png") -> str:
    """The report as Markdown: counts by status, the table, firing rates, the plot."""
    counts = {s: sum(r.status == s for r in runs) for s in ("finished", "running", "failed")}
    lines = [
        "# Sweep report", "",
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}: {counts['finished']} finished, "
        f"{counts['running']} running, {counts['failed']} failed. Accuracies and sparsity of "
        "the last evaluated epoch; connectivity = 1 - sparsity; SynOps per test sample "
        "(spikes x non-zero weights, summed over T); firing rate: mean over spiking layers of spikes per neuron per step.",
        "",
        "| " + " | ".join(_MD_HEADER) + " |",
        "|" + "|".join("---" for _ in _MD_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in _md_row(run, base)) + " |" for run in runs]
    with_rates = [run for run in runs if run.firing_rates]
    if with_rates:
        lines += ["", "## Firing rates per spiking layer", ""]
        for run in with_rates:
            rates = ", ".join(f"{name} {rate:.4f}" for name, rate in run.firing_rates.items())
            lines.append(f"- `{_relative(run.path, base)}`: {rates}")
    if any((r.dataset, r.model) == PAPER_SETTING for r in runs):
        lines += ["", f"Reference points: {PAPER_LABEL}, final top-1 at final sparsity: " + "; ".join(
            f"D={d:g}: {100 * a:.2f}% at {100 * s:.2f}%" for d, a, s in PAPER_CIFAR10_STDS) + "."]
    if image:
        lines += ["", f"![top-1 accuracy against connectivity]({image})"]
    return "\n".join(lines) + "\n"


def _plottable(run: RunRecord) -> bool:
    return run.top1_final is not None and run.connectivity is not None and run.connectivity > 0


def _panels(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """Runs with an accuracy and a sparsity, grouped by (dataset, model), in report order."""
    panels: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        if _plottable(run) and run.method is not None:
            panels.setdefault((run.dataset or "?", run.model or "?"), []).append(run)
    return panels


def _point_label(run: RunRecord) -> str:
    if run.method == "Grad R":
        return f"α={run.alpha_gr:g}" if run.alpha_gr is not None else ""
    return f"D={run.flat_width:g}" if run.flat_width is not None else ""


def _draw_dense(ax: Any, runs: list[RunRecord]) -> None:
    """The dense accuracy (mean over finished dense runs) as a horizontal reference."""
    dense = [r.top1_final for r in runs if r.method == "dense" and r.status == "finished"]
    if dense:
        mean = sum(dense) / len(dense)  # type: ignore[arg-type]
        what = "dense" if len(dense) == 1 else f"dense, mean of {len(dense)}"
        ax.axhline(100 * mean, color="0.35", linestyle="--", linewidth=1.2,
                   label=f"{what}: {100 * mean:.2f}%")


def _draw_method(
    ax: Any, runs: list[RunRecord], color: str, hollow_label: str | None, below: bool
) -> bool:
    """One method: finished runs as a line sorted by connectivity, others as hollow markers;
    point labels (D or α) above the points, or below them if ``below``.

    Returns whether a hollow marker was drawn.
    """
    ordered = sorted(runs, key=lambda r: r.connectivity)  # type: ignore[arg-type, return-value]
    done = [r for r in ordered if r.status == "finished"]
    xs = [100 * r.connectivity for r in done]  # type: ignore[operator]
    ys = [100 * r.top1_final for r in done]  # type: ignore[operator]
    ax.plot(xs, ys, marker="o", color=color, linewidth=1.6, label=runs[0].method)
    hollow = False
    for run in ordered:
        x, y = 100 * run.connectivity, 100 * run.top1_final  # type: ignore[operator]
        if run.status != "finished":
            ax.plot([x], [y], marker="o", markerfacecolor="white", color=color,
                    linestyle="none", label=None if hollow else hollow_label)
            hollow = True
        ax.annotate(_point_label(run), (x, y), textcoords="offset points",
                    xytext=(4, -11) if below else (4, 5), fontsize=7, color=color)
    return hollow


def _draw_panel(ax: Any, setting: tuple[str, str], runs: list[RunRecord]) -> None:
    _draw_dense(ax, runs)
    xs = [100 * r.connectivity for r in runs if r.method != "dense"]  # type: ignore[operator]
    methods = [m for m in dict.fromkeys(r.method for r in runs) if m != "dense"]
    hollow_label: str | None = "running or failed (hollow)"
    for index, method in enumerate(methods):
        members = [r for r in runs if r.method == method]
        # the first method's labels go below its line, clear of the published points above it
        if _draw_method(ax, members, f"C{index % 10}", hollow_label, below=index % 2 == 0):
            hollow_label = None
    if setting == PAPER_SETTING:
        paper_xs = [100 * (1 - s) for _, _, s in PAPER_CIFAR10_STDS]
        paper_ys = [100 * a for _, a, _ in PAPER_CIFAR10_STDS]
        ax.plot(paper_xs, paper_ys, marker="*", markersize=9, color="black", linestyle=":",
                linewidth=1, label=PAPER_LABEL)
        for (d, _, _), x, y in zip(PAPER_CIFAR10_STDS, paper_xs, paper_ys):
            ax.annotate(f"D={d:g}", (x, y), textcoords="offset points", xytext=(-6, 7),
                        ha="right", fontsize=7, color="0.25")
        xs += paper_xs
    _style_axes(ax, setting, xs or [100.0])


def _style_axes(ax: Any, setting: tuple[str, str], xs: list[float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    low, high = min(xs) / 1.5, max(xs) * 1.5
    if high / low < 10:  # at least a decade, around the points
        centre = math.sqrt(low * high)
        low, high = centre / math.sqrt(10), centre * math.sqrt(10)
    ax.set_xlim(low, high)
    ax.margins(y=0.1)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("connectivity = 1 − sparsity (log scale)")
    ax.set_ylabel("test top-1 accuracy [%]")
    ax.set_title(f"{setting[0]} / {setting[1]}")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plot(runs: list[RunRecord], path: Path) -> None:
    """``report.png``: top-1 against connectivity (log x), one panel per (dataset, model)."""
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
        ax.text(0.5, 0.5, "no run has an accuracy and a sparsity yet", ha="center", va="center")
    for index, (setting, members) in enumerate(panels.items()):
        _draw_panel(fig.add_subplot(rows, columns, index + 1), setting, members)
    fig.tight_layout()
    fig.savefig(path)


def write_report(runs: Iterable[RunRecord], out_dir: Path | str) -> dict[str, Path]:
    """Write ``report.csv``, ``report.md`` and ``report.png`` into ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sort_runs(runs)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("csv", "md", "png")}
    write_csv(ordered, paths["csv"], out_dir)
    paths["md"].write_text(markdown(ordered, out_dir, image=paths["png"].name))
    plot(ordered, paths["png"])
    return paths
