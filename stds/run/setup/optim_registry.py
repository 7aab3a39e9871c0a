"""The optimizers and learning-rate schedules a config may name: `OPTIMIZERS` and `LR_SCHEDULES`,
one entry each, added by `register_optimizer` / `register_lr_schedule`.

An entry holds the class its ``_target_`` builds (completed in code: the optimizer with the
parameters, the schedule with the optimizer, so its node is ``_partial_``), the callables a node
inside its config builds as well (``lr_scheduler=hold_cosine`` is torch's `LambdaLR` whose
``lr_lambda`` is `stds.run.setup.lr.HoldCosine`), and the config group node ``optimizer=<name>`` /
``lr_scheduler=<name>`` selects (None where ``conf/<group>/<name>.yaml`` holds it, with its
comments). The allowlist of targets a saved config may name (`stds.run.files.rebuild`) and the
config groups and choices (`stds.run.setup.config`) read these two lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from stds.registry import Buildable, Registry, target_spellings
from stds.run.setup.lr import HoldCosine


@dataclass(frozen=True)
class OptimEntry(Buildable):
    """One registered optimizer or learning-rate schedule: its class, its group node, and the
    callables its config builds inside that node (``inner``)."""

    inner: tuple[Callable[..., Any], ...] = ()

    @property
    def target_names(self) -> set[str]:
        """Every spelling of the class and of each inner callable (`stds.registry.target_spellings`)."""
        return set().union(*(target_spellings(part) for part in (self.target, *self.inner)))


OPTIMIZERS: Registry[OptimEntry] = Registry("optimizer")
LR_SCHEDULES: Registry[OptimEntry] = Registry("lr schedule")


def _dotted(target: Callable[..., Any]) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _named_targets(node: Any, found: list[Callable[..., Any]]) -> Any:
    """``node`` with every callable ``_target_`` of a nested mapping written as its dotted name;
    the callables are appended to ``found``."""
    if isinstance(node, dict):
        named = {}
        for key, value in node.items():
            if key == "_target_" and callable(value):
                found.append(value)
                value = _dotted(value)
            named[key] = _named_targets(value, found)
        return named
    if isinstance(node, (list, tuple)):
        return [_named_targets(value, found) for value in node]
    return node


def _entry(target: Callable[..., Any], config: dict[str, Any] | None,
           inner: tuple[Callable[..., Any], ...]) -> OptimEntry:
    if not callable(target) or not all(callable(part) for part in inner):
        raise TypeError(f"register an optimizer or lr schedule with a class or function, not {target!r}")
    if config is None:
        return OptimEntry(target, None, tuple(inner))
    found: list[Callable[..., Any]] = []
    body = _named_targets(dict(config), found)
    node = {"_target_": _dotted(target), "_partial_": True, **body}
    return OptimEntry(target, node, (*inner, *found))


def register_optimizer(name: str, target: Callable[..., torch.optim.Optimizer],
                       config: dict[str, Any] | None = None,
                       inner: tuple[Callable[..., Any], ...] = ()) -> OptimEntry:
    """Make ``target`` an optimizer of `stds`: one call. ``config`` (its arguments but the
    parameters, e.g. ``{"lr": "${lr}"}``) becomes ``optimizer=<name>``; a saved config may then
    name ``target``."""
    return OPTIMIZERS.add(name, _entry(target, config, inner))


def register_lr_schedule(name: str, target: Callable[..., Any], config: dict[str, Any] | None = None,
                         inner: tuple[Callable[..., Any], ...] = ()) -> OptimEntry:
    """Make ``target`` (a ``torch.optim.lr_scheduler`` class, stepped once per epoch) a learning-rate
    schedule of `stds`: one call. ``config`` (its arguments but the optimizer) becomes
    ``lr_scheduler=<name>``; a nested node may give its ``_target_`` as the callable itself
    (``{"lr_lambda": {"_target_": MyFactor, ...}}``), which a saved config may then name too, as it may
    the callables in ``inner`` (for a ``conf/lr_scheduler/<name>.yaml`` that builds one)."""
    return LR_SCHEDULES.add(name, _entry(target, config, inner))


# The shipped ones; their nodes, with comments, are conf/optimizer/*.yaml and conf/lr_scheduler/*.yaml.
register_optimizer("adam", torch.optim.Adam)
register_optimizer("sgd", torch.optim.SGD)
register_lr_schedule("constant", torch.optim.lr_scheduler.ConstantLR)
register_lr_schedule("cosine", torch.optim.lr_scheduler.CosineAnnealingLR)
register_lr_schedule("hold_cosine", torch.optim.lr_scheduler.LambdaLR, inner=(HoldCosine,))
