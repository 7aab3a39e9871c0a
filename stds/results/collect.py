"""Collect runs: find every run directory under the given paths and read each into a `RunRecord`.

A run directory holds ``.hydra/config.yaml``; Hydra multirun layouts ``<sweep>/<n>/`` nest to any
depth. The files of a run directory are described in ``docs/architecture.md``; fields are named as
in ``docs/metrics.md`` (older run directories with ``flat_width`` for the threshold are read too).
Files are data: configs are read unresolved (``${oc.env:X}`` stays text); nothing is unpickled.

Status (`_status`): finished (``metrics.json``; pruned when it says ``"pruned": true``), failed
(``error.txt``'s first line, or the last stderr line of an ended submitit job: `submitit_failure`),
stopped (a ``.lock`` no process holds: killed), else running (the last line of ``metrics.jsonl``).
Connectivity = 1 - sparsity; SynOps per evaluated sample; the mean firing rate is over layers.
"""

from __future__ import annotations

import glob
import math
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from stds.errors import StdsError
from stds.results.record import RunRecord, method_label, natural_key
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


def _select(cfg: dict[str, Any] | None, key: str) -> Any:
    """``key`` (dotted) of the run's plain config, never resolved: an interpolation stays the
    literal text it is in the file; None if absent."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


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


def _load_plain(path: Path) -> Any:
    """A YAML file as plain Python values, interpolations left as their literal text (a planted
    ``${oc.env:SECRET}`` is never resolved); None if unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # not YAML, not a mapping or list, unreadable
        return None


def _read_config(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    loaded = _load_plain(run_dir / ".hydra" / "config.yaml")
    config = loaded if isinstance(loaded, dict) else None
    listed = _load_plain(run_dir / ".hydra" / "overrides.yaml")
    listed = listed if isinstance(listed, list) else []
    overrides = [str(o) for o in listed if not str(o).startswith("hydra.")]
    return config, overrides


def _last_traceback_line(text: str) -> str:
    """The exception line of a formatted traceback, module path dropped (``ConfigError: ...``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the job raised an exception"
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))", "", lines[-1])


_JOB_ID = re.compile(r"^\w[\w.-]*$")  # SLURM ids 123, 123_4; submitit local ids (pids)
_LOG_TAIL_BYTES = 64 * 1024
_SUBMITIT_END = ("Job completed successfully", "Submitted job triggered an exception")
_SLURM_END = re.compile(r"\*\*\* (?:JOB|STEP) \S+ .*CANCELLED")


def submitit_job_dir(run_dir: Path) -> tuple[Path, str] | None:
    """The ``.submitit/<job>/`` folder of the job that ran ``run_dir`` and the job id, if any.

    The id is ``hydra.job.id`` of the run's ``.hydra/hydra.yaml`` (set by the submitit launcher),
    read as plain text. The folder is ``.submitit/<id>`` in one of the run directory's parents
    (the sweep directory: the launchers' default ``submitit_folder``), or
    ``hydra.launcher.submitit_folder`` when the file gives it as a literal path.
    """
    hydra_cfg = _load_plain(run_dir / ".hydra" / "hydra.yaml")
    job_id = _select(hydra_cfg if isinstance(hydra_cfg, dict) else None, "hydra.job.id")
    if not isinstance(job_id, (str, int)) or not _JOB_ID.match(str(job_id)):
        return None
    job_id = str(job_id)
    candidates = [parent / ".submitit" / job_id for parent in list(run_dir.resolve().parents)[:4]]
    folder = _select(hydra_cfg, "hydra.launcher.submitit_folder")  # type: ignore[arg-type]
    if isinstance(folder, str) and "${" not in folder and Path(folder).is_absolute():
        candidates.append(Path(folder.replace("%j", job_id)))
    found = next((c for c in candidates if c.is_dir()), None)
    return None if found is None else (found, job_id)


def _log_tail(path: Path | None) -> str:
    """The last 64 KiB of a plain-text log (decoding errors replaced); empty if there is none."""
    if path is None:
        return ""
    try:
        with path.open("rb") as handle:
            handle.seek(max(path.stat().st_size - _LOG_TAIL_BYTES, 0))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _first_log(job_dir: Path, job_id: str, suffix: str) -> Path | None:
    logs = sorted(job_dir.glob(f"{glob.escape(job_id)}_*_log.{suffix}"), key=natural_key)
    return logs[0] if logs else None


def _reason(err_text: str) -> str | None:
    """The last line of a job's stderr that is not submitit's own bookkeeping, module path
    dropped from an exception line (``OutOfMemoryError: CUDA out of memory``); None if none."""
    lines = [line.strip() for line in err_text.splitlines()
             if line.strip() and not line.startswith("submitit ")]
    return _last_traceback_line(lines[-1]) if lines else None


def submitit_failure(run_dir: Path) -> str | None:
    """Why the submitit job of ``run_dir`` ended without ``metrics.json``; None if it has not
    ended or the run was not started by submitit.

    Only plain text is read: the job has ended when submitit's end line is in its logs (``Job
    completed successfully`` / ``Submitted job triggered an exception``), SLURM's ``CANCELLED``
    line ends its stderr, or its ``*_result.pkl`` exists (that pickle is never opened). The
    reason is the last line of the job's stderr log (``*_log.err``), else "no result".
    """
    found = submitit_job_dir(run_dir)
    if found is None:
        return None
    job_dir, job_id = found
    err_log = _first_log(job_dir, job_id, "err")
    err, out = _log_tail(err_log), _log_tail(_first_log(job_dir, job_id, "out"))
    err_lines = [line for line in err.splitlines() if line.strip()]
    ended = (any(marker in err or marker in out for marker in _SUBMITIT_END)
             or (bool(err_lines) and bool(_SLURM_END.search(err_lines[-1])))
             or any(job_dir.glob(f"{glob.escape(job_id)}_*_result.pkl")))
    if not ended:
        return None
    reason = _reason(err)
    if reason is None:
        return f"no result: the job ended without metrics.json or error.txt; see {err_log or job_dir}"
    return reason


def _status(run_dir: Path, final: dict[str, Any] | None) -> tuple[str, str]:
    if final is not None:
        if final.get("pruned") is True:
            return "pruned", "stopped early by the search's pruner"
        return "finished", ""
    error_file = run_dir / "error.txt"
    if error_file.exists():
        lines = [line.strip() for line in error_file.read_text().splitlines() if line.strip()]
        return "failed", lines[0] if lines else "unknown error"
    job_failure = submitit_failure(run_dir)
    if job_failure is not None:
        return "failed", job_failure
    killed = (run_dir / LOCK_NAME).is_file() and not lock_is_held(run_dir)
    return ("stopped", "its process ended without metrics.json or error.txt (killed)") if killed else ("running", "")


def _threshold(record: dict[str, Any]) -> float | None:
    """The threshold now: ``d``, or ``flat_width`` in files written before the rename."""
    return _number(record.get("d", record.get("flat_width")))


def _warnings(final: dict[str, Any] | None) -> list[str]:
    listed = (final or {}).get("warnings") or []
    if isinstance(listed, str):
        listed = [listed]
    return [" ".join(str(w).split()) for w in listed if str(w).strip()]


def _config_fields(cfg: dict[str, Any] | None) -> dict[str, Any]:
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
    record.metrics = dict(source)
    return record


def _best(final: dict[str, Any] | None, history: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """(best_test_acc1, best_epoch): from ``metrics.json``, else the epoch of the history that
    ``best.pt`` holds by the loop's own rule (`stds.run.measure.metrics.best_of`: at the final sparsity)."""
    if final is not None and _number(final.get("best_test_acc1")) is not None:
        epoch = _number(final.get("best_epoch"))
        return _number(final["best_test_acc1"]), None if epoch is None else int(epoch)
    scored = [r for r in history if _number(r.get("test_acc1")) is not None and _number(r.get("sparsity")) is not None]
    best = best_of(scored)
    if best is None:
        return None, None
    epoch = _number(best.get("epoch"))
    return float(best["test_acc1"]), None if epoch is None else int(epoch)


def collect_runs(paths: Iterable[Path | str]) -> list[RunRecord]:
    """A `RunRecord` for every run directory under ``paths`` (see `find_run_dirs`)."""
    paths = list(paths)
    runs = [read_run(run_dir) for run_dir in find_run_dirs(paths)]
    if not runs:
        shown = ", ".join(str(p) for p in paths)
        raise StdsError(f"no run directories (holding .hydra/config.yaml) under {shown}")
    return runs
