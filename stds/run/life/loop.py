"""The epoch loop: `train_epoch` trains one epoch (or its rest after a mid-epoch resume).

Per step: the static batch goes through the spiking model (which repeats it over T and averages
over T), loss, backward, optimizer step (the Grad R prior follows through the optimizer's step
hook), ``reset_net``, then the threshold d for the next step. Nothing is read from the device in a
step: losses and accuracies are summed on the device and read at the log interval, where the log
line, the progress bar and TensorBoard get images/s, ms per step, the share of time spent waiting
for data and the ETAs. A stop signal saves ``last.pt`` and raises `RunStopped`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterator

import torch
from spikingjelly.activation_based import functional

from stds.data import loaders
from stds.errors import NonFiniteLossError
from stds.run.life import state
from stds.run.life.signals import RunStopped, StopSignals, name as signal_name
from stds.run.life.state import Progress
from stds.run.measure.metrics import IntervalMeter, MetricsWriter, format_duration, interval_line, loss_fn, correct_topk
from stds.run.setup import distributed
from stds.run.setup.build import Run

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
        self.compiling = bool(run.settings.compile)


def log_interval(run: Run) -> int:
    """Steps between log lines: ``logging.log_every_steps``, but at most half an epoch, so every
    epoch reports its loss and ETA while it runs (and again at its end)."""
    return max(min(run.settings.log_every_steps, run.steps_per_epoch // 2), 1)


def _batches(run: Run, progress: Progress, loop: Loop) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's remaining batches on the device; the time blocked on each goes to the meter."""
    loaders.start_epoch(run.train_loader, progress.epoch, run.settings.seed, progress.batch_in_epoch)
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
    loss = loss_fn(run.settings.loss, scores, labels)
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
    ckpt_every = run.settings.checkpoint_every_steps
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
        f"stopped by {signal_name(signum)} in {progress.where(run.settings.epochs)}; "
        f"{run.ckpt_dir / 'last.pt'} is saved; resume with: python launch/train.py resume={run.run_dir}",
        signum, loop.signals.previous_handler(signum),
    )


def _open_bar(run: Run, progress: Progress, loop: Loop) -> None:
    if run.env.is_main and run.settings.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        loop.bar = tqdm(total=run.steps_per_epoch, initial=progress.batch_in_epoch, leave=False,
                        desc=bar_description(progress.epoch + 1, run.settings.epochs, loop.eta_run_s),
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
        eval_s=loop.eval_s, epochs_left=run.settings.epochs - progress.epoch,
    ))
    if loop.writer is not None:
        loop.writer.scalars(progress.step, values)
    loop.eta_run_s = values["eta_run_s"]
    if loop.bar is not None:
        loop.bar.set_description_str(bar_description(progress.epoch + 1, run.settings.epochs, loop.eta_run_s),
                                     refresh=False)
        loop.bar.set_postfix_str(f"loss {values['step_loss']:.4f} | {interval_line(values)}", refresh=False)
    elif run.env.is_main:
        log.info("epoch %d/%d step %d/%d loss %.4f lr %.3g d %.4g | %s", progress.epoch + 1,
                 run.settings.epochs, progress.step, run.total_steps, values["step_loss"], values["lr"],
                 values["d"], interval_line(values))
