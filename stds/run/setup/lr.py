"""The learning rate over a sparsity schedule's hold: `HoldCosine`, the factor that
``conf/lr_scheduler/hold_cosine.yaml`` hands to torch's `LambdaLR`."""

from __future__ import annotations

import math

from stds.errors import ConfigError

__all__ = ["HoldCosine"]


class HoldCosine:
    """The factor of ``lr`` after ``epoch`` finished epochs: 1 until the hold starts, then a cosine
    from 1 down to ``floor`` over the hold.

    The hold starts at e₀ = ``start`` · ``epochs`` (``start`` is the sparsity schedule's
    ``scheduler.ramp_until``, so e₀ is where the wanted sparsity reaches S). For e > e₀ the factor
    is floor + (1 − floor) · (1 + cos(π · (e − e₀) / (epochs − e₀))) / 2; with ``start`` = 1 there
    is no hold and the factor stays 1. It is a plain callable object, not a function, so
    `LambdaLR.state_dict` stores its three numbers and a checkpoint loads with ``weights_only``.

    Hand-written as a factor for `LambdaLR` rather than `SequentialLR` of `ConstantLR` and
    `CosineAnnealingLR`: those children must be built on the optimizer before the sequence, which a
    ``_partial_`` config cannot say, and e₀ may fall inside an epoch (0.35 of 30 epochs is 10.5).
    """

    def __init__(self, epochs: int, start: float, floor: float = 0.0) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"lr_scheduler.lr_lambda.epochs={epochs} must be a whole number >= 1; set epochs=<n>")
        if not 0.0 < start <= 1.0:
            raise ConfigError(f"lr_scheduler.lr_lambda.start={start} must lie in (0, 1] (the share of the "
                              "epochs where the hold starts, scheduler.ramp_until by default)")
        if not 0.0 <= floor <= 1.0:
            raise ConfigError(f"lr_scheduler.lr_lambda.floor={floor} must lie in [0, 1] (the share of lr the "
                              "hold decays to); set lr_scheduler.lr_lambda.floor=<fraction>, e.g. 0.05")
        self.epochs, self.start, self.floor = epochs, float(start), float(floor)

    def __call__(self, epoch: int) -> float:
        hold_start = self.start * self.epochs
        if epoch <= hold_start or hold_start >= self.epochs:
            return 1.0
        progress = (epoch - hold_start) / (self.epochs - hold_start)
        return self.floor + (1.0 - self.floor) * (1.0 + math.cos(math.pi * progress)) / 2.0
