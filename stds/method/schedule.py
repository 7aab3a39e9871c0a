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

``scheduler.kind=target`` (`TargetSparsitySchedule`) inverts the rule: the wanted sparsity follows
S · f(x) with f one of the schedules above (``scheduler.ramp``), and d is the quantile of |θ| over
all pruned layers that gives it; after ``ramp_until`` the wanted sparsity is S and d keeps following
the quantile, so the run ends at S. By default a move of d in that hold leaves every weight that
stays unpruned as it was (``scheduler.hold_keeps_weights``; see ``docs/target_sparsity.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stds.method.sparse import pruned_parameters, reparams
from stds.registry import Registry

__all__ = [
    "SCHEDULES",
    "SCHEDULE_KINDS",
    "ScheduleArgs",
    "TARGET_KIND",
    "TargetSparsitySchedule",
    "ThresholdSchedule",
    "build_schedule",
    "check_ramp_until",
    "default_every",
    "keep_unpruned",
    "kth_smallest_abs",
    "ramp_progress",
    "register_schedule",
    "unregister_schedule",
    "threshold_at",
    "wanted_count",
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


def wanted_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a sparsity asks to be zero: the nearest count, halves up.

    |count / numel − sparsity| <= 1 / (2 numel), the rounding floor of the reached sparsity.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return min(numel, math.floor(sparsity * numel + 0.5))


@torch.no_grad()
def kth_smallest_abs(thetas: Sequence[Tensor], k: int, scratch: Tensor | None = None) -> float:
    """The k-th smallest |θ| over all of ``thetas`` (k from 1), or 0.0 for k = 0.

    This is the smallest d with #{|θ| <= d} >= k. The values go into one buffer in one pass
    (``scratch`` when given: as many elements, θ's dtype and device; it is overwritten). On a
    CPU numpy's in-place introselect finds the value; on other devices ``Tensor.kthvalue``, whose
    value is read back once (the one host synchronisation). Both return the exact order
    statistic, so the answer does not depend on the device or on the order of ties.
    """
    numel = sum(theta.numel() for theta in thetas)
    if not 0 <= k <= numel:
        raise ValueError(f"k must lie in [0, {numel}] (the number of values), got {k}")
    if k == 0:
        return 0.0
    values = scratch if scratch is not None else thetas[0].new_empty(numel)
    if values.shape != (numel,) or values.dtype != thetas[0].dtype or values.device != thetas[0].device:
        raise ValueError(f"scratch must be a 1-d {thetas[0].dtype} tensor of {numel} elements on {thetas[0].device}")
    offset = 0
    for theta in thetas:
        torch.abs(theta.detach().reshape(-1), out=values[offset : offset + theta.numel()])
        offset += theta.numel()
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.numpy()
        array.partition(k - 1)  # introselect: O(n) (benchmarks/quantile_cost.py compares it with kthvalue)
        return float(array[k - 1])
    return float(values.kthvalue(k).values)


@torch.no_grad()
def keep_unpruned(thetas: Sequence[Tensor], old: float, new: float) -> None:
    """Move every θ unpruned under both thresholds ``old`` and ``new`` by sign(θ)·(new − old), in place.

    Its w = sign(θ)·(|θ| − d) is then the same under d = ``new`` as it was under ``old``. θ at or
    below the larger threshold is left alone: those are the weights the move of d prunes (d rises)
    or revives (d falls, with w = |θ| − new), so the count of zeros under ``new`` is as without the
    move. Used by `TargetSparsitySchedule` in its hold.
    """
    delta, above = new - old, max(new, old)
    for theta in thetas:
        theta.add_(torch.where(theta.abs() > above, theta.sign() * delta, 0.0))


class TargetSparsitySchedule(ThresholdSchedule):
    """d chosen from θ so that the pruned layers reach a wanted sparsity (``scheduler=target``).

    The wanted sparsity after ``step`` steps is S · f(x) (`wanted`, f = ``SCHEDULES[ramp]``,
    x = min(step / (ramp_until · total_steps), 1)). Every ``every`` steps, and at ``total_steps``,
    the k-th smallest |θ| over all pruned layers is computed, k = `wanted_count` (w = 0 exactly
    when |θ| <= d, so #{w = 0} = k unless ties at that value, zeros included, force more). While
    the ramp rises d never decreases: d = max(d, that value). Past the ramp's end (the hold, after
    ramp_until · total_steps) d is that value, up or down, so the sparsity stays at S when weights
    regrow under ``stmod`` and when they drift inwards (docs/target_sparsity.md). With
    ``keep_weights`` (the default) a move of d in the hold from d₀ to d₁ also moves every θ with
    |θ| > max(d₀, d₁) by sign(θ)·(d₁ − d₀) (`keep_unpruned`), so w = sign(θ)·(|θ| − d) of every
    weight unpruned before and after is unchanged: the hold only swaps the weights at the
    threshold, instead of shrinking (or growing) every unpruned weight by d₁ − d₀ at each
    recompute. Between recomputes d is held. On one process or under DDP the result depends only
    on θ (the moves included), which every rank holds identically: no communication. With θ on a CPU the schedule keeps one |θ| buffer
    for the recomputes (4 bytes per pruned float32 weight): a fresh one of tens of MB would cost as
    much in page faults as the selection itself.
    """

    def __init__(self, target: float, total_steps: int, ramp: str = "sine", every: int = 1,
                 ramp_until: float = 1.0, keep_weights: bool = True) -> None:
        threshold_at(0, total_steps, 1.0, ramp, ramp_until)  # validates total_steps, ramp, ramp_until
        if not 0.0 < target < 1.0:
            raise ValueError(f"target sparsity must lie in (0, 1), got {target}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.target, self.ramp, self.every, self.keep_weights = target, ramp, every, keep_weights
        self.asked = 0.0  # the sparsity the current d was computed for
        self._thetas: list[Tensor] = []
        self._numel = 0
        self._scratch: Tensor | None = None
        super().__init__(final=0.0, total_steps=total_steps, kind=ramp, ramp_until=ramp_until)
        self.kind = TARGET_KIND

    def wanted(self, step: int) -> float:
        """The sparsity asked for after ``step`` steps: S · f(min(step / (ramp_until · total_steps), 1))."""
        return threshold_at(step, self.total_steps, self.target, self.ramp, self.ramp_until)

    def at(self, step: int) -> float:
        """d before any θ is seen: 0 at step 0 (θ = w0 at registration); later the d set last."""
        return 0.0 if step == 0 else self.d

    def attach(self, model: nn.Module) -> TargetSparsitySchedule:
        """Remember the reparameterizations and the θ of every pruned layer (one device)."""
        self._thetas = list(pruned_parameters(model).values())
        if not self._thetas:
            raise ValueError("scheduler=target needs pruned layers; the model has none")
        self._numel = sum(theta.numel() for theta in self._thetas)
        self._scratch = None
        if self._thetas[0].device.type == "cpu":  # a fresh buffer costs page faults on every recompute
            self._scratch = self._thetas[0].new_empty(self._numel)
        super().attach(model)
        return self

    def step(self, step: int) -> float:
        """At a recompute step, d = the |θ| quantile for `wanted`: never below d while the ramp
        rises, up or down in the hold; otherwise d is held."""
        if step % self.every and step != self.total_steps:
            return self.d
        if not self._thetas:
            raise RuntimeError("attach the model before calling step (TargetSparsitySchedule)")
        self.asked = self.wanted(step)
        candidate = kth_smallest_abs(self._thetas, wanted_count(self.asked, self._numel), self._scratch)
        # both tests are False for a NaN candidate: d is held and the loop reports the bad loss
        holding = self.holding(step)
        if candidate > self.d or (holding and candidate < self.d):
            if holding and self.keep_weights:
                keep_unpruned(self._thetas, self.d, candidate)
            self._apply(candidate)
        return self.d

    def metrics(self) -> dict[str, float]:
        """d and the sparsity it was computed for (``target_sparsity`` in ``docs/metrics.md``)."""
        return {"d": self.d, "target_sparsity": self.asked}

    def state_dict(self) -> dict[str, float]:
        """d and the sparsity it was computed for: with θ, all a resumed run needs."""
        return {"d": self.d, "target_sparsity": self.asked}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict` and set d on the attached model."""
        self.asked = float(state["target_sparsity"])
        super().load_state_dict(state)


RECOMPUTES_PER_RUN = 1000
"""Default number of recomputes of d in a ``scheduler=target`` run (see `default_every`)."""


def default_every(total_steps: int) -> int:
    """Steps between recomputes when ``target_every_steps`` is null: total_steps // 1000, >= 1.

    A fixed share of the run keeps each jump of d the same share of its growth on every run
    length and caps the recompute's cost at 1000 quantiles per run (why: docs/target_sparsity.md).
    """
    return max(1, total_steps // RECOMPUTES_PER_RUN)


def _target_kind(args: ScheduleArgs) -> TargetSparsitySchedule:
    """``scheduler.kind=target``: d follows the quantile that gives ``target_sparsity``."""
    if args.target is None or args.ramp is None:
        raise ValueError("scheduler.kind=target needs target_sparsity and scheduler.ramp")
    every = default_every(args.total_steps) if args.every is None else int(args.every)
    return TargetSparsitySchedule(args.target, args.total_steps, args.ramp, every, args.ramp_until,
                                  keep_weights=args.keep_weights)


SCHEDULE_KINDS.add(TARGET_KIND, _target_kind)


def build_schedule(kind: str, args: ScheduleArgs) -> ThresholdSchedule:
    """The `ThresholdSchedule` of ``scheduler.kind`` ``kind`` (a key of `SCHEDULE_KINDS`)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown scheduler.kind {kind!r}; registered: {SCHEDULE_KINDS.choices()}")
    return SCHEDULE_KINDS[kind](args)
