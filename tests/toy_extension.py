"""A toy extension of each kind, each one registration: a model, a reparameterization, a ramp
(a ``scheduler.kind``), a learning-rate schedule and a report column. `register()` adds them, `unregister()` takes them out
(tests in one process share the registries); ``tests/test_extend.py`` uses both, and a user's
own launcher script imports such a module before running ``launch/train.py``."""

from __future__ import annotations

import torch
from torch import nn

from stds.method.schedule import register_schedule, unregister_schedule
from stds.method.sparse import REPARAMS, SoftThreshold, register_reparam
from stds.models import MODELS, register_model
from stds.results.columns import COLUMNS, register_column
from stds.run.setup.optim_registry import LR_SCHEDULES, register_lr_schedule

MODEL, REPARAM, SCHEDULE, LR_SCHEDULE, COLUMN = "toy_net", "toy_soft", "toy_square", "toy_step", "toy_steps"


class ToyNet(nn.Module):
    """Two fully connected layers on the flattened image (no spiking neuron: the loop and the
    report need none)."""

    def __init__(self, T: int, in_channels: int, num_classes: int, image_size: int, hidden: int = 16) -> None:
        super().__init__()
        self.T = T
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ToySoft(SoftThreshold):
    """The soft threshold with the true gradient (``st``) under a name of its own."""

    method = REPARAM


def square(x: float) -> float:
    """f(x) = x²: d grows slowly, then fast."""
    return x * x


class StepDecay:
    """The factor of ``lr`` after ``epoch`` finished epochs: ``gamma`` ** (epoch // ``every``), for
    torch's `LambdaLR` (a callable object, so its state is plain numbers)."""

    def __init__(self, every: int, gamma: float) -> None:
        self.every, self.gamma = every, gamma

    def __call__(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.every)


def register() -> None:
    register_model(MODEL, ToyNet, config={"T": "${T}", "in_channels": "${dataset.in_channels}",
                                          "num_classes": "${dataset.num_classes}",
                                          "image_size": "${dataset.image_size}", "hidden": 16})
    register_reparam(ToySoft)
    register_schedule(SCHEDULE)(square)
    register_lr_schedule(LR_SCHEDULE, torch.optim.lr_scheduler.LambdaLR,
                         config={"lr_lambda": {"_target_": StepDecay, "every": 2, "gamma": 0.1}})
    register_column(COLUMN, metric="step")


def unregister() -> None:
    MODELS.remove(MODEL)
    REPARAMS.remove(REPARAM)
    unregister_schedule(SCHEDULE)
    LR_SCHEDULES.remove(LR_SCHEDULE)
    COLUMNS.remove(COLUMN)
