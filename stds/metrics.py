"""Losses, accuracies and the run's metric files (TensorBoard, ``metrics.jsonl``, ``metrics.json``).

Only rank 0 creates a `MetricsWriter`; the other ranks compute and reduce, but write nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from stds.sparse import pruned_parameters


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


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an absent file has none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Writes one run's TensorBoard events and JSON metric files."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def rewrite_history(self, history: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``history`` (the records a checkpoint holds)."""
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
        tmp.replace(self.jsonl)

    def train_step(self, step: int, loss: float, lr: float, flat_width: float) -> None:
        """Per-step scalars."""
        self.tb.add_scalar("train/loss_step", loss, step)
        self.tb.add_scalar("train/lr", lr, step)
        self.tb.add_scalar("sparse/flat_width", flat_width, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """One finished epoch: TensorBoard scalars at its last step and a ``metrics.jsonl`` line."""
        step = record["step"]
        for key in ("train_loss", "train_acc1", "test_loss", "test_acc1", "test_acc5"):
            split, name = key.split("_", 1)
            self.tb.add_scalar(f"{split}/{name}", record[key], step)
        self.tb.add_scalar("train/epoch", record["epoch"], step)
        self.tb.add_scalar("sparse/flat_width_epoch", record["flat_width"], step)
        self.tb.add_scalar("sparse/sparsity", record["sparsity"], step)
        for name, value in record["sparsity_layers"].items():
            self.tb.add_scalar(f"sparsity_layers/{name}", value, step)
        for name, value in record.get("firing_rates", {}).items():
            self.tb.add_scalar(f"firing_rates/{name}", value, step)
        if record.get("synops") is not None:
            self.tb.add_scalar("synops/per_sample", record["synops"], step)
            self.tb.add_scalar("synops/first_layer_macs", record["first_layer_macs"], step)
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.tb.flush()

    def histograms(self, model: nn.Module, step: int) -> None:
        """Histograms of w and θ of every pruned layer."""
        for name, theta in pruned_parameters(model).items():
            module = model.get_submodule(name)
            self.tb.add_histogram(f"theta/{name}", theta.detach().float().cpu(), step)
            with torch.no_grad():
                self.tb.add_histogram(f"weight/{name}", module.weight.detach().float().cpu(), step)

    def final(self, summary: dict[str, Any]) -> None:
        """``metrics.json``: the final and best figures."""
        clean = {k: (_finite(v) if isinstance(v, float) else v) for k, v in summary.items()}
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
        tmp.replace(self.run_dir / "metrics.json")

    def close(self) -> None:
        self.tb.close()
