"""Threshold schedules: the flat width d after a number of optimizer steps.

d(step) = D · f(x) with x = min(step / total_steps, 1) and f a schedule from `SCHEDULES`:

- ``constant``: f(x) = 1;
- ``linear``: f(x) = x;
- ``sine``: f(x) = (1 + sin(π(x − 1/2))) / 2.

x is capped at 1, so d never exceeds D, however long training runs past ``total_steps``.
A run's `ThresholdSchedule` owns d: the training loop calls its `step` after every optimizer step. New kinds are
added with `register_schedule`; no dispatch code changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from stds.sparse import reparams

__all__ = [
    "SCHEDULES",
    "ThresholdSchedule",
    "build_threshold_schedule",
    "flat_width_at",
    "register_schedule",
]

ScheduleFn = Callable[[float], float]

SCHEDULES: dict[str, ScheduleFn] = {}
"""Schedule name -> f(x), the fraction of the final threshold at progress x in [0, 1]."""


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator adding ``f(x) -> fraction`` to `SCHEDULES` under ``name`` (taken names raise)."""

    def add(fn: ScheduleFn) -> ScheduleFn:
        if name in SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered")
        SCHEDULES[name] = fn
        return fn

    return add


@register_schedule("constant")
def constant(x: float) -> float:
    """f(x) = 1: the final threshold from the first step."""
    return 1.0


@register_schedule("linear")
def linear(x: float) -> float:
    """f(x) = x."""
    return x


@register_schedule("sine")
def sine(x: float) -> float:
    """f(x) = (1 + sin(π(x − 1/2))) / 2: slow start, fastest at x = 1/2, slow end."""
    return (1.0 + math.sin(math.pi * (x - 0.5))) / 2.0


def flat_width_at(step: int, total_steps: int, final: float, kind: str) -> float:
    """The threshold d after ``step`` optimizer steps out of ``total_steps``, reaching ``final``.

    The schedule's fraction is clipped to [0, 1], so d stays within [0, final]. Unknown ``kind``,
    ``total_steps <= 0``, a negative ``step`` or a negative ``final`` are ValueErrors.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; valid: {', '.join(sorted(SCHEDULES))}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not math.isfinite(final) or final < 0:
        raise ValueError(f"final threshold (flat_width) must be a finite number >= 0, got {final}")
    x = min(step / total_steps, 1.0)
    fraction = min(max(SCHEDULES[kind](x), 0.0), 1.0)
    return final * fraction


class ThresholdSchedule:
    """The one owner of a run's threshold d: the loop, the logs, the benchmark and the checkpoint ask it.

    Built from the config without the model (`at` gives d at any step, e.g. d at step 0 for
    registering the reparameterizations), then attached to the sparsified model once; `step`
    sets d after every optimizer step on the reparameterizations found at attach time (no module
    walk per step, no write when d is unchanged). `d` is the value set last. Subclasses that
    depend on the weights (e.g. a target sparsity) override `step` and keep their state in
    `state_dict`.
    """

    def __init__(self, final: float, total_steps: int, kind: str) -> None:
        flat_width_at(0, total_steps, final, kind)  # validates the arguments
        self.final = final
        self.total_steps = total_steps
        self.kind = kind
        self.d = self.at(0)
        self._reparams: list = []

    def at(self, step: int) -> float:
        """d after ``step`` optimizer steps, by the schedule alone."""
        return flat_width_at(step, self.total_steps, self.final, self.kind)

    def attach(self, model: nn.Module) -> ThresholdSchedule:
        """Remember the reparameterizations of ``model`` and set them to the current d."""
        self._reparams = reparams(model)
        self._apply(self.d)
        return self

    def _apply(self, d: float) -> None:
        self.d = d
        for reparam in self._reparams:
            reparam.set_flat_width(d)

    def step(self, step: int) -> float:
        """Set d for ``step`` optimizer steps done; returns d."""
        d = self.at(step)
        if d != self.d:
            self._apply(d)
        return d

    def metrics(self) -> dict[str, float]:
        """What the logs show of the threshold (names from ``docs/metrics.md``)."""
        return {"d": self.d}

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps of the schedule."""
        return {"d": self.d}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict` and set d on the attached model."""
        self._apply(float(state["d"]))


def build_threshold_schedule(cfg: Any, total_steps: int) -> ThresholdSchedule:
    """The run's threshold schedule from its config (``scheduler.kind``, ``flat_width``)."""
    return ThresholdSchedule(float(cfg.flat_width), total_steps, str(cfg.scheduler.kind))
