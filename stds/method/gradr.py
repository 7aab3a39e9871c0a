"""The Grad R prior: at every optimizer step, move each pruned θ towards 0 by lr·α.

Grad R (Gradient Rewiring) trains with a constant threshold μ (the flat width) and a prior that
pulls the hidden parameters θ towards 0. Here the prior is attached to any ``torch.optim``
optimizer through its step hooks, so every other parameter (BatchNorm, biases, unpruned heads) is
optimised exactly as without it. With lr the current learning rate of θ's parameter group, s =
sign(θ) taken just BEFORE the optimizer's update, and θ on the right the optimizer's result:

- ``sign_preserving`` (the published Adam rule): θ ← s·max(s·θ − lr·α, 0). |θ| shrinks by lr·α
  and stops at 0; a θ that the optimizer's step carried across 0 is set to 0, and a θ at 0 before
  the step stays at 0 (s = 0).
- ``plain`` (the published SGD rule): θ ← θ − lr·α·s.

Hooks run only inside ``optimizer.step()``; a step that an AMP ``GradScaler`` skips (inf/NaN
gradients) never calls them, so θ is left untouched. The update is deterministic and in place
(the signs go into buffers reused from step to step; a tensor learning rate stays on its device,
so nothing is read back to the host), and under DDP every rank keeps identical parameters. θ
without a gradient (skipped by the optimizer) is left alone. α = 0 attaches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["VARIANTS", "GradRPrior", "attach_gradr_prior"]

VARIANTS: tuple[str, ...] = ("sign_preserving", "plain")
"""Grad R prior updates: ``sign_preserving`` (published Adam rule), ``plain`` (published SGD rule)."""


def _group_thetas(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
) -> list[tuple[int, list[nn.Parameter]]]:
    """(param-group index, its θ) for the groups holding ``params``; a θ in no group raises."""
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    by_group: dict[int, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for theta in params:
        if id(theta) in seen:
            continue
        if id(theta) not in group_of:
            raise ValueError(
                f"a pruned parameter of shape {tuple(theta.shape)} is in no param group of the "
                "optimizer; build the optimizer over all model parameters"
            )
        seen.add(id(theta))
        by_group.setdefault(group_of[id(theta)], []).append(theta)
    return sorted(by_group.items())


class GradRPrior:
    """The Grad R prior attached to one optimizer; `remove` detaches it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        alpha: float,
        variant: str = "sign_preserving",
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown Grad R variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"Grad R alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.variant = variant
        self._groups = _group_thetas(optimizer, params)
        self._signs: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        if self.alpha > 0:
            self._handles.append(optimizer.register_step_pre_hook(self._remember_signs))
            self._handles.append(optimizer.register_step_post_hook(self._apply))

    @property
    def active(self) -> bool:
        """Whether the prior is attached (α > 0 and not removed)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach the prior from the optimizer (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._signs.clear()

    @torch.no_grad()
    def _remember_signs(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Pre-step hook: keep s = sign(θ) before the optimizer's update (both variants use it).

        The signs go into buffers kept from step to step (one per θ), so no step allocates.
        """
        for _, thetas in self._groups:
            for theta in thetas:
                if theta.grad is not None:
                    signs = self._signs.get(id(theta))
                    if signs is None:
                        signs = self._signs[id(theta)] = torch.empty_like(theta)
                    torch.sign(theta, out=signs)

    @torch.no_grad()
    def _apply(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Post-step hook: move every updated θ towards 0 by lr·α of its own parameter group."""
        # a fused optimizer under an fp16 GradScaler is always called; the scaler then hands it
        # ``found_inf`` (1 on a step to skip) and it skips inside its kernel. The prior follows
        # without reading the device: its amount is multiplied by (found_inf == 0), and a zero
        # amount leaves θ as it is in both rules.
        found_inf = getattr(optimizer, "found_inf", None)
        keep = (found_inf == 0) if isinstance(found_inf, Tensor) else None
        for index, thetas in self._groups:
            amount = optimizer.param_groups[index]["lr"] * self.alpha
            if keep is not None:
                amount = keep * amount
            for theta in thetas:
                if theta.grad is None:
                    continue
                signs = self._signs[id(theta)]
                if self.variant == "sign_preserving":
                    _shrink_without_crossing(theta.data, signs, amount)
                elif isinstance(amount, Tensor):  # θ −= s·amount; s is rewritten next step
                    theta.data.sub_(signs.mul_(amount))
                else:
                    theta.data.add_(signs, alpha=-amount)


def _shrink_without_crossing(theta: Tensor, signs: Tensor, amount: float | Tensor) -> None:
    """θ ← s·max(s·θ − amount, 0) in place, s = ``signs`` (sign(θ) before the optimizer's step).

    Four in-place passes, no allocation; a tensor ``amount`` is used where it lies (no host read).
    ``F.softshrink`` (sign(θ)·max(|θ| − amount, 0)) is not this rule: it takes the sign after the
    step, so a θ that the step carried across 0 would keep its new sign, and a θ at 0 that the
    step moved would not be held at 0. (It was also only reachable in place through a private op.)
    """
    theta.mul_(signs).sub_(amount).clamp_(min=0).mul_(signs)


def attach_gradr_prior(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    alpha: float,
    variant: str = "sign_preserving",
) -> GradRPrior:
    """Attach the Grad R prior with strength ``alpha`` on the pruned ``params`` to ``optimizer``.

    ``params`` are the θ to shrink (e.g. ``stds.method.sparse.pruned_parameters(model).values()``); each
    must belong to a param group of ``optimizer``. ``variant`` is ``sign_preserving`` or
    ``plain``. α = 0 attaches nothing (the returned object's `GradRPrior.remove` still works).
    """
    return GradRPrior(optimizer, params, alpha, variant)
