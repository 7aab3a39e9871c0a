"""Threshold schedules: the flat width d after a number of optimizer steps.

d(step) = D · f(x) with x = min(step / total_steps, 1) and f a schedule from `SCHEDULES`:

- ``constant``: f(x) = 1;
- ``linear``: f(x) = x;
- ``sine``: f(x) = (1 + sin(π(x − 1/2))) / 2.

x is capped at 1, so d never exceeds D, however long training runs past ``total_steps``.
The training loop sets d after every optimizer step (see `ThresholdSchedule`). New kinds are
added with `register_schedule`; no dispatch code changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from stds.sparse import set_flat_width

__all__ = ["SCHEDULES", "ThresholdSchedule", "flat_width_at", "register_schedule"]

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
    """Sets a sparsified model's threshold by `flat_width_at`; call `step` after each update."""

    def __init__(self, model: nn.Module, final: float, total_steps: int, kind: str) -> None:
        flat_width_at(0, total_steps, final, kind)  # validates the arguments
        self.model = model
        self.final = final
        self.total_steps = total_steps
        self.kind = kind

    def step(self, step: int) -> float:
        """Set d for ``step`` optimizer steps done on every reparameterization; returns d."""
        d = flat_width_at(step, self.total_steps, self.final, self.kind)
        set_flat_width(self.model, d)
        return d
