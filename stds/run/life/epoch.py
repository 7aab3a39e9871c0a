"""The end of an epoch and of the run: `finish_epoch` (learning-rate step, checkpoint before the
evaluation), `evaluate_epoch` (the epoch's record, metrics, best checkpoint), `fit` (the epochs left,
then ``metrics.json`` with `summary`'s figures) and the run's opening and closing log lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from stds.method.sparse import sparsity
from stds.run.life import state
from stds.run.life.loop import Loop, train_epoch
from stds.run.life.signals import StopSignals
from stds.run.life.state import Progress
from stds.run.life.study_link import StudyLink
from stds.run.measure.evaluate import evaluate, ranks_in_sync, sync_buffers
from stds.run.measure.health import diagnose, diagnose_run
from stds.run.measure.metrics import BEST_RULE, MetricsWriter, replaces_best
from stds.run.setup.build import Run
from stds.run.setup.distributed import broadcast_object

log = logging.getLogger(__name__)

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
    if run.env.distributed:  # every rank's weights and buffers (d included) equal rank 0's
        record["ranks_in_sync"] = ranks_in_sync(run)
    record["warnings"] = diagnose(record, run.cfg, previous=progress.last_record)
    progress.last_record, progress.pending_eval = record, None
    best = replaces_best(record["test_acc1"], record["sparsity"], progress.best_acc1, progress.best_sparsity)
    if best:
        progress.best_acc1, progress.best_epoch = record["test_acc1"], progress.epoch
        progress.best_sparsity = record["sparsity"]
    state.save(run, progress, best=best)
    if loop.writer is not None:
        loop.writer.epoch(record)
        every = run.settings.histogram_every_epochs
        if every and (progress.epoch % every == 0 or progress.epoch == run.settings.epochs):
            loop.writer.histograms(run.core, progress.step)
    log.info("epoch %d/%d: test_acc1 %.4f test_acc5 %.4f sparsity %.4f d %.4g | %.0f img/s, epoch %.1f s "
             "(eval %.1f s)", progress.epoch, run.settings.epochs, record["test_acc1"], record["test_acc5"],
             record["sparsity"], record["d"], record["train_images_per_s"], record["epoch_time_s"], loop.eval_s)
    for warning in record["warnings"]:
        log.warning("%s", warning)
    return record


def summary(run: Run, progress: Progress) -> dict[str, Any]:
    """The figures of ``metrics.json`` (names from ``docs/metrics.md``)."""
    last = progress.last_record or {}
    keys = ("test_acc1", "test_acc5", "sparsity", "sparsity_layers", "d", "synops", "first_layer_macs", "energy_uj")
    return {
        **{key: last.get(key) for key in keys},
        "firing_rates": last.get("firing_rates", {}),
        "best_test_acc1": progress.best_acc1, "best_epoch": progress.best_epoch,
        "best_sparsity": progress.best_sparsity, "best_rule": BEST_RULE,
        "epoch": progress.epoch, "epochs_planned": run.settings.epochs, "step": progress.step,
        "world_size": run.env.world_size, "ranks_in_sync": ranks_in_sync(run),
        "warnings": last.get("warnings", []),
    }


def fit(run: Run, progress: Progress, signals: StopSignals, link: StudyLink | None = None) -> float:
    """Train the remaining epochs from ``progress``, write ``metrics.json``; the final top-1.

    A search's trial (``link``) reports each epoch's top-1 to the study's pruner and ends early,
    after that epoch's checkpoint, when the pruner says so (``"pruned": true`` in ``metrics.json``).
    """
    loop = Loop(run, signals)
    if run.env.is_main:
        loop.writer = MetricsWriter(run.run_dir, purge_step=progress.step or None)
        loop.writer.truncate_after(progress.step)
        _log_start(run)
        loop.writer.restore(progress.last_record)  # a kill may have come between checkpoint and line
    if progress.pending_eval is not None:  # the checkpoint was written, the evaluation was not done
        evaluate_epoch(run, progress, loop)
    pruned = False
    while progress.epoch < run.settings.epochs and not pruned:
        started = time.perf_counter()
        train_stats = train_epoch(run, progress, loop)
        record = finish_epoch(run, progress, loop, train_stats, started)
        pruned = _pruned(run, link, record)
    sync_buffers(run)
    result = summary(run, progress)
    if run.settings.trial:
        result["pruned"] = pruned
    if loop.writer is not None:
        run_warnings = diagnose_run(loop.writer.history(), run.cfg)
        for warning in run_warnings:
            log.warning("%s", warning)
        result["warnings"] = [*result["warnings"], *run_warnings]
        loop.writer.final(result)
        loop.writer.close()
        _log_end(run, result)
    return float(result["test_acc1"])


def _pruned(run: Run, link: StudyLink | None, record: dict[str, Any]) -> bool:
    """Whether the study's pruner stops this trial after the epoch of ``record`` (rank 0 asks)."""
    if not run.settings.trial:
        return False
    stop = link.should_stop(int(record["epoch"]), float(record["test_acc1"])) if link is not None else False
    stop = bool(broadcast_object(stop, run.env))
    if stop:
        log.warning("the study's pruner stopped this trial after epoch %d/%d (test_acc1 %.4f); its checkpoint "
                    "stays (resume=%s trial.number=null trains it on)", record["epoch"], run.settings.epochs,
                    record["test_acc1"], run.run_dir)
    return stop


def _log_start(run: Run) -> None:
    """Where the run writes, and a warning for settings that make a CPU run slow."""
    log.info("run directory: %s (train.log, metrics.json, checkpoints/, tb/)", run.run_dir.resolve())
    if run.amp_dtype is not None and run.env.device.type == "cpu":
        log.warning("amp=%s on a CPU: autocast runs as bf16 there, usually slower than amp=false "
                    "(benchmarks/amp_cpu.py compares the two on this machine); set amp=false on a CPU",
                    run.settings.amp)


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
