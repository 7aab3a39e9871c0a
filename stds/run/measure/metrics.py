"""Losses, accuracies and the run's metric files (TensorBoard, ``metrics.jsonl``, ``metrics.json``).

Only rank 0 creates a `MetricsWriter`; the other ranks compute and reduce, but write nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from stds.errors import RunDirError
from stds.method.sparse import pruned_parameters
from stds.run.files.atomic import write_atomic
from stds.run.files.safe import open_append, read_text


def loss_fn(kind: str, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``ce``: cross-entropy of the scores; ``mse``: mean squared error against one-hot labels."""
    scores = scores.float()
    if kind == "mse":
        target = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
        return F.mse_loss(scores, target)
    return F.cross_entropy(scores, labels)


def correct_topk(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many samples have their label among the ``k`` highest scores (k capped at the classes)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels.unsqueeze(1)).any(dim=1).sum()


BEST_CONNECTIVITY_TOLERANCE = 0.05
"""An epoch counts as at the run's final sparsity when its connectivity (1 - sparsity) is at most
5% (relative) above the final epoch's: final sparsity 0.90 takes epochs from 0.895 up."""

BEST_RULE = ("the most accurate epoch whose connectivity (1 - sparsity) is within 5% of the last "
             "epoch's (a dense run: the most accurate epoch)")
"""What ``best.pt``, ``best_test_acc1`` and ``best_epoch`` mean (``metrics.json``'s ``best_rule``)."""


def at_final_sparsity(sparsity: float, final_sparsity: float) -> bool:
    """Whether an epoch at ``sparsity`` counts as reaching ``final_sparsity`` (its connectivity
    at most `BEST_CONNECTIVITY_TOLERANCE` above the final one, relative)."""
    return 1.0 - sparsity <= (1.0 - final_sparsity) * (1.0 + BEST_CONNECTIVITY_TOLERANCE) + 1e-12


def replaces_best(acc1: float, sparsity: float, best_acc1: float, best_sparsity: float) -> bool:
    """Whether a finished epoch (top-1 ``acc1`` at ``sparsity``) becomes ``best.pt``.

    It does when there is no best yet (``best_acc1`` < 0), when the best epoch is no longer at
    this epoch's sparsity (`at_final_sparsity`: the run has pruned on since, so an early, denser
    epoch is not the network the run ends with), or when it is more accurate. After the last
    epoch the best is therefore always at the run's final sparsity; an epoch once replaced for
    being too dense is not taken back should sparsity later fall (its weights are gone).
    """
    if best_acc1 < 0 or not at_final_sparsity(best_sparsity, sparsity):
        return True
    return acc1 > best_acc1


def best_of(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record ``best.pt`` holds after the epochs of ``history`` (``metrics.jsonl`` lines, in
    order), by `replaces_best`; None without a scored epoch."""
    best: dict[str, Any] | None = None
    for record in history:
        acc1, sparsity = record.get("test_acc1"), record.get("sparsity")
        if acc1 is None or sparsity is None:
            continue
        if best is None or replaces_best(acc1, sparsity, best["test_acc1"], best["sparsity"]):
            best = record
    return best


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class IntervalMeter:
    """Throughput over a log interval, from host clocks only (no device read).

    The loop calls `waited` with the seconds it blocked on the next batch, `stepped` after each
    optimizer step, and `report` at the log interval (after something that waits for the device,
    such as reading the loss, so the interval's wall time includes its GPU work).
    """

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.restart()

    def restart(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.wait_s = 0.0

    def waited(self, seconds: float) -> None:
        self.wait_s += seconds

    def stepped(self) -> None:
        self.steps += 1

    def report(self, steps_left_epoch: int, steps_left_run: int, eval_s: float, epochs_left: int) -> dict[str, float]:
        """``images_per_s``, ``ms_per_step``, ``data_wait_share``, ``eta_epoch_s``, ``eta_run_s``.

        ETAs: steps left times this interval's time per step; the run's also adds one evaluation
        (as long as the last one, ``eval_s``) per epoch left. Restarts the interval.
        """
        wall = max(time.perf_counter() - self.started, 1e-9)
        per_step = wall / max(self.steps, 1)
        values = {
            "images_per_s": self.steps * self.images_per_step / wall,
            "ms_per_step": 1000.0 * per_step,
            "data_wait_share": min(self.wait_s / wall, 1.0),
            "eta_epoch_s": steps_left_epoch * per_step,
            "eta_run_s": steps_left_run * per_step + epochs_left * eval_s,
        }
        self.restart()
        return values


def format_duration(seconds: float) -> str:
    """``1:02:03`` for 3723 s (hours grow past 24: a 2,048-epoch run can take weeks)."""
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def interval_line(values: dict[str, float]) -> str:
    """The throughput part of a log line and of the progress bar."""
    return (f"{values['images_per_s']:.0f} img/s {values['ms_per_step']:.1f} ms/step "
            f"data {100 * values['data_wait_share']:.0f}% | ETA epoch "
            f"{format_duration(values['eta_epoch_s'])} run {format_duration(values['eta_run_s'])}")


_thread_hook = threading.excepthook  # the hook `_quiet_event_writer` hands everything else to


def _install_quiet_hook() -> None:
    global _thread_hook
    if threading.excepthook is not _quiet_event_writer:
        _thread_hook, threading.excepthook = threading.excepthook, _quiet_event_writer


def _quiet_event_writer(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` that leaves out the OSError of TensorBoard's writer thread: the
    thread re-raises its failed write (Python prints ~100 lines of traceback), and the training
    thread meets the same error at its next write, where `MetricsWriter` makes it one line."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _thread_hook(args)


class MetricsWriter:
    """Writes one run's TensorBoard events and JSON metric files (names from ``docs/metrics.md``).

    A write that fails (the run directory became read-only, the disk is full) is a `RunDirError`:
    one line naming the directory and the fix; the checkpoint on disk is kept, so the run resumes.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        _install_quiet_hook()
        with self._writes(run_dir / "tb"):
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    @contextlib.contextmanager
    def _writes(self, where: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise RunDirError(
                f"cannot write {where} ({exc.strerror or exc}); make {self.run_dir} writable (chmod u+w, "
                f"free disk space), then resume: python launch/train.py resume={self.run_dir}"
            ) from None

    def _lines(self) -> list[str]:
        """The lines of ``metrics.jsonl`` (none if missing), read by `stds.run.files.safe.read_text`."""
        try:
            return read_text(self.jsonl, self.run_dir).splitlines()
        except FileNotFoundError:
            return []

    def truncate_after(self, step: int) -> None:
        """Drop the ``metrics.jsonl`` lines of epochs after ``step`` (a resumed run writes them again)."""
        if not self.jsonl.exists():
            return
        kept = []
        for line in self._lines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        with self._writes(self.jsonl):
            write_atomic(self.jsonl, "".join(kept))

    def history(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` records written so far, in order (a line cut by a kill is skipped)."""
        records = []
        for line in self._lines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def restore(self, record: dict[str, Any] | None) -> None:
        """Write ``record`` (the checkpoint's last record) if ``metrics.jsonl`` lacks its epoch: a
        run killed between its checkpoint and that line gets the line back when it resumes."""
        if record is None:
            return
        for line in self._lines():
            try:
                if json.loads(line).get("epoch") == record.get("epoch"):
                    return
            except (json.JSONDecodeError, AttributeError):  # a line cut by a kill
                continue
        self.epoch(record)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars under their own names (the log interval's ``step_loss``, ``lr``, ``d``, throughput)."""
        with self._writes(self.run_dir / "tb"):
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """One finished epoch: TensorBoard scalars at its last step and a ``metrics.jsonl`` line."""
        step = record["step"]
        with self._writes(self.run_dir / "tb"):
            for name, value in record.items():
                if isinstance(value, dict):
                    for layer, layer_value in value.items():
                        self.tb.add_scalar(f"{name}/{layer}", layer_value, step)
                elif isinstance(value, (int, float)) and value is not None and name != "step":
                    self.tb.add_scalar(name, value, step)
        with self._writes(self.jsonl), open_append(self.jsonl) as handle:  # never through a symlink
            handle.write(json.dumps(record) + "\n")
        with self._writes(self.run_dir / "tb"):
            self.tb.flush()

    def histograms(self, model: nn.Module, step: int) -> None:
        """Histograms of θ (``theta/<layer>``) and w (``w/<layer>``) of every pruned layer."""
        for name, theta in pruned_parameters(model).items():
            module = model.get_submodule(name)
            with self._writes(self.run_dir / "tb"), torch.no_grad():
                self.tb.add_histogram(f"theta/{name}", theta.detach().float().cpu(), step)
                self.tb.add_histogram(f"w/{name}", module.weight.detach().float().cpu(), step)

    def final(self, summary: dict[str, Any]) -> None:
        """``metrics.json``: the final and best figures."""
        clean = {k: (_finite(v) if isinstance(v, float) else v) for k, v in summary.items()}
        with self._writes(self.run_dir / "metrics.json"):
            write_atomic(self.run_dir / "metrics.json", json.dumps(clean, indent=2) + "\n")

    def close(self) -> None:
        with self._writes(self.run_dir / "tb"):
            self.tb.close()
