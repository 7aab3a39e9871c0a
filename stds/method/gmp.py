"""Gradual magnitude pruning (GMP, Zhu and Gupta 2017), the baseline beside STDS and Grad R.

``sparse=gmp`` registers `MagnitudeMask` on the same prunable layers: w = θ where the layer's mask
is set, 0 elsewhere. The gradient reaches θ only through the mask (∂w/∂θ = mask), so a pruned
weight stays at zero for good: no regrowth. `MagnitudePruningSchedule` (the schedule kind
``magnitude``, chosen by the reparameterization itself: ``Reparam.schedule_kind``) prunes on the
target schedule's ramp: the wanted sparsity after ``step`` steps is S · f(x) (``scheduler.ramp``,
cubic in Zhu and Gupta, x = step / (ramp_until · total_steps), capped at 1), and every ``every``
steps (and at the last step) each mask drops its smallest |w| until the wanted share is zero:

- ``scope="layer"`` (Zhu and Gupta's rule, the default): every pruned layer to the wanted sparsity;
- ``scope="global"``: the smallest |w| over all pruned layers together.

Masked weights count as |w| = 0, so they stay pruned, and the count of zeros is exactly
`wanted_count` (ties broken by position: a stable sort of |w|). After the ramp the masks hold:
training at S fine-tunes the weights left.

Why not ``torch.ao.pruning``: its sparsifiers register their own parametrization (``FakeSparsity``),
which is no `stds.method.sparse.Reparam`, so sparsity, checkpoints, resume, export and NIR would
need a second path; its ``CubicSL`` scheduler keeps its position in a Python counter that a
resumed run cannot restore from a checkpoint, and it has no global scope.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from stds.method.schedule import SCHEDULE_KINDS, ScheduleArgs
from stds.method.target import SparsityRamp, default_every, wanted_count
from stds.method.sparse import Reparam, pruned_layers, register_reparam

SCOPES = ("layer", "global")
MAGNITUDE_KIND = "magnitude"


@register_reparam
class MagnitudeMask(Reparam):
    """w = θ where ``mask`` holds, else 0 (``sparse=gmp``); the mask (a bool buffer of θ's shape,
    saved with the model) only ever loses entries, in `MagnitudePruningSchedule`."""

    method = "gmp"
    schedule_kind: ClassVar[str | None] = MAGNITUDE_KIND
    mask: Tensor

    def right_inverse(self, w: Tensor) -> Tensor:
        """θ = w, every weight kept (the mask is made here, where θ's shape is first known)."""
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool), persistent=True)
        return w

    def forward(self, theta: Tensor) -> Tensor:
        return torch.where(self.mask, theta, torch.zeros((), dtype=theta.dtype, device=theta.device))


class MagnitudePruningSchedule(SparsityRamp):
    """Prunes the `MagnitudeMask` layers to S · f(x) at every recompute (see the module text); `d`
    is the largest |w| the last recompute pruned (the magnitude threshold), for the logs."""

    def __init__(self, target: float, total_steps: int, ramp: str = "cubic", every: int = 1,
                 ramp_until: float = 1.0, scope: str = "layer") -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.scope = scope
        self._masked: list[tuple[Tensor, Tensor]] = []  # (θ, mask) per pruned layer
        super().__init__(target, total_steps, ramp, every, ramp_until, MAGNITUDE_KIND)

    def attach(self, model: nn.Module) -> MagnitudePruningSchedule:
        """Remember (θ, mask) of every pruned layer; nothing is pruned here (a resumed run's masks
        come with its checkpoint)."""
        lists = [layer.parametrizations.weight for layer in pruned_layers(model).values()]
        self._masked = [(plist.original, plist[0].mask) for plist in lists if isinstance(plist[0], MagnitudeMask)]
        if not self._masked:
            raise ValueError("sparse=gmp needs pruned layers with the gmp reparameterization; the model has none")
        return self

    @torch.no_grad()
    def step(self, step: int) -> float:
        if not self.due(step):
            return self.d
        if not self._masked:
            raise RuntimeError("attach the model before calling step (MagnitudePruningSchedule)")
        wanted = self.wanted(step)
        if wanted <= self.asked:  # masks never grow back: nothing more to prune
            return self.d
        self.asked = wanted
        groups = [self._masked] if self.scope == "global" else [[pair] for pair in self._masked]
        self.d = max(prune_smallest(group, wanted) for group in groups)
        return self.d


def prune_smallest(group: list[tuple[Tensor, Tensor]], sparsity: float) -> float:
    """Clear the masks of ``group`` ((θ, mask) pairs, one device) at the smallest |w| until
    `wanted_count` of all its weights are masked; returns the largest |w| masked (0 if none)."""
    values = torch.cat([torch.where(mask, theta.abs(), 0.0).reshape(-1) for theta, mask in group])
    k = wanted_count(sparsity, values.numel())
    if k == 0:
        return 0.0
    order = torch.sort(values, stable=True).indices[:k]
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    keep[order] = False
    offset = 0
    for theta, mask in group:
        mask &= keep[offset:offset + mask.numel()].view_as(mask)
        offset += mask.numel()
    return float(values[order[-1]])


def _magnitude_kind(args: ScheduleArgs) -> MagnitudePruningSchedule:
    if args.target is None or args.ramp is None:
        raise ValueError("sparse=gmp needs target_sparsity and scheduler.ramp (scheduler=target)")
    every = default_every(args.total_steps) if args.every is None else int(args.every)
    return MagnitudePruningSchedule(args.target, args.total_steps, args.ramp, every, args.ramp_until,
                                    args.scope or "layer")


SCHEDULE_KINDS.add(MAGNITUDE_KIND, _magnitude_kind)
