"""Collect runs: find every run directory under the given paths and read each into a `RunRecord`.

A run directory holds ``.hydra/config.yaml``; Hydra multirun layouts ``<sweep>/<n>/`` nest to any
depth. The files of a run directory are described in ``docs/architecture.md``; fields are named as
in ``docs/metrics.md`` (older run directories with ``flat_width`` for the threshold are read too).
Files are data (`stds.results.runfiles`, `stds.run.files.safe`): no interpolation is resolved, no
symlink followed, nothing unpickled; a refused or damaged file marks its run ``damaged``.

Status (`_status`): damaged (a file refused, cut or of the wrong type: its one line), finished
(``metrics.json``; pruned when it says ``"pruned": true``), failed
(``error.txt``'s first line, or the last stderr line of an ended submitit job: `submitit_failure`),
stopped (a ``.lock`` no process holds: killed), else running (the last line of ``metrics.jsonl``).
Connectivity = 1 - sparsity; SynOps per evaluated sample; the mean firing rate is over layers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from stds.errors import StdsError
from stds.results.jobs import submitit_failure
from stds.results.record import RunRecord, method_label, natural_key
from stds.results.runfiles import (RunFiles, config_number, config_text, number, rates_of, read_files,
                                   warnings_of, whole)
from stds.run.files.safe import UnsafeFileError
from stds.run.files.rundir import LOCK_NAME, lock_is_held
from stds.run.measure.metrics import best_of

_RUN_MARKER = Path(".hydra") / "config.yaml"
_NOT_RUN_CHILDREN = {".hydra", "tb", "checkpoints", ".submitit"}


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
            children.sort(key=lambda name: natural_key(Path(name)))
    return sorted(found, key=natural_key)


def _short_target(target: str | None) -> str | None:
    return None if target is None else target.rsplit(".", 1)[-1]


def _status(run_dir: Path, files: RunFiles) -> tuple[str, str]:
    if files.final is not None:
        if files.final.get("pruned") is True:
            return "pruned", "stopped early by the search's pruner"
        return "finished", ""
    if files.error is not None:
        return "failed", files.error
    job_failure = submitit_failure(run_dir, files.hydra)
    if job_failure is not None:
        return "failed", job_failure
    killed = (run_dir / LOCK_NAME).is_file() and not lock_is_held(run_dir)
    return ("stopped", "its process ended without metrics.json or error.txt (killed)") if killed else ("running", "")


def _config_fields(cfg: dict[str, Any] | None, source: Path) -> dict[str, Any]:
    """The config values a report shows: dataset, model, method, flat_width, alpha_gr, ...
    (each checked for its type: `stds.results.runfiles`)."""
    cfg = cfg or {}
    alpha = config_number(cfg, "alpha_gr", source)
    schedule = config_text(cfg, "scheduler.kind", source)
    method = method_label(config_text(cfg, "sparse.method", source), schedule, alpha)
    T, planned = config_number(cfg, "T", source), config_number(cfg, "epochs", source)
    return {
        "dataset": _short_target(config_text(cfg, "dataset._target_", source)),
        "model": _short_target(config_text(cfg, "model._target_", source)),
        "method": method, "alpha_gr": alpha,
        # dense runs have no threshold; target runs choose d from target_sparsity, not D
        "flat_width": (None if method == "dense" or schedule == "target"
                       else config_number(cfg, "flat_width", source)),
        "target_sparsity": (config_number(cfg, "target_sparsity", source)
                            if schedule == "target" and method != "dense" else None),
        "T": None if T is None else int(T),
        "epochs_planned": None if planned is None else int(planned),
    }


def read_run(run_dir: Path | str) -> RunRecord:
    """One run directory as a `RunRecord` (a missing or partial file leaves its fields None); a
    run whose files are refused or damaged is ``damaged``, with the one-line reason as its error."""
    run_dir = Path(run_dir)
    try:
        return _read_run(run_dir)
    except UnsafeFileError as exc:
        reason = str(exc).replace(f"{run_dir}{os.sep}", "")
        return RunRecord(path=run_dir, status="damaged", error=reason)


def _read_run(run_dir: Path) -> RunRecord:
    files = read_files(run_dir)
    final, history = files.final, files.history
    status, error = _status(run_dir, files)
    record = RunRecord(path=run_dir, status=status, error=error, overrides=files.overrides,
                       **_config_fields(files.config, run_dir / _RUN_MARKER))
    last = history[-1] if history else {}
    source_path = run_dir / ("metrics.json" if final is not None else "metrics.jsonl")
    source = final if final is not None else last
    record.warnings = warnings_of(final or {}, source_path)
    record.epoch = whole(source, "epoch", source_path) or 0
    if final is not None and whole(final, "epochs_planned", source_path) is not None:
        record.epochs_planned = whole(final, "epochs_planned", source_path)
    record.test_acc1 = number(source, "test_acc1", source_path)
    record.test_acc5 = number(source, "test_acc5", source_path)
    record.sparsity = number(source, "sparsity", source_path)
    if record.method != "dense":  # no threshold in a dense run; flat_width in files before the rename
        record.d = number(source, "d" if "d" in source else "flat_width", source_path)
    record.synops = number(source, "synops", source_path)
    record.first_layer_macs = number(source, "first_layer_macs", source_path)
    record.firing_rates = rates_of(source, source_path) or rates_of(last, run_dir / "metrics.jsonl")
    record.best_test_acc1, record.best_epoch = _best(final, history, source_path)
    record.metrics = dict(source)
    return record


def _best(final: dict[str, Any] | None, history: list[dict[str, Any]],
          source: Path) -> tuple[float | None, int | None]:
    """(best_test_acc1, best_epoch): from ``metrics.json``, else the epoch of the history that
    ``best.pt`` holds by the loop's own rule (`stds.run.measure.metrics.best_of`: at the final sparsity)."""
    if final is not None and number(final, "best_test_acc1", source) is not None:
        return number(final, "best_test_acc1", source), whole(final, "best_epoch", source)
    jsonl = source.with_name("metrics.jsonl")
    scored = [r for r in history if number(r, "test_acc1", jsonl) is not None
              and number(r, "sparsity", jsonl) is not None]
    best = best_of(scored)
    if best is None:
        return None, None
    return number(best, "test_acc1", jsonl), whole(best, "epoch", jsonl)


def collect_runs(paths: Iterable[Path | str]) -> list[RunRecord]:
    """A `RunRecord` for every run directory under ``paths`` (see `find_run_dirs`)."""
    paths = list(paths)
    runs = [read_run(run_dir) for run_dir in find_run_dirs(paths)]
    if not runs:
        shown = ", ".join(str(p) for p in paths)
        raise StdsError(f"no run directories (holding .hydra/config.yaml) under {shown}")
    return runs
