"""Every paper preset builds and trains one step on the CPU, shrunk (fewer images, channels, time
steps) but otherwise as composed: its model, reparameterization, optimizer, schedules and amp."""

from __future__ import annotations

import pytest
import torch

from stds.method.sparse import pruned_parameters, sparsity
from stds.run.setup.build import build_run, prepare_config
from stds.run.setup.distributed import DistEnv
from stds.run.life.loop import train_step
from tests.conftest import CONF, compose_train

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SHRINK = ("dataset=fake", "dataset.train_size=4", "dataset.test_size=2", "batch_size=2", "T=1",
          "loader.num_workers=0", "loader.pin_memory=false", "loader.persistent_workers=false",
          "logging.synops=false")
MODEL_SHRINK = {"cifar10": ("model.channels=8", "model.hidden=16"), "imagenet": ("model.width=8",)}
GIVEN = {"cifar10_gradr": ("flat_width=0.05", "alpha_gr=0.01"), "imagenet_gradr": ("flat_width=0.05", "alpha_gr=0.01"),
         "imagenet_stds": ("flat_width=0.6",)}
"""What each preset asks for on the command line (``???``/null in the preset)."""


def _shrunk(preset: str):
    setting = preset.split("_")[0]
    classes = "dataset.num_classes=1000" if setting == "imagenet" else "dataset.num_classes=10"
    return compose_train(f"experiment={preset}", *SHRINK, classes, *MODEL_SHRINK[setting], *GIVEN.get(preset, ()))


def test_every_preset_is_listed():
    assert PRESETS == ["cifar10_dense", "cifar10_gradr", "cifar10_stds",
                       "imagenet_dense", "imagenet_gradr", "imagenet_stds"]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_builds_and_takes_one_step(preset, tmp_path):
    cfg = prepare_config(_shrunk(preset))
    assert cfg.amp == "fp16"  # as the original's --amp (bf16 on this CPU)
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu")), tmp_path)
    thetas = pruned_parameters(run.core)
    if preset.endswith("dense"):
        assert cfg.sparse.method == "identity"
    assert thetas, "every preset registers reparameterizations (identity for dense)"
    before = {name: theta.detach().clone() for name, theta in thetas.items()}
    images, labels = next(iter(run.train_loader))
    images, labels = run.to_device(images, labels)
    loss, _ = train_step(run, images, labels)
    assert torch.isfinite(loss)
    moved = [name for name, theta in thetas.items() if not torch.equal(theta.detach(), before[name])]
    assert moved, "one optimizer step changes the pruned parameters"
    run.threshold.step(1)
    expected_d = 0.05 if preset.endswith("gradr") else (0.0 if preset.endswith("dense") else None)
    if expected_d is not None:
        assert run.threshold.d == pytest.approx(expected_d)
    else:  # sine from 0 to D = 1.0 over the shrunk run's steps
        assert 0.0 < run.threshold.d <= float(cfg.flat_width)
    assert 0.0 <= sparsity(run.core)["total"] <= 1.0
