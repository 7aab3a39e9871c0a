"""Sweep reports: one row per run, and top-1 accuracy against connectivity (the paper's figure).

`collect_runs(paths)` finds every run directory under ``paths`` (a directory holding
``.hydra/config.yaml``; Hydra multirun layouts ``<sweep>/<n>/``, nested to any depth) and reads it
into a `RunRecord`; `write_report(runs, out_dir)` writes ``report.csv``, ``report.md`` and
``report.png``. The files of a run directory are described in ``docs/architecture.md``; every
column is named as in ``docs/metrics.md`` (older run directories with ``flat_width`` for the
threshold now are read too).

Status: ``metrics.json`` present -> finished (its figures); otherwise ``error.txt`` -> failed
(its first line is shown); otherwise, if the submitit job that ran the point has ended (its
``<job>_<task>_result.pkl`` in the sweep's ``.submitit/<job>/``), failed with the job's error;
otherwise running (figures of the last line of ``metrics.jsonl``). Connectivity = 1 - sparsity.
SynOps are per evaluated sample (`stds.run.synops`). The mean firing rate is the unweighted mean over
spiking layers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
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

_METHOD_ORDER = ("dense", "STDS-sine", "STDS-linear", "STDS-constant", "STDS-target", "Grad R")
_RUN_MARKER = Path(".hydra") / "config.yaml"
_NOT_RUN_CHILDREN = {".hydra", "tb", "checkpoints", ".submitit"}


@dataclass
class RunRecord:
    """What a report shows of one run, under the names of ``docs/metrics.md``; figures a run has
    not produced yet are None."""

    path: Path
    status: str  # finished / running / failed
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
    """dense (identity) / Grad R (pruned, α > 0) / STDS-<schedule> (stmod; STDS-target for
    ``scheduler=target``) / st-<schedule>."""
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


def _one_line(exc: BaseException) -> str:
    """``TypeName: message`` on one line, as ``error.txt`` holds it."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _last_traceback_line(text: str) -> str:
    """The exception line of a formatted traceback, module path dropped (``ConfigError: ...``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the job raised an exception"
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))", "", lines[-1])


def submitit_job_dir(run_dir: Path) -> Path | None:
    """The ``.submitit/<job>/`` folder of the job that ran ``run_dir``, if there is one.

    The job id is ``hydra.job.id`` of the run's ``.hydra/hydra.yaml`` (set by the submitit
    launcher). The folder is ``hydra.launcher.submitit_folder`` with ``%j`` = the id when that
    resolves, else ``.submitit/<id>`` in the run directory's parents (the sweep directory).
    """
    try:
        hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
    except Exception:
        return None
    job_id = _select(hydra_cfg, "hydra.job.id")
    if job_id is None or not str(job_id).strip() or not isinstance(hydra_cfg, DictConfig):
        return None
    job_id = str(job_id)
    candidates: list[Path] = []
    folder = _select(hydra_cfg, "hydra.launcher.submitit_folder")
    if isinstance(folder, str):
        resolved = Path(folder.replace("%j", job_id))
        cwd = _select(hydra_cfg, "hydra.runtime.cwd")
        candidates.append(resolved if resolved.is_absolute() or not cwd else Path(cwd) / resolved)
    candidates += [parent / ".submitit" / job_id for parent in list(run_dir.resolve().parents)[:4]]
    return next((c for c in candidates if c.is_dir()), None)


def submitit_failure(run_dir: Path) -> str | None:
    """Why the submitit job of ``run_dir`` ended without ``metrics.json``; None if it has not
    ended (no ``*_result.pkl`` yet) or the run was not started by submitit.

    The result pickle holds ``("error", traceback)`` when the job raised, or ``("success",
    JobReturn)`` where Hydra caught the task's exception (status FAILED, e.g. a config error
    raised before the run directory had ``error.txt``). It is the user's own sweep output, read
    with `pickle` as submitit itself reads it.
    """
    job_dir = submitit_job_dir(run_dir)
    if job_dir is None:
        return None
    results = sorted(job_dir.glob("*_result.pkl"), key=_natural_key)
    if not results:
        return None
    try:
        with results[0].open("rb") as handle:
            outcome, value = pickle.load(handle)
    except Exception as exc:  # unreadable, or a class this process cannot import
        return f"the job ended without metrics.json; its result {results[0]} is unreadable ({_one_line(exc)})"
    if outcome == "error":
        return _last_traceback_line(str(value))
    returned = getattr(value, "_return_value", None)
    if isinstance(returned, BaseException):
        return _one_line(returned)
    logs = ", ".join(str(p) for p in sorted(job_dir.glob("*_log.err"), key=_natural_key))
    return f"the job ended without writing metrics.json; see {logs or job_dir}"


def _status(run_dir: Path, final: dict[str, Any] | None) -> tuple[str, str]:
    if final is not None:
        return "finished", ""
    error_file = run_dir / "error.txt"
    if error_file.exists():
        lines = [line.strip() for line in error_file.read_text().splitlines() if line.strip()]
        return "failed", lines[0] if lines else "unknown error"
    job_failure = submitit_failure(run_dir)
    if job_failure is not None:
        return "failed", job_failure
    return "running", ""


def _threshold(record: dict[str, Any]) -> float | None:
    """The threshold now: ``d``, or ``flat_width`` in files written before the rename."""
    return _number(record.get("d", record.get("flat_width")))


def _warnings(final: dict[str, Any] | None) -> list[str]:
    listed = (final or {}).get("warnings") or []
    if isinstance(listed, str):
        listed = [listed]
    return [" ".join(str(w).split()) for w in listed if str(w).strip()]


def _config_fields(cfg: DictConfig | None) -> dict[str, Any]:
    """The config values a report shows: dataset, model, method, flat_width, alpha_gr, ..."""
    alpha = _number(_select(cfg, "alpha_gr"))
    schedule = _select(cfg, "scheduler.kind")
    method = method_label(_select(cfg, "sparse.method"), schedule, alpha)
    T, planned = _number(_select(cfg, "T")), _number(_select(cfg, "epochs"))
    return {
        "dataset": _short_target(_select(cfg, "dataset._target_")),
        "model": _short_target(_select(cfg, "model._target_")),
        "method": method, "alpha_gr": alpha,
        # dense runs have no threshold; target runs choose d from target_sparsity, not D
        "flat_width": (None if method == "dense" or schedule == "target"
                       else _number(_select(cfg, "flat_width"))),
        "target_sparsity": (_number(_select(cfg, "target_sparsity"))
                            if schedule == "target" and method != "dense" else None),
        "T": None if T is None else int(T),
        "epochs_planned": None if planned is None else int(planned),
    }


def read_run(run_dir: Path | str) -> RunRecord:
    """One run directory as a `RunRecord` (a missing or partial file leaves its fields None)."""
    run_dir = Path(run_dir)
    cfg, overrides = _read_config(run_dir)
    final = _read_json(run_dir / "metrics.json")
    history = _read_jsonl(run_dir / "metrics.jsonl")
    status, error = _status(run_dir, final)
    record = RunRecord(path=run_dir, status=status, error=error, overrides=overrides,
                       warnings=_warnings(final), **_config_fields(cfg))
    last = history[-1] if history else {}
    source = final if final is not None else last
    record.epoch = int(_number(source.get("epoch")) or 0)
    if final is not None and _number(final.get("epochs_planned")) is not None:
        record.epochs_planned = int(final["epochs_planned"])
    record.test_acc1 = _number(source.get("test_acc1"))
    record.test_acc5 = _number(source.get("test_acc5"))
    record.sparsity = _number(source.get("sparsity"))
    record.d = None if record.method == "dense" else _threshold(source)  # no threshold in a dense run
    record.synops = _number(source.get("synops"))
    record.first_layer_macs = _number(source.get("first_layer_macs"))
    rates = source.get("firing_rates") or last.get("firing_rates") or {}
    record.firing_rates = {str(k): float(v) for k, v in rates.items() if _number(v) is not None}
    record.best_test_acc1, record.best_epoch = _best(final, history)
    return record


def _best(final: dict[str, Any] | None, history: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """(best_test_acc1, best_epoch): from ``metrics.json``, else the best line of the history."""
    if final is not None and _number(final.get("best_test_acc1")) is not None:
        epoch = _number(final.get("best_epoch"))
        return _number(final["best_test_acc1"]), None if epoch is None else int(epoch)
    scored = [(r["test_acc1"], r.get("epoch")) for r in history if _number(r.get("test_acc1")) is not None]
    if not scored:
        return None, None
    acc, epoch = max(scored, key=lambda pair: pair[0])  # the first of equal bests
    return float(acc), None if _number(epoch) is None else int(epoch)


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

    def low_first(value: float | None) -> float:
        return -math.inf if value is None else value

    return (run.dataset or "", run.model or "", rank, method, low_first(run.target_sparsity),
            low_first(run.flat_width), low_first(run.alpha_gr), _natural_key(run.path))


def sort_runs(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Report order: dataset, model, method (dense first), target_sparsity, flat_width,
    alpha_gr, path."""
    return sorted(runs, key=_sort_key)


def _relative(path: Path, base: Path) -> str:
    try:
        name = os.path.relpath(path, base)
    except ValueError:  # another drive
        return str(path)
    return "." if name == "." else name


_CSV_COLUMNS = (
    "run", "status", "error", "dataset", "model", "method", "flat_width", "alpha_gr",
    "target_sparsity", "T", "epoch", "epochs_planned", "test_acc1", "best_test_acc1",
    "best_epoch", "test_acc5", "sparsity", "connectivity", "d", "synops", "first_layer_macs",
    "firing_rate_mean", "firing_rates", "warnings", "overrides",
)
"""``report.csv``'s columns: the names of ``docs/metrics.md``, plus run, status, error,
dataset, model, method, T, firing_rate_mean (the unweighted mean of ``firing_rates``) and
overrides."""


def _csv_row(run: RunRecord, base: Path) -> dict[str, Any]:
    """Raw values (fractions, counts per sample); absent values are empty cells; the per-layer
    firing rates and the warnings as JSON."""
    values = {name: getattr(run, name, None) for name in _CSV_COLUMNS}
    values.update(
        run=_relative(run.path, base),
        firing_rates=json.dumps(run.firing_rates) if run.firing_rates else None,
        warnings=json.dumps(run.warnings) if run.warnings else None,
        overrides="; ".join(run.overrides),
    )
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


_MD_COLUMNS = (
    "run", "dataset", "model", "method", "flat_width", "alpha_gr", "target_sparsity", "T",
    "epoch", "epochs_planned", "test_acc1", "best_test_acc1", "test_acc5", "sparsity",
    "connectivity", "d", "synops", "first_layer_macs", "firing_rate_mean", "status",
)
_PERCENT_COLUMNS = {"test_acc1", "best_test_acc1", "test_acc5", "sparsity", "connectivity",
                    "target_sparsity"}


def _md_columns(runs: list[RunRecord]) -> tuple[str, ...]:
    """The table's columns; ``target_sparsity`` only when a run has one."""
    with_target = any(run.target_sparsity is not None for run in runs)
    return tuple(c for c in _MD_COLUMNS if c != "target_sparsity" or with_target)


def _md_cell(run: RunRecord, column: str, base: Path) -> str:
    value = getattr(run, column, None)
    if column == "run":
        return _relative(run.path, base)
    if column == "status":
        return _status_cell(run)
    if column == "epochs_planned":
        return "?" if value is None else str(value)
    if column in _PERCENT_COLUMNS:
        return _percent(value)
    if column in ("synops", "first_layer_macs"):
        return si(value)
    if column == "firing_rate_mean":
        return "-" if value is None else f"{value:.4f}"
    if isinstance(value, str) or value is None:
        return value or "-"
    return _plain(value)


def _point_label(run: RunRecord) -> str:
    """What a plotted point varies: target_sparsity, alpha_gr (Grad R) or flat_width."""
    if run.target_sparsity is not None:
        return f"target_sparsity={run.target_sparsity:g}"
    if run.method == "Grad R":
        return f"alpha_gr={run.alpha_gr:g}" if run.alpha_gr is not None else ""
    return f"flat_width={run.flat_width:g}" if run.flat_width is not None else ""


def _at_zero_connectivity(run: RunRecord) -> bool:
    """Every weight pruned: off a log axis, drawn at its floor instead."""
    return run.test_acc1 is not None and run.connectivity is not None and run.connectivity <= 0


def markdown(runs: list[RunRecord], base: Path, image: str | None = "report.png") -> str:
    """The report as Markdown: counts by status, the table, warnings, firing rates, the plot
    (with the runs at 0% connectivity listed under it)."""
    counts = {s: sum(r.status == s for r in runs) for s in ("finished", "running", "failed")}
    columns = _md_columns(runs)
    lines = [
        "# Sweep report", "",
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}: {counts['finished']} finished, "
        f"{counts['running']} running, {counts['failed']} failed. Figures of the last evaluated "
        "epoch, named as in docs/metrics.md: flat_width = D, d = the threshold reached; "
        "connectivity = 1 - sparsity; synops per test sample (spikes x non-zero weights, summed "
        "over T); firing_rate_mean: mean over spiking layers of spikes per neuron per step.",
        "",
        "| " + " | ".join(columns) + " |",
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
    zero = [run for run in runs if _at_zero_connectivity(run)]
    if not zero:
        return []
    items = ", ".join(
        f"`{_relative(run.path, base)}` ({run.method}, {_point_label(run) or '-'}: test_acc1 "
        f"{_percent(run.test_acc1)}, {run.status})" for run in zero)
    return ["", "Runs at 0% connectivity (every weight pruned) have no place on the log axis; "
            f"the plot draws them at its left edge as triangles (◀): {items}."]


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
        ax.annotate(_point_label(run), (x, y), textcoords="offset points",
                    xytext=(4, -11) if below else (4, 5), fontsize=7, color=color)
    return hollow


FLOOR_LABEL = "0% connectivity (all pruned), drawn at the axis floor"


def _draw_floor(ax: Any, runs: list[RunRecord], colors: dict[str, str], floor: float) -> None:
    """Runs at 0% connectivity as left-pointing triangles on the left edge (x = ``floor``),
    hollow unless finished, labelled like the other points."""
    for index, run in enumerate(runs):
        color = colors.get(run.method or "", "black")
        face = color if run.status == "finished" else "white"
        y = 100 * run.test_acc1  # type: ignore[operator]
        ax.plot([floor], [y], marker="<", markersize=9, color=color, markerfacecolor=face,
                linestyle="none", clip_on=False, label=FLOOR_LABEL if index == 0 else None)
        ax.annotate(f"{_point_label(run)} (0%)", (floor, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=7, color=color)


def _x_limits(xs: list[float]) -> tuple[float, float]:
    """Log-axis limits around the connectivities ``xs`` (percent), at least a decade wide."""
    low, high = min(xs) / 1.5, max(xs) * 1.5
    if high / low < 10:
        centre = math.sqrt(low * high)
        low, high = centre / math.sqrt(10), centre * math.sqrt(10)
    return low, high


def _draw_panel(ax: Any, setting: tuple[str, str], runs: list[RunRecord]) -> None:
    zero = [r for r in runs if _at_zero_connectivity(r)]
    shown = [r for r in runs if not _at_zero_connectivity(r)]
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
    """``report.png``: see `figure`."""
    figure(runs).savefig(path)


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
