"""What SLURM says of a search's trial jobs: waiting, running, or gone.

A trial launched through the SLURM launcher is tagged: its job's comment holds `job_tag` (the
sweeper gives it, `tagged_comment`), the tag is the trial's user attribute `TAG_ATTR`, and its job
id becomes the user attribute `JOB_ATTR` once known (the search finds it in the queue by the tag;
the run records ``SLURM_JOB_ID`` itself when it starts). `queued_jobs` lists the user's jobs that
the controller holds; a trial whose job is there in one of `LIVE_STATES` is alive although no
process of it may run yet (a job held, or waiting for a node), so the search renews its heartbeat
instead of letting Optuna fail it. A job that is not listed, or listed as ended, is settled as
any trial whose run is gone.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stds.errors import StdsError, one_line
from stds.run.life.study_link import JOB_ATTR

__all__ = ["JOB_ATTR", "LIVE_STATES", "TAG_ATTR", "QueueUnreadable", "QueuedJob", "job_tag", "live_job",
           "queued_jobs", "tagged_comment"]

TAG_ATTR = "slurm_tag"
LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                         "RESIZING", "SUSPENDED"})
"""Job states of a job that will still run its trial (``squeue --states`` names); COMPLETING and
every end state mean the run's process has ended, and its files say what it left."""


class QueueUnreadable(StdsError):
    """``squeue`` is installed but gave no list (no controller reachable, a timeout)."""


@dataclass(frozen=True)
class QueuedJob:
    job_id: str  # ``123``, or ``123_4`` for a task of a job array
    state: str
    comment: tuple[str, ...]  # the words of the job's comment


def job_tag(sweep_dir: Path | str, number: int) -> str:
    """The word in the comment of trial ``number``'s job: ``stds-trial-<number>-<12 hex digits
    of the sweep directory's path>`` (one search at a time per sweep directory, so it is unique)."""
    digest = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]
    return f"stds-trial-{number}-{digest}"


def tagged_comment(comment: str | None, tag: str) -> str:
    """The job comment with the trial's tag added to the user's own (``hydra.launcher.comment``)."""
    return f"{comment} {tag}" if comment else tag


def queued_jobs(timeout_s: float = 30.0) -> list[QueuedJob] | None:
    """This user's jobs that the SLURM controller holds (array tasks one by one), or None where
    ``squeue`` is not installed (a laptop). `QueueUnreadable` when it is, but answers nothing.

    ``squeue`` rather than submitit's ``Job.state``: that reads accounting (``sacct``), which a
    cluster may not keep, and needs the job id, which a job that never started may not have told.
    """
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    user = pwd.getpwuid(os.getuid()).pw_name  # the owner of the jobs this process submits
    command = [squeue, "--noheader", "--array", f"--user={user}", "--format=%i|%T|%k"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QueueUnreadable(f"squeue gave no answer ({one_line(exc)})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise QueueUnreadable(f"squeue failed: {last[:300]}")
    jobs = []
    for line in proc.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, comment = rest.partition("|")
        if job_id.strip():
            jobs.append(QueuedJob(job_id.strip(), state.strip().upper(), tuple(comment.split())))
    return jobs


def live_job(jobs: Sequence[QueuedJob], job_id: str | None, tag: str | None) -> QueuedJob | None:
    """The job of ``jobs`` with this id or this tag in its comment that will still run, if any."""
    for job in jobs:
        if job.state in LIVE_STATES and ((job_id and job.job_id == job_id) or (tag and tag in job.comment)):
            return job
    return None
