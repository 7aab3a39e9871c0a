"""Collect runs: find every run directory under the given paths and read each into a `RunRecord`.

A run directory holds ``.hydra/config.yaml``; Hydra multirun layouts ``<sweep>/<n>/`` nest to any
depth. The files of a run directory are described in ``docs/architecture.md``; fields are named as
in ``docs/metrics.md`` (older run directories with ``flat_width`` for the threshold are read too).

Status: ``metrics.json`` present -> finished (its figures); otherwise ``error.txt`` -> failed
(its first line is shown); otherwise, if the submitit job that ran the point has ended (its
``<job>_<task>_result.pkl`` in the sweep's ``.submitit/<job>/``), failed with the job's error;
otherwise running (figures of the last line of ``metrics.jsonl``). Connectivity = 1 - sparsity.
SynOps are per evaluated sample (`stds.run.synops`). The mean firing rate is the unweighted mean over
spiking layers.
"""

from __future__ import annotations

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
    # trials of a search (stds.results.search.mark_trials): number, searched values, and
    # "front" / "infeasible" / "" (dominated); None for runs no search started
    trial: int | None = None
    params: str | None = None
    pareto: str | None = None

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
