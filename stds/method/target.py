"""Target sparsity: ``scheduler.kind=target`` and what it shares with the GMP baseline.

``scheduler.kind=target`` (`TargetSparsitySchedule`) inverts the rule: the wanted sparsity follows
S · f(x) with f one of the schedules above (``scheduler.ramp``), and d is the quantile of |θ| over
all pruned layers that gives it; after ``ramp_until`` the wanted sparsity is S and d keeps following
the quantile, so the run ends at S. By default a move of d in that hold leaves every weight that
stays unpruned as it was (``scheduler.hold_keeps_weights``; see ``docs/target_sparsity.md``).
`SparsityRamp` is the ramp to a sparsity that both `TargetSparsitySchedule` and
`stds.method.gmp.MagnitudePruningSchedule` follow; `wanted_count`, `kth_smallest_abs` and
`keep_unpruned` are its counts, quantile and hold rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stds.method.schedule import SCHEDULE_KINDS, TARGET_KIND, ScheduleArgs, ThresholdSchedule, threshold_at
from stds.method.sparse import pruned_parameters

__all__ = ["SparsityRamp", "TargetSparsitySchedule", "default_every", "keep_unpruned", "kth_smallest_abs",
           "wanted_count"]


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


class SparsityRamp(ThresholdSchedule):
    """A schedule that asks for a sparsity: S · f(x) along ``ramp`` (x = step / (ramp_until ·
    total_steps), capped at 1), worked out every ``every`` steps and at the last (`due`); what
    the threshold does with it is the subclass's (`TargetSparsitySchedule`, the quantile d;
    `stds.method.gmp.MagnitudePruningSchedule`, masks). Its state is d and the sparsity asked."""

    def __init__(self, target: float, total_steps: int, ramp: str, every: int, ramp_until: float, kind: str) -> None:
        threshold_at(0, total_steps, 1.0, ramp, ramp_until)  # validates total_steps, ramp, ramp_until
        if not 0.0 < target < 1.0:
            raise ValueError(f"target sparsity must lie in (0, 1), got {target}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.target, self.ramp, self.every = target, ramp, every
        self.asked = 0.0  # the sparsity the current d was computed for
        super().__init__(final=0.0, total_steps=total_steps, kind=ramp, ramp_until=ramp_until)
        self.kind = kind

    def wanted(self, step: int) -> float:
        """The sparsity asked for after ``step`` steps: S · f(min(step / (ramp_until · total_steps), 1))."""
        return threshold_at(step, self.total_steps, self.target, self.ramp, self.ramp_until)

    def at(self, step: int) -> float:
        """d before any θ is seen: 0 at step 0 (θ = w0 at registration); later the d set last."""
        return 0.0 if step == 0 else self.d

    def due(self, step: int) -> bool:
        """Whether ``step`` is a recompute: every ``every`` steps, and the last."""
        return step % self.every == 0 or step == self.total_steps

    def metrics(self) -> dict[str, float]:
        """d and the sparsity it was computed for (``target_sparsity`` in ``docs/metrics.md``)."""
        return {"d": self.d, "target_sparsity": self.asked}

    def state_dict(self) -> dict[str, float]:
        """d and the sparsity it was computed for: with θ (and masks), all a resumed run needs."""
        return {"d": self.d, "target_sparsity": self.asked}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict` and set d on the attached model."""
        self.asked = float(state["target_sparsity"])
        super().load_state_dict(state)


class TargetSparsitySchedule(SparsityRamp):
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
        self.keep_weights = keep_weights
        self._thetas: list[Tensor] = []
        self._numel = 0
        self._scratch: Tensor | None = None
        super().__init__(target, total_steps, ramp, every, ramp_until, TARGET_KIND)

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
        if not self.due(step):
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
