"""The run's life: `train(cfg, run_dir)` takes the run directory (its lock, a resumed run's
config), builds the run (`stds.run.setup.build`), resumes or starts it (`stds.run.life.resume`),
fits it (`stds.run.life.epoch.fit`), and on a failure leaves its one line in ``error.txt`` (or, for
a run that never started, nothing at all).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stds.errors import RunDirError, StdsError, error_line, user_error
from stds.run.files import rundir
from stds.run.files.atomic import write_atomic
from stds.run.life import resume, study_link
from stds.run.life.epoch import fit
from stds.run.life.signals import RunStopped, StopSignals
from stds.run.life.state import Progress
from stds.run.setup import distributed
from stds.run.setup.build import Run, build_run, prepare_config, set_determinism

log = logging.getLogger(__name__)

def train(cfg: DictConfig, run_dir: Path | str | None = None) -> float:
    """Train the run described by ``cfg`` in ``run_dir`` (Hydra's output dir by default).

    Returns the final test top-1 accuracy (a fraction), the objective of sweeps. A failure once
    training has begun, or in a sweep point, leaves its one line in ``<run_dir>/error.txt``; a
    run that fails before its first step (a bad config value, a missing dataset) in a directory
    of its own leaves nothing behind (`stds.run.files.rundir.remove_unstarted`).
    """
    resumed_dir = resume.resume_target(cfg)  # resume=<dir> | last: that run, in its own directory
    if resumed_dir is not None:
        cfg = resume.resumed_config(cfg, resumed_dir)
        run_dir = resumed_dir
    elif run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir
    timeout_s = float(cfg.distributed.timeout_s)
    env = distributed.setup(str(cfg.get("device", "auto")), timeout_s)
    # every rank works in rank 0's directory (a `${now:...}` name may differ between processes)
    run_dir = Path(distributed.broadcast_object(str(run_dir), env))
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    start = _Start()
    try:
        with StopSignals() as signals:
            result = _train_in(cfg, env, run_dir, signals, start, keep_command=resumed_dir is not None)
    except RunStopped as stop:
        log.warning("%s", stop)
        stop.hand_on()  # SIGUSR2 under submitit: requeue now that last.pt is written
        raise
    except BaseException as exc:
        # a failed collective: the ranks that stopped answering (a lost node) are named
        lost = None if user_error(exc) else distributed.name_lost_ranks(exc, env, timeout_s)
        if env.is_main and start.unstarted() and not _in_sweep():
            rundir.remove_unstarted(run_dir, _log_files(run_dir))
        # a run directory that is locked by another process or cannot be written gets no error.txt,
        # nor does one whose resume was refused (docs/resume.md: nothing in it changes)
        elif env.is_main and not isinstance(exc, (KeyboardInterrupt, RunDirError, resume.ResumeRefused)):
            _write_error(run_dir, lost or exc)
        elif lost is not None and 0 in lost.ranks and start.training:
            # rank 0, the writer, is lost: a survivor writes its line, unless one is there already
            _write_error(run_dir, lost, replace=False)
        if lost is not None:
            log.error("%s", lost)
            raise lost from exc
        raise
    # only after success: a rank that failed leaves its peers inside a collective, and the
    # launcher (torchrun, submitit) ends them; waiting for them here would hang
    distributed.teardown(env)
    return result


class _Start:
    """How far `_train_in` got: whether it found the directory holding nothing of a run that
    trained (``fresh``: `stds.run.files.rundir.holds_only_unstarted`), took its lock, and began training."""

    def __init__(self) -> None:
        self.fresh = self.locked = self.training = False

    def unstarted(self) -> bool:
        """A run of its own (fresh, locked by this process) that failed before its first step."""
        return self.fresh and self.locked and not self.training


def _in_sweep() -> bool:
    """Whether this is a point of a Hydra sweep (its directory stays, error.txt in it, for the report)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweeper_storage() -> str | None:
    """``hydra.sweeper.storage`` of this job's Hydra config: the study of a search's trial when its
    URL is the user's (kept out of the trial's overrides and logs)."""
    if not HydraConfig.initialized():
        return None
    storage = HydraConfig.get().sweeper.get("storage")
    return str(storage) if storage else None


def _log_files(run_dir: Path) -> list[Path]:
    """The log files that logging handlers (Hydra's ``train.log``) write inside ``run_dir``."""
    handlers = [*logging.getLogger().handlers, *logging.getLogger("stds").handlers]
    files = [Path(h.baseFilename) for h in handlers if isinstance(h, logging.FileHandler)]
    return [path for path in files if path.parent.resolve() == run_dir.resolve()]


def _train_in(raw: DictConfig, env: distributed.DistEnv, run_dir: Path, signals: StopSignals,
              start: _Start | None = None, keep_command: bool = False) -> float:
    """Prepare the config, build the run, resume it (or start it, from ``init_from`` if given), fit.

    Rank 0 holds the run directory's lock throughout, so a second process started on the same
    directory stops at once, naming this one. ``keep_command``: a ``resume=`` run keeps the
    ``.hydra/`` command files of the run it continues.
    """
    start = start or _Start()
    link = None
    with contextlib.ExitStack() as stack:
        fresh = not (run_dir / "checkpoints" / "last.pt").exists()
        start.fresh = rundir.holds_only_unstarted(run_dir, _log_files(run_dir))
        if env.is_main:
            rundir.check_writable(run_dir)
            stack.enter_context(rundir.RunLock(run_dir))
            start.locked = True
            link = study_link.open_link(raw.get("trial"), run_dir, _sweeper_storage())
            if link is not None:
                stack.enter_context(link)
            if fresh:  # a failing sweep point still has its config (and error.txt) for the report
                _set_aside(run_dir)
                resume.record_config(run_dir, raw)
        cfg = prepare_config(raw)
        if env.is_main:
            rundir.check_writable(run_dir / "checkpoints")
            rundir.remove_stale_temporaries(run_dir / "checkpoints")
        set_determinism(cfg, env)
        run = build_run(cfg, env, run_dir)
        progress = resume.resume(run)  # refuses a checkpoint of another experiment
        if env.is_main and not fresh:  # the resume is accepted: from here on the directory changes
            (run_dir / "error.txt").unlink(missing_ok=True)
            resume.record_config(run_dir, raw, with_hydra=not keep_command)
        if progress.step == 0 and cfg.init_from:
            resume.init_from(run, cfg.init_from)
        resume.repair_best(run, progress)
        if progress.epoch >= cfg.epochs:
            _say_finished(run, progress)
        start.training = True
        result = fit(run, progress, signals, link)
        if link is not None:
            link.tell_result()
        return result


def _say_finished(run: Run, progress: Progress) -> None:
    """A resumed run that has nothing left to train says so, and how to train on."""
    log.warning("%s already finished its %d epochs (step %d); nothing to train. To train on from its "
                "weights, start a new run: python launch/train.py init_from=%s epochs=<n> (epochs of a "
                "finished run cannot change)", run.run_dir, run.settings.epochs, progress.step,
                run.ckpt_dir / "last.pt")


def _set_aside(run_dir: Path) -> None:
    """A fresh start: what an older run left here (its ``metrics.json``, ``tb/``) goes to a
    ``previous-<time>/`` folder, so no report reads it as this run's; an old error.txt goes."""
    folder = rundir.set_aside_older_run(run_dir)
    if folder is not None:
        log.warning("%s held the files of an older run (no checkpoints/last.pt to resume); they are "
                    "moved to %s", run_dir, folder)
    (run_dir / "error.txt").unlink(missing_ok=True)


def _write_error(run_dir: Path, exc: BaseException, replace: bool = True) -> None:
    """``error.txt``: one line; ``replace=False`` keeps an ``error.txt`` already there (rank 0's)."""
    try:  # replaces a planted link (or, not replacing, leaves it), never follows it
        write_atomic(run_dir / "error.txt", error_line(exc), replace=replace)
    except FileExistsError:
        log.warning("%s/error.txt is already written; kept", run_dir)
    except (OSError, StdsError):
        pass  # a read-only or vanished run directory: the error is still raised and printed
