"""``hydra/launcher=local``: sweep points as parallel local processes that share the CPUs.

submitit's local executor (``hydra/launcher=submitit_local``) starts every point of a sweep at
once, and each process starts as many threads as the machine has cores: on a small machine the
points then spend most of their time fighting over the cores. `LocalSweepLauncher` runs at most
``parallel`` points at a time and gives each ``threads`` CPU threads (`share_cpus`), through
``OMP_NUM_THREADS`` in the job's environment, which `stds.run.setup.distributed.setup` applies with
``torch.set_num_threads``. It starts the next point as soon as one ends and logs the sweep's
progress while it waits: the counts of finished, failed, running and waiting points, and each
running point's step, ETA and last epoch, read from the end of its ``train.log``
(`point_progress`). Everything else (job folders, pickled results, failed points) is
hydra-submitit-launcher's local launcher. See ``docs/slurm.md``.

Hydra takes launchers only from the ``hydra_plugins`` namespace: the preset names
``hydra_plugins.stds_local_launcher.LocalSweepLauncher``, this class under that name, in
``launch/hydra_plugins/`` (on ``sys.path`` whenever ``launch/train.py`` runs).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
from omegaconf import OmegaConf

from stds.cli.callbacks import remove_empty_pattern_folders
from stds.cli.jobs import job_error
from stds.errors import ConfigError
from stds.run.files.safe import read_tail

log = logging.getLogger(__name__)

__all__ = ["CpuShare", "JobRunner", "LocalSweepLauncher", "available_cpus", "share_cpus"]


@dataclass(frozen=True)
class CpuShare:
    """How a local sweep uses the machine: points at once, and CPU threads per process."""

    parallel: int
    threads: int


_STEP_LINE = re.compile(r"epoch \d+/\d+ step (\d+)/(\d+) .*\| ETA epoch \S+ run (\S+)")
_EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): test_acc1 (\S+) .*sparsity (\S+)")
"""The loop's interval and end-of-epoch log lines (`stds.run.life.loop`, `stds.run.life.epoch`), as a point's log holds them."""


def point_progress(log_file: Path, tail_bytes: int = 16384) -> str | None:
    """``step 120/1320 ETA 0:05:00, epoch 3/30 test_acc1 0.9500 sparsity 0.6100`` from the end of a
    sweep point's log (its latest step line and latest finished epoch); None before either."""
    try:
        text = read_tail(log_file, Path(log_file).parent, tail_bytes)  # no symlink, no FIFO
    except OSError:
        return None
    steps, epochs = _STEP_LINE.findall(text), _EPOCH_LINE.findall(text)
    parts = []
    if steps:
        step, total, eta = steps[-1]
        parts.append(f"step {step}/{total} ETA {eta}")
    if epochs:
        epoch, planned, acc, sparsity = epochs[-1]
        parts.append(f"epoch {epoch}/{planned} test_acc1 {acc} sparsity {sparsity}")
    return ", ".join(parts) or None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup or ``taskset`` limit counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def share_cpus(
    points: int, cpus: int, cpus_per_task: int | None = None, max_parallel: int | None = None,
    tasks_per_node: int = 1,
) -> CpuShare:
    """Points run at once and threads per process for ``points`` sweep points on ``cpus`` CPUs.

    Without ``cpus_per_task`` as many points run at once as there are CPUs for one thread per
    process (at most ``points`` and ``max_parallel``), and the CPUs are divided evenly among
    them; with it, each job gets that many CPUs and ``cpus // cpus_per_task`` jobs run at once.
    A job's CPUs are divided among its ``tasks_per_node`` processes (DDP), one thread at least.
    """
    for name, value in (("cpus_per_task", cpus_per_task), ("max_parallel", max_parallel)):
        if value is not None and value < 1:
            raise ConfigError(f"hydra.launcher.{name}={value} must be >= 1 (or null for automatic)")
    tasks = max(tasks_per_node, 1)
    if cpus_per_task is None:
        parallel = min(points, max(cpus // tasks, 1))
    else:
        parallel = max(cpus // (cpus_per_task * tasks), 1)
    parallel = max(min(parallel, points, max_parallel or points), 1)
    per_job = cpus_per_task * tasks if cpus_per_task is not None else cpus // parallel
    return CpuShare(parallel=parallel, threads=max(per_job // tasks, 1))


class LocalSweepLauncher(LocalLauncher):
    """hydra-submitit-launcher's local launcher with at most ``parallel`` jobs at a time, the
    CPUs shared out among them, and progress lines while the sweep runs."""

    def __init__(self, max_parallel: int | None = None, progress_every_s: float = 30.0,
                 poll_s: float = 1.0, **params: Any) -> None:
        super().__init__(**params)
        self.max_parallel = max_parallel
        self.progress_every_s = progress_every_s
        self.poll_s = poll_s
        self.in_flight = 1  # points other launches of a search run at the same time (`points_at_once`)

    def _executor(self, share: CpuShare) -> Any:
        """A submitit local executor set up as the plugin does, plus the thread count."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init["local_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster="local", **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        setup = list(params.pop("setup", None) or [])
        setup.append(f"export OMP_NUM_THREADS={share.threads}")
        params = {k if k in shared else f"local_{k}": v for k, v in params.items()}
        executor.update_parameters(local_setup=setup, **params)
        return executor

    def _share(self, points: int) -> CpuShare:
        return share_cpus(points, available_cpus(), self.params.get("cpus_per_task"), self.max_parallel,
                          int(self.params.get("tasks_per_node") or 1))

    def points_at_once(self, wanted: int) -> int:
        """How many of ``wanted`` points this machine runs at once; a search keeps that many in
        flight and launches them one at a time, each with its share of the CPUs."""
        self.in_flight = self._share(wanted).parallel
        return self.in_flight

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        share = self._share(max(len(job_overrides), self.in_flight))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Local sweep in {sweep_dir}: {len(job_overrides)} points, {share.parallel} at a "
                 f"time with {share.threads} CPU thread(s) each ({available_cpus()} CPUs)")
        pending = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            pending.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                            Singleton.get_state()))
        executor = self._executor(share)
        jobs: list[Any] = []
        try:
            self._run(executor, self._job_runner(), pending, jobs, share.parallel)
        except KeyboardInterrupt:
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise
        finally:  # here too: Hydra skips its end-of-sweep callbacks when a point failed
            remove_empty_pattern_folders(sweep_dir / ".submitit")
        return [job.results()[0] for job in jobs]

    def _job_runner(self) -> LocalLauncher:
        """What each job unpickles and calls: `JobRunner`, set up like this launcher.

        Not ``self``: the class Hydra instantiates is registered under ``hydra_plugins`` from
        ``launch/`` (see ``launch/hydra_plugins/stds_local_launcher.py``), which a job started
        elsewhere could not import.
        """
        runner = JobRunner(**self.params)
        runner.setup(hydra_context=self.hydra_context, task_function=self.task_function,  # type: ignore[arg-type]
                     config=self.config)  # type: ignore[arg-type]
        return runner

    def _run(self, executor: Any, runner: LocalLauncher, pending: list[tuple], jobs: list[Any],
             parallel: int) -> None:
        """Submit the points in order, at most ``parallel`` running; log progress until all end."""
        total, started = len(pending), time.monotonic()
        failed: dict[int, bool] = {}  # index in jobs -> whether it failed, once ended
        numbers: list[int] = []  # index in jobs -> the point's job number
        last_line, last_time = "", started
        while True:
            for index, job in enumerate(jobs):
                if index not in failed and job.done():
                    failed[index] = _failed(job)
            running = len(jobs) - len(failed)
            while pending and running < parallel:
                numbers.append(pending[0][2])
                jobs.append(executor.submit(runner, *pending.pop(0)))
                running += 1
            ended_bad = sum(failed.values())
            line = (f"{len(failed) - ended_bad} finished, {ended_bad} failed, {running} running, "
                    f"{len(pending)} waiting, of {total}")
            now = time.monotonic()
            if line != last_line or now - last_time >= self.progress_every_s:
                running_now = [numbers[i] for i in range(len(jobs)) if i not in failed]
                log.info(f"Local sweep: {line} ({now - started:.0f} s){self._points_line(running_now)}")
                last_line, last_time = line, now
            if not running and not pending:
                return
            time.sleep(self.poll_s)

    def _point_log(self, number: int) -> Path | None:
        """A point's ``<job name>.log``, when its directory is the default ``<sweep dir>/<job num>``."""
        assert self.config is not None
        sweep = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)
        if not isinstance(sweep, dict) or sweep.get("subdir") != "${hydra.job.num}":
            return None
        return Path(str(self.config.hydra.sweep.dir)) / str(number) / f"{self.config.hydra.job.name}.log"

    def _points_line(self, numbers: list[int]) -> str:
        """``; #0 step 20/44 ETA 0:00:31; #1 ...`` for the running points whose logs show progress."""
        parts = []
        for number in numbers:
            log_file = self._point_log(number)
            progress = point_progress(log_file) if log_file is not None else None
            if progress is not None:
                parts.append(f"#{number} {progress}")
        return "".join(f"; {part}" for part in parts)


class JobRunner(LocalLauncher):
    """The plugin's job body (run one sweep point), then the end of a failed point in its logs.

    Hydra catches a point's exception and returns it in a FAILED `JobReturn`; submitit then logs
    "Job completed successfully" through the root logger, whose file handler is still the point's
    ``train.log``. Here a failed point's one line goes to ``train.log`` and to the job's stderr
    (``.submitit/<job>/*_log.err``, where the report reads why a point without ``error.txt``
    failed), and the point's log files are closed, so submitit's lines do not end them.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        returned = super().__call__(*args, **kwargs)
        line = job_error(returned)
        if line is not None:
            logging.getLogger("stds").error("this sweep point failed: %s", line)
            print(line, file=sys.stderr, flush=True)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
        return returned


def _failed(job: Any) -> bool:
    """Whether an ended job failed (raised, or Hydra caught the task's exception)."""
    try:
        returned = job.results()[0]
    except Exception:
        return True
    return job_error(returned) is not None
