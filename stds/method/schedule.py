"""Threshold schedules: the flat width d after a number of optimizer steps.

d(step) = D · f(x) with x = min(step / (ramp_until · total_steps), 1) and f a schedule from `SCHEDULES`:

- ``constant``: f(x) = 1;
- ``linear``: f(x) = x;
- ``sine``: f(x) = (1 + sin(π(x − 1/2))) / 2;
- ``cubic``: f(x) = 1 − (1 − x)³ (fast start, flat end: the gradual pruning curve of Zhu and Gupta).

``ramp_until`` (``scheduler.ramp_until``, a fraction in (0, 1], default 1) is the share of training
after which d holds its final value: 1 ramps over the whole run, 0.75 reaches D at three quarters
of it and holds D for the last quarter. x is capped at 1, so d never exceeds D, however long
training runs past ``total_steps``.
A run's `ThresholdSchedule` owns d: the training loop calls its `step` after every optimizer step. New kinds are
added with `register_schedule`; no dispatch code changes.

``scheduler.kind=target`` (`stds.method.target`) asks for a sparsity instead of D.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from stds.method.sparse import reparams
from stds.registry import Registry

__all__ = [
    "SCHEDULES",
    "SCHEDULE_KINDS",
    "ScheduleArgs",
    "TARGET_KIND",
    "ThresholdSchedule",
    "build_schedule",
    "check_ramp_until",
    "ramp_progress",
    "register_schedule",
    "unregister_schedule",
    "threshold_at",
]


TARGET_KIND = "target"
"""``scheduler.kind`` of `TargetSparsitySchedule` (not a ramp: it is not in `SCHEDULES`)."""

ScheduleFn = Callable[[float], float]

SCHEDULES: Registry[ScheduleFn] = Registry("schedule")
"""Ramp name -> f(x), the fraction of the final value at progress x in [0, 1] (``scheduler.ramp``)."""


@dataclass(frozen=True)
class ScheduleArgs:
    """What a schedule kind is built from: plain values, read from the config by `stds.run.setup`."""

    final: float  # D (flat_width)
    total_steps: int
    ramp_until: float = 1.0
    target: float | None = None  # S (target_sparsity), for kinds that ask for a sparsity
    ramp: str | None = None  # the SCHEDULES key a target kind ramps its wanted sparsity along
    every: int | None = None  # steps between recomputes (None: `default_every`)
    keep_weights: bool = True  # target's hold: a move of d keeps the unpruned weights
    scope: str | None = None  # sparse.scope of a reparameterization that prunes by magnitude (gmp)


ScheduleKind = Callable[[ScheduleArgs], "ThresholdSchedule"]

SCHEDULE_KINDS: Registry[ScheduleKind] = Registry("scheduler.kind")
"""``scheduler.kind`` -> how to build its `ThresholdSchedule`: every ramp of `SCHEDULES` (d = D·f(x))
and ``target`` (`TargetSparsitySchedule`). The config's choices derive from it."""


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator: ``f(x) -> fraction`` becomes the ramp ``name`` (``scheduler.ramp``) and the kind
    ``scheduler.kind=name`` (d = D·f(x)). Taken names raise. One call: nothing else to change."""

    def add(fn: ScheduleFn) -> ScheduleFn:
        if name in SCHEDULE_KINDS:
            raise ValueError(f"schedule {name!r} is already registered")
        SCHEDULES.add(name, fn)
        SCHEDULE_KINDS.add(name, lambda a: ThresholdSchedule(a.final, a.total_steps, name, a.ramp_until))
        return fn

    return add


def unregister_schedule(name: str) -> None:
    """Take a ramp registered by `register_schedule` out again (tests of a toy schedule)."""
    SCHEDULES.remove(name)
    SCHEDULE_KINDS.remove(name)


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


@register_schedule("cubic")
def cubic(x: float) -> float:
    """f(x) = 1 − (1 − x)³: steepest at x = 0 (slope 3), flat at x = 1 (slope 0)."""
    return 1.0 - (1.0 - x) ** 3


def check_ramp_until(ramp_until: float) -> float:
    """``ramp_until`` if it is a fraction in (0, 1]; otherwise a ValueError (NaN included)."""
    if not 0.0 < ramp_until <= 1.0:  # False for NaN
        raise ValueError(f"ramp_until must lie in (0, 1], got {ramp_until}")
    return ramp_until


def ramp_progress(step: int, total_steps: int, ramp_until: float = 1.0) -> float:
    """x = min(step / (ramp_until · total_steps), 1): how far the ramp is after ``step`` steps.

    For ramp_until = 1 the divisor is float(total_steps), exact for any step count below 2⁵³, so x
    is bit for bit step / total_steps, the rule before ``ramp_until`` existed.
    """
    return min(step / (ramp_until * total_steps), 1.0)


def threshold_at(step: int, total_steps: int, final: float, kind: str, ramp_until: float = 1.0) -> float:
    """The threshold d after ``step`` optimizer steps out of ``total_steps``, reaching ``final``
    at ``ramp_until · total_steps`` and holding it from there on.

    The schedule's fraction is clipped to [0, 1], so d stays within [0, final]. Unknown ``kind``,
    ``total_steps <= 0``, a negative ``step``, a negative ``final`` or ``ramp_until`` outside
    (0, 1] are ValueErrors.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; valid: {', '.join(sorted(SCHEDULES))}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not math.isfinite(final) or final < 0:
        raise ValueError(f"final threshold (flat_width) must be a finite number >= 0, got {final}")
    x = ramp_progress(step, total_steps, check_ramp_until(ramp_until))
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

    def __init__(self, final: float, total_steps: int, kind: str, ramp_until: float = 1.0) -> None:
        threshold_at(0, total_steps, final, kind, ramp_until)  # validates the arguments
        self.final = final
        self.total_steps = total_steps
        self.kind = kind
        self.ramp_until = ramp_until
        self.d = self.at(0)
        self._reparams: list = []

    def at(self, step: int) -> float:
        """d after ``step`` optimizer steps, by the schedule alone."""
        return threshold_at(step, self.total_steps, self.final, self.kind, self.ramp_until)

    def holding(self, step: int) -> bool:
        """Whether ``step`` lies past the ramp's end, ramp_until · total_steps (never for 1 within the run)."""
        return step > self.ramp_until * self.total_steps

    def attach(self, model: nn.Module) -> ThresholdSchedule:
        """Remember the reparameterizations of ``model`` and set them to the current d."""
        self._reparams = reparams(model)
        self._apply(self.d)
        return self

    def _apply(self, d: float) -> None:
        self.d = d
        for reparam in self._reparams:
            reparam.set_threshold(d)

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


def build_schedule(kind: str, args: ScheduleArgs) -> ThresholdSchedule:
    """The `ThresholdSchedule` of ``scheduler.kind`` ``kind`` (a key of `SCHEDULE_KINDS`)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown scheduler.kind {kind!r}; registered: {SCHEDULE_KINDS.choices()}")
    return SCHEDULE_KINDS[kind](args)
