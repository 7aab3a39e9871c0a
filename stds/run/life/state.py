"""The loop's state (`Progress`, with the epoch's running sums `EpochSums`) and what a checkpoint
holds of a run: `state_dict`, written by `save`.

Writes go through `stds.run.files.checkpoint.save_atomic` on rank 0 only. Order matters for crash
safety: ``best.pt`` is written before ``last.pt``, so ``last.pt`` never records an epoch as the
best one unless ``best.pt`` already holds it (a kill in between makes the resumed run redo that
epoch and write both again). A state holding NaN or inf is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stds.errors import NonFiniteLossError
from stds.run.files import checkpoint as ckpt
from stds.run.setup import distributed
from stds.run.setup.build import Run
from stds.run.setup.config import to_plain
from stds.run.files.rundir import non_finite_entries


@dataclass
class EpochSums:
    """Running sums of the epoch's training batches: loss·n and correct on the device (no sync per
    step), the sample count on the host."""

    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0
    samples: int = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, samples: int) -> None:
        self.loss = self.loss + loss.double() * samples
        self.correct = self.correct + correct.double()
        self.samples += samples

    def as_floats(self) -> dict[str, float]:
        """Plain numbers (reads the device: call at checkpoint or epoch end only)."""
        return {"loss": float(self.loss), "correct": float(self.correct), "samples": self.samples}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch checkpoint)
    best_acc1: float = -1.0
    best_epoch: int = 0
    best_sparsity: float = 0.0  # of the best epoch (best.pt), for `stds.run.measure.metrics.replaces_best`
    sums: EpochSums = field(default_factory=EpochSums)
    last_record: dict[str, Any] | None = None  # the last finished epoch's metrics.jsonl line
    # an epoch trained and checkpointed but not yet evaluated: its train stats, train_s, trained
    pending_eval: dict[str, float] | None = None

    def where(self, epochs: int) -> str:
        """``epoch E/N, step S`` with E the epoch in progress (the one numbering of the logs)."""
        return f"epoch {min(self.epoch + 1, epochs)}/{epochs}, step {self.step}"


def state_dict(run: Run, progress: Progress, sums: dict[str, float] | None = None) -> dict[str, Any]:
    """Everything `resume` needs, as plain tensors and numbers (``weights_only`` loadable);
    ``sums``: the epoch's running sums to save (this process's own by default)."""
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": run.core.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "schedule": run.threshold.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
        "batch_in_epoch": progress.batch_in_epoch,
        "best_acc1": progress.best_acc1,
        "best_epoch": progress.best_epoch,
        "best_sparsity": progress.best_sparsity,
        "epoch_sums": sums if sums is not None else progress.sums.as_floats(),
        "last_record": progress.last_record,
        "pending_eval": progress.pending_eval,
        "rng": ckpt.rng_state(),
        "config": to_plain(run.cfg),
    }


def sums_over_ranks(run: Run, sums: EpochSums) -> dict[str, float]:
    """The epoch's running sums of every rank together: what a checkpoint holds, so that a resumed
    run's rank 0 starts from them and the other ranks from zero (`stds.run.life.resume`), and the
    epoch's train_loss and train_acc1 are those of a run that was not interrupted."""
    mine = sums.as_floats()
    if not run.env.distributed:
        return mine
    values = torch.tensor([mine["loss"], mine["correct"], float(mine["samples"])], dtype=torch.float64)
    loss, correct, samples = distributed.all_reduce_sum(values.to(run.env.device), run.env).tolist()
    return {"loss": loss, "correct": correct, "samples": int(samples)}


def _non_finite(state: dict[str, Any]) -> list[str]:
    return non_finite_entries({"model": state["model"], "optimizer": state["optimizer"]["state"]})


def save(run: Run, progress: Progress, best: bool = False) -> None:
    """Write ``best.pt`` (if ``best``) then ``last.pt`` atomically, on rank 0 only.

    A model or optimizer state holding NaN or inf is refused (`NonFiniteLossError`) and the
    checkpoints on disk stay as they were.
    """
    sums = sums_over_ranks(run, progress.sums)  # a collective: every rank calls save
    if not run.env.is_main:
        return
    state = state_dict(run, progress, sums)
    bad = _non_finite(state)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(
            f"the model or optimizer state became NaN or inf by epoch {progress.epoch + 1}, step "
            f"{progress.step} ({shown}); the last good checkpoint is kept; lower lr or set amp=false"
        )
    if best:
        ckpt.save_atomic(state, run.ckpt_dir / ckpt.BEST)
    ckpt.save_atomic(state, run.ckpt_dir / ckpt.LAST)
