"""The training loop: `train(cfg, run_dir)` builds a run from its config (`stds.run.build`), resumes it
(`stds.run.resume`) and trains.

Per step: the static batch goes through the spiking model (which repeats it over T and averages
over T), loss, backward, optimizer step (the Grad R prior follows through the optimizer's step
hook), ``reset_net``, then the threshold d for the next step. Nothing is read from the device in a
step: losses and accuracies are summed on the device and read at the log interval, where the log
line, the progress bar and TensorBoard get images/s, ms per step, the share of time spent waiting
for data and the ETAs. Per epoch: learning-rate step, checkpoint (so a failing evaluation loses
no training), evaluation (`stds.run.evaluate`), sparsity, metrics, checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from spikingjelly.activation_based import functional

from stds.data import loaders
from stds.errors import NonFiniteLossError, RunDirError, error_line
from stds.method.sparse import sparsity
from stds.run import distributed, resume, rundir, state
from stds.run.build import Run, build_run, prepare_config, set_determinism
from stds.run.evaluate import evaluate, ranks_in_sync, sync_buffers
from stds.run.health import diagnose, diagnose_run
from stds.run.metrics import (BEST_RULE, IntervalMeter, MetricsWriter, correct_topk, format_duration,
                              interval_line, loss_fn, replaces_best)
from stds.run.signals import RunStopped, StopSignals, name as signal_name
from stds.run.state import Progress

log = logging.getLogger(__name__)


class Loop:
    """What the loop keeps between steps besides `Progress`: the metric writer (rank 0), the
    interval meter, the progress bar, the stop signals, the last evaluation's duration, the
    run's ETA (shown at the front of the progress bar) and whether torch.compile still has to
    compile the training step."""

    def __init__(self, run: Run, signals: StopSignals) -> None:
        self.writer: MetricsWriter | None = None
        self.meter = IntervalMeter(run.images_per_step)
        self.signals = signals
        self.bar: Any = None
        self.eval_s = 0.0
        self.resumed_samples = 0  # samples of the current epoch trained before a restart (not timed here)
        self.eta_run_s: float | None = None
        self.compiling = bool(run.cfg.compile)


def log_interval(run: Run) -> int:
    """Steps between log lines: ``logging.log_every_steps``, but at most half an epoch, so every
    epoch reports its loss and ETA while it runs (and again at its end)."""
    return max(min(run.cfg.logging.log_every_steps, run.steps_per_epoch // 2), 1)


def _batches(run: Run, progress: Progress, loop: Loop) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's remaining batches on the device; the time blocked on each goes to the meter."""
    loaders.start_epoch(run.train_loader, progress.epoch, run.cfg.seed, progress.batch_in_epoch)
    iterator = iter(run.train_loader)
    while True:
        started = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            return
        loop.meter.waited(time.perf_counter() - started)
        yield run.to_device(images, labels)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the (detached) loss and the number of correct samples."""
    with run.autocast():
        scores = run.model(images)
    loss = loss_fn(run.cfg.loss, scores, labels)
    run.core.zero_grad(set_to_none=True)  # also parameters outside the optimizer (gradr_optimize=pruned)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)  # the Grad R prior runs in the optimizer's step hook
    run.scaler.update()
    functional.reset_net(run.core)
    return loss.detach(), correct_topk(scores.detach(), labels, 1)


def _compiling_step(run: Run, images: torch.Tensor, labels: torch.Tensor, loop: Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step under ``compile=true``, where torch.compile compiles: said before, timed after."""
    if run.env.is_main:
        log.info("compile=true: torch.compile is compiling the training step (the first step waits "
                 "for it: seconds on a GPU, up to minutes on a CPU)")
    started = time.perf_counter()
    loss, correct = train_step(run, images, labels)
    float(loss)  # waits for the step: the time includes its kernels
    loop.compiling = False
    if run.env.is_main:
        log.info("compile=true: compiled and ran the first step in %.1f s", time.perf_counter() - started)
    return loss, correct


def train_epoch(run: Run, progress: Progress, loop: Loop | None = None) -> dict[str, float]:
    """Train one epoch (or its rest, after a mid-epoch resume); returns its train loss and top-1."""
    loop = loop or Loop(run, StopSignals())
    run.model.train()
    first_bad = torch.full((), -1, dtype=torch.long, device=run.env.device)
    every = log_interval(run)
    ckpt_every = run.cfg.checkpoint_every_steps
    _open_bar(run, progress, loop)
    loop.resumed_samples = progress.sums.samples
    loop.meter.restart()
    for images, labels in _batches(run, progress, loop):
        if loop.compiling:
            loss, correct = _compiling_step(run, images, labels, loop)
        else:
            loss, correct = train_step(run, images, labels)
        progress.step += 1
        progress.batch_in_epoch += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), progress.step, first_bad)
        progress.sums.add(loss, correct, labels.numel())
        run.threshold.step(progress.step)
        loop.meter.stepped()
        if loop.bar is not None:
            loop.bar.update(1)
        end_of_epoch = progress.batch_in_epoch == run.steps_per_epoch
        if progress.step % every == 0 or end_of_epoch:
            _check_finite(progress, first_bad)
            _log_interval(run, progress, loop, loss)
        stop = _stop_requested(run, progress, loop, every)  # the same answer on every rank
        if stop or (ckpt_every and progress.step % ckpt_every == 0 and not end_of_epoch):
            _check_finite(progress, first_bad)
            state.save(run, progress)
        if stop:
            _raise_stopped(run, progress, loop)
    _close_bar(loop)
    _check_finite(progress, first_bad)
    totals = progress.sums.as_floats()
    sums = torch.tensor([totals["loss"], totals["correct"], totals["samples"]], dtype=torch.float64)
    loss_sum, correct, count = distributed.all_reduce_sum(sums.to(run.env.device), run.env).tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_acc1": correct / max(count, 1)}


def _check_finite(progress: Progress, first_bad: torch.Tensor) -> None:
    bad_step = int(first_bad)  # reads the device: only at the log interval and before a save
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the loss became NaN or inf at epoch {progress.epoch + 1}, step {bad_step}; "
            "the last good checkpoint is kept; lower lr or set amp=false"
        )


def _stop_requested(run: Run, progress: Progress, loop: Loop, every: int) -> bool:
    """Whether a stop signal arrived: checked every step in one process; under DDP at the log
    interval, where the ranks agree on it (a signal reaches the ranks at different steps)."""
    if not run.env.distributed:
        return loop.signals.received is not None
    if progress.step % every and progress.batch_in_epoch != run.steps_per_epoch:
        return False
    flag = torch.tensor([float(loop.signals.received or 0)], device=run.env.device)
    received = int(distributed.all_reduce_max(flag, run.env).item())
    if received and loop.signals.received is None:
        loop.signals.received = received
    return bool(received)


def _raise_stopped(run: Run, progress: Progress, loop: Loop) -> None:
    signum = loop.signals.received
    raise RunStopped(
        f"stopped by {signal_name(signum)} in {progress.where(run.cfg.epochs)}; "
        f"{run.ckpt_dir / 'last.pt'} is saved; resume with: python launch/train.py resume={run.run_dir}",
        signum, loop.signals.previous_handler(signum),
    )


def _open_bar(run: Run, progress: Progress, loop: Loop) -> None:
    if run.env.is_main and run.cfg.logging.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        loop.bar = tqdm(total=run.steps_per_epoch, initial=progress.batch_in_epoch, leave=False,
                        desc=bar_description(progress.epoch + 1, run.cfg.epochs, loop.eta_run_s),
                        dynamic_ncols=True)


def bar_description(epoch: int, epochs: int, eta_run_s: float | None) -> str:
    """The progress bar's left end, which a narrow terminal never cuts: the epoch and the run's ETA
    (tqdm shortens the bar and cuts the right end, where loss and throughput are)."""
    eta = "" if eta_run_s is None else f" ETA run {format_duration(eta_run_s)}"
    return f"epoch {epoch}/{epochs}{eta}"


def _close_bar(loop: Loop) -> None:
    if loop.bar is not None:
        loop.bar.close()
        loop.bar = None


def _log_interval(run: Run, progress: Progress, loop: Loop, loss: torch.Tensor) -> None:
    """Loss, lr, d and throughput: TensorBoard, the progress bar, and a log line without a terminal."""
    values = {"step_loss": float(loss), "lr": run.optimizer.param_groups[0]["lr"], **run.threshold.metrics()}
    values.update(loop.meter.report(
        steps_left_epoch=run.steps_per_epoch - progress.batch_in_epoch,
        steps_left_run=run.total_steps - progress.step,
        eval_s=loop.eval_s, epochs_left=run.cfg.epochs - progress.epoch,
    ))
    if loop.writer is not None:
        loop.writer.scalars(progress.step, values)
    loop.eta_run_s = values["eta_run_s"]
    if loop.bar is not None:
        loop.bar.set_description_str(bar_description(progress.epoch + 1, run.cfg.epochs, loop.eta_run_s),
                                     refresh=False)
        loop.bar.set_postfix_str(f"loss {values['step_loss']:.4f} | {interval_line(values)}", refresh=False)
    elif run.env.is_main:
        log.info("epoch %d/%d step %d/%d loss %.4f lr %.3g d %.4g | %s", progress.epoch + 1,
                 run.cfg.epochs, progress.step, run.total_steps, values["step_loss"], values["lr"],
                 values["d"], interval_line(values))


def finish_epoch(run: Run, progress: Progress, loop: Loop, train_stats: dict[str, float], started: float) -> dict[str, Any]:
    """Learning-rate step and the epoch's checkpoint, written before the evaluation (a failing
    evaluation loses no training: the resumed run only evaluates), then `evaluate_epoch`."""
    train_s = time.perf_counter() - started
    run.lr_scheduler.step()
    progress.epoch += 1
    progress.batch_in_epoch = 0
    # only what this process trained since `started`: after a mid-epoch resume the epoch's earlier
    # samples were trained (and timed) by the process before the restart
    trained = (progress.sums.samples - loop.resumed_samples) * run.env.world_size
    progress.sums = state.EpochSums()
    progress.pending_eval = {**train_stats, "train_s": train_s, "trained": float(trained)}
    state.save(run, progress)
    return evaluate_epoch(run, progress, loop)


def evaluate_epoch(run: Run, progress: Progress, loop: Loop) -> dict[str, Any]:
    """Evaluate the epoch ``progress.pending_eval`` holds; its record, metrics and checkpoints."""
    pending = progress.pending_eval or {}
    eval_started = time.perf_counter()
    test_stats = evaluate(run)
    loop.eval_s = time.perf_counter() - eval_started
    train_s, trained = pending.get("train_s", 0.0), pending.get("trained", 0.0)
    train_stats = {k: v for k, v in pending.items() if k not in ("train_s", "trained")}
    sp = sparsity(run.core)
    record = {"epoch": progress.epoch, "step": progress.step, "lr": run.optimizer.param_groups[0]["lr"],
              **run.threshold.metrics(), **train_stats, **test_stats,
              "sparsity": sp["total"], "sparsity_layers": sp["layers"],
              "epoch_time_s": train_s + loop.eval_s, "eval_time_s": loop.eval_s,
              "train_images_per_s": trained / max(train_s, 1e-9),
              "bad_images": run.bad_images.drain() if run.bad_images is not None else []}
    record["warnings"] = diagnose(record, run.cfg, previous=progress.last_record)
    progress.last_record, progress.pending_eval = record, None
    best = replaces_best(record["test_acc1"], record["sparsity"], progress.best_acc1, progress.best_sparsity)
    if best:
        progress.best_acc1, progress.best_epoch = record["test_acc1"], progress.epoch
        progress.best_sparsity = record["sparsity"]
    state.save(run, progress, best=best)
    if loop.writer is not None:
        loop.writer.epoch(record)
        every = run.cfg.logging.histogram_every_epochs
        if every and (progress.epoch % every == 0 or progress.epoch == run.cfg.epochs):
            loop.writer.histograms(run.core, progress.step)
    log.info("epoch %d/%d: test_acc1 %.4f test_acc5 %.4f sparsity %.4f d %.4g | %.0f img/s, epoch %.1f s "
             "(eval %.1f s)", progress.epoch, run.cfg.epochs, record["test_acc1"], record["test_acc5"],
             record["sparsity"], record["d"], record["train_images_per_s"], record["epoch_time_s"], loop.eval_s)
    for warning in record["warnings"]:
        log.warning("%s", warning)
    return record


def summary(run: Run, progress: Progress) -> dict[str, Any]:
    """The figures of ``metrics.json`` (names from ``docs/metrics.md``)."""
    last = progress.last_record or {}
    keys = ("test_acc1", "test_acc5", "sparsity", "sparsity_layers", "d", "synops", "first_layer_macs")
    return {
        **{key: last.get(key) for key in keys},
        "firing_rates": last.get("firing_rates", {}),
        "best_test_acc1": progress.best_acc1, "best_epoch": progress.best_epoch,
        "best_sparsity": progress.best_sparsity, "best_rule": BEST_RULE,
        "epoch": progress.epoch, "epochs_planned": run.cfg.epochs, "step": progress.step,
        "world_size": run.env.world_size, "ranks_in_sync": ranks_in_sync(run),
        "warnings": last.get("warnings", []),
    }


def fit(run: Run, progress: Progress, signals: StopSignals) -> float:
    """Train the remaining epochs from ``progress``, write ``metrics.json``; the final top-1."""
    loop = Loop(run, signals)
    if run.env.is_main:
        loop.writer = MetricsWriter(run.run_dir, purge_step=progress.step or None)
        loop.writer.truncate_after(progress.step)
        _log_start(run)
        loop.writer.restore(progress.last_record)  # a kill may have come between checkpoint and line
    if progress.pending_eval is not None:  # the checkpoint was written, the evaluation was not done
        evaluate_epoch(run, progress, loop)
    while progress.epoch < run.cfg.epochs:
        started = time.perf_counter()
        train_stats = train_epoch(run, progress, loop)
        finish_epoch(run, progress, loop, train_stats, started)
    sync_buffers(run)
    result = summary(run, progress)
    if loop.writer is not None:
        run_warnings = diagnose_run(loop.writer.history(), run.cfg)
        for warning in run_warnings:
            log.warning("%s", warning)
        result["warnings"] = [*result["warnings"], *run_warnings]
        loop.writer.final(result)
        loop.writer.close()
        _log_end(run, result)
    return float(result["test_acc1"])


def _log_start(run: Run) -> None:
    """Where the run writes, and a warning for settings that make a CPU run slow."""
    log.info("run directory: %s (train.log, metrics.json, checkpoints/, tb/)", run.run_dir.resolve())
    if run.amp_dtype is not None and run.env.device.type == "cpu":
        log.warning("amp=%s on a CPU: autocast runs as bf16 there and trains about 6.5 times slower than "
                    "amp=false (136 against 888 images/s for the digits net on 2 cores); set amp=false "
                    "on a CPU", run.cfg.amp)


def _log_end(run: Run, result: dict[str, Any]) -> None:
    """The closing summary: final and best figures, where the files are, and what to run next (a
    finished run is not resumed: ``init_from`` starts a new one from its weights)."""
    where = run.run_dir.resolve()
    log.info("finished %d/%d epochs: test_acc1 %.4f at sparsity %.4f; best.pt: test_acc1 %.4f at epoch %d "
             "(sparsity %.4f; the most accurate epoch at the final sparsity, docs/metrics.md)",
             result["epoch"], result["epochs_planned"], result["test_acc1"] or 0.0, result["sparsity"] or 0.0,
             result["best_test_acc1"], result["best_epoch"], result["best_sparsity"])
    log.info("files: %s, metrics.jsonl, checkpoints/last.pt and best.pt, tb/ (tensorboard --logdir %s)",
             where / "metrics.json", where)
    log.info("next: python launch/export.py %s writes pruned.pt (--which best: from best.pt); "
             "python launch/train.py init_from=%s starts a new run from these weights",
             where, where / "checkpoints" / "last.pt")


def train(cfg: DictConfig, run_dir: Path | str | None = None) -> float:
    """Train the run described by ``cfg`` in ``run_dir`` (Hydra's output dir by default).

    Returns the final test top-1 accuracy (a fraction), the objective of sweeps. A failure once
    training has begun, or in a sweep point, leaves its one line in ``<run_dir>/error.txt``; a
    run that fails before its first step (a bad config value, a missing dataset) in a directory
    of its own leaves nothing behind (`stds.run.rundir.remove_unstarted`).
    """
    resumed_dir = resume.resume_target(cfg)  # resume=<dir> | last: that run, in its own directory
    if resumed_dir is not None:
        cfg = resume.resumed_config(cfg, resumed_dir)
        run_dir = resumed_dir
    elif run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir
    env = distributed.setup(str(cfg.get("device", "auto")))
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
        if env.is_main and start.unstarted() and not _in_sweep():
            rundir.remove_unstarted(run_dir, _log_files(run_dir))
        # a run directory that is locked by another process or cannot be written gets no error.txt
        elif env.is_main and not isinstance(exc, (KeyboardInterrupt, RunDirError)):
            _write_error(run_dir, exc)
        raise
    # only after success: a rank that failed leaves its peers inside a collective, and the
    # launcher (torchrun, submitit) ends them; waiting for them here would hang
    distributed.teardown(env)
    return result


class _Start:
    """How far `_train_in` got: whether it found the directory holding nothing of a run that
    trained (``fresh``: `stds.run.rundir.holds_only_unstarted`), took its lock, and began training."""

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
    with contextlib.ExitStack() as stack:
        fresh = not (run_dir / "checkpoints" / "last.pt").exists()
        start.fresh = rundir.holds_only_unstarted(run_dir, _log_files(run_dir))
        if env.is_main:
            rundir.check_writable(run_dir)
            stack.enter_context(rundir.RunLock(run_dir))
            start.locked = True
            (run_dir / "error.txt").unlink(missing_ok=True)
            if fresh:  # a failing sweep point still has its config (and error.txt) for the report
                resume.record_config(run_dir, raw)
        cfg = prepare_config(raw)
        if env.is_main:
            rundir.check_writable(run_dir / "checkpoints")
            rundir.remove_stale_temporaries(run_dir / "checkpoints")
        set_determinism(cfg, env)
        run = build_run(cfg, env, run_dir)
        progress = resume.resume(run)  # refuses a checkpoint of another experiment
        if env.is_main and not fresh:
            resume.record_config(run_dir, raw, with_hydra=not keep_command)
        if progress.step == 0 and cfg.init_from:
            resume.init_from(run, cfg.init_from)
        resume.repair_best(run, progress)
        if progress.epoch >= cfg.epochs:
            _say_finished(run, progress)
        start.training = True
        return fit(run, progress, signals)


def _say_finished(run: Run, progress: Progress) -> None:
    """A resumed run that has nothing left to train says so, and how to train on."""
    log.warning("%s already finished its %d epochs (step %d); nothing to train. To train on from its "
                "weights, start a new run: python launch/train.py init_from=%s epochs=<n> (epochs of a "
                "finished run cannot change)", run.run_dir, run.cfg.epochs, progress.step,
                run.ckpt_dir / "last.pt")


def _write_error(run_dir: Path, exc: BaseException) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(error_line(exc))
    except OSError:
        pass  # a read-only or vanished run directory: the error is still raised and printed
