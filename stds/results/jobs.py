"""The submitit job that ran a sweep point: has it ended, and why, from its plain-text logs.

The job's folder is ``.submitit/<id>`` of the sweep directory (or a parent of it), or the
``hydra.launcher.submitit_folder`` its ``hydra.yaml`` gives, when that lies inside the sweep
directory. Every file is read by `stds.run.files.safe` (no symlink followed out of the folder
that holds ``.submitit/``, regular files only, the logs by their last 64 KiB); submitit's result
pickles are never opened, only seen to exist.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from stds.results.record import natural_key
from stds.run.files.safe import UnsafeFileError, inside, plain_value, read_tail, select

_JOB_ID = re.compile(r"^\w[\w.-]*$")  # SLURM ids 123, 123_4; submitit local ids (pids)
_LOG_TAIL_BYTES = 64 * 1024
_SUBMITIT_END = ("Job completed successfully", "Submitted job triggered an exception")
_SLURM_END = re.compile(r"\*\*\* (?:JOB|STEP) \S+ .*CANCELLED")


def last_traceback_line(text: str) -> str:
    """The exception line of a formatted traceback, module path dropped (``ConfigError: ...``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the job raised an exception"
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))", "", lines[-1])


def submitit_job_dir(run_dir: Path, hydra_cfg: Any) -> tuple[Path, Path, str] | None:
    """(job folder, the folder it must stay inside, job id) of the job that ran ``run_dir``.

    ``hydra_cfg``: the run's ``.hydra/hydra.yaml`` as plain data; the id is its ``hydra.job.id``.
    The folder is ``.submitit/<id>`` in one of the run directory's four nearest parents, or
    ``hydra.launcher.submitit_folder`` when it is a literal path (``%j`` the id; one holding an
    interpolation is not resolved: its default is the first case) inside the sweep directory;
    a folder whose real path leaves its parent (a planted symlink) is not used.
    """
    source = run_dir / ".hydra" / "hydra.yaml"
    job_id = plain_value(hydra_cfg, "hydra.job.id", source)
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool) or not _JOB_ID.match(str(job_id)):
        return None
    job_id = str(job_id)
    candidates = [(parent / ".submitit" / job_id, parent) for parent in list(run_dir.parents)[:4]]
    folder = select(hydra_cfg, "hydra.launcher.submitit_folder")  # as written: the default
    if isinstance(folder, str) and "${" not in folder and Path(folder).is_absolute():  # is found above
        candidates.append((Path(folder.replace("%j", job_id)), run_dir.parent))
    for job_dir, root in candidates:
        if job_dir.is_dir() and inside(job_dir, root):
            return job_dir, root, job_id
    return None


def _tail(path: Path | None, root: Path) -> str:
    """The last 64 KiB of a log; empty if there is none; a refused log gives its refusal."""
    if path is None:
        return ""
    try:
        return read_tail(path, root, _LOG_TAIL_BYTES)
    except UnsafeFileError as exc:
        return f"refused: {exc}"
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
    return last_traceback_line(lines[-1]) if lines else None


def submitit_failure(run_dir: Path, hydra_cfg: Any) -> str | None:
    """Why the submitit job of ``run_dir`` ended without ``metrics.json``; None if it has not
    ended or the run was not started by submitit.

    Only plain text is read: the job has ended when submitit's end line is in its logs (``Job
    completed successfully`` / ``Submitted job triggered an exception``), SLURM's ``CANCELLED``
    line ends its stderr, or its ``*_result.pkl`` exists (that pickle is never opened). The
    reason is the last line of the job's stderr log (``*_log.err``), else "no result".
    """
    found = submitit_job_dir(run_dir, hydra_cfg)
    if found is None:
        return None
    job_dir, root, job_id = found
    err_log = _first_log(job_dir, job_id, "err")
    err, out = _tail(err_log, root), _tail(_first_log(job_dir, job_id, "out"), root)
    if err.startswith("refused: "):
        return err[len("refused: "):]
    err_lines = [line for line in err.splitlines() if line.strip()]
    ended = (any(marker in err or marker in out for marker in _SUBMITIT_END)
             or (bool(err_lines) and bool(_SLURM_END.search(err_lines[-1])))
             or any(os.path.lexists(p) for p in job_dir.glob(f"{glob.escape(job_id)}_*_result.pkl")))
    if not ended:
        return None
    reason = _reason(err)
    if reason is None:
        return f"no result: the job ended without metrics.json or error.txt; see {err_log or job_dir}"
    return reason
