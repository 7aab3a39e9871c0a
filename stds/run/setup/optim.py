"""The optimizer, its learning-rate schedule and the Grad R prior, built from the config."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from stds.run.setup.config import GradROptimize, instantiate_node
from stds.errors import ConfigError
from stds.method.gradr import attach_gradr_prior
from stds.method.sparse import pruned_parameters

log = logging.getLogger(__name__)


def _gradr_variant(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> str:
    variant = cfg.gradr_variant.value
    if variant != "auto":
        return variant
    adaptive = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    return "sign_preserving" if adaptive else "plain"


def _gradr_optimize(cfg: DictConfig) -> GradROptimize:
    """The ``gradr_optimize`` key as the enum (a config written before the key existed: ``all``)."""
    return GradROptimize(cfg.get("gradr_optimize", GradROptimize.all))


def trained_parameters(cfg: DictConfig, core: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: all of ``core``'s, or only its pruned θ.

    Only θ with ``gradr_optimize=pruned`` under Grad R (α > 0): the published baseline, where
    BatchNorm, biases and unpruned layers are never updated. `stds.run.setup.config.validate` refuses
    ``pruned`` without α > 0 or with sparse=identity; a model whose layers are all excluded from
    pruning is refused here (it would leave the optimizer nothing to train).
    """
    if cfg.alpha_gr > 0 and _gradr_optimize(cfg) == GradROptimize.pruned:
        thetas = list(pruned_parameters(core).values())
        if not thetas:
            raise ConfigError(
                "gradr_optimize=pruned but no layer is pruned (see sparse.exclude); "
                "prune some layers or set gradr_optimize=all"
            )
        return thetas
    return list(core.parameters())


FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""Optimizers built with ``fused=True`` on CUDA: one kernel per step, and under an fp16
`GradScaler` the skip decision stays on the device (an unfused optimizer makes the scaler read
``found_inf`` to the host every step)."""


def _make_optimizer(cfg: DictConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    factory = instantiate_node(cfg.optimizer, "optimizer")
    on_cuda = bool(params) and params[0].is_cuda
    target = getattr(factory, "func", factory)
    if on_cuda and isinstance(target, type) and issubclass(target, FUSED_OPTIMIZERS):
        if "fused" not in factory.keywords:
            return factory(params=params, fused=True)
    return factory(params=params)


def build_optimization(cfg: DictConfig, core: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer over `trained_parameters`, its learning-rate schedule, and the Grad R prior if α > 0."""
    optimizer = _make_optimizer(cfg, trained_parameters(cfg, core))
    lr_scheduler = instantiate_node(cfg.lr_scheduler, "lr_scheduler")(optimizer=optimizer)
    if cfg.alpha_gr > 0:
        variant = _gradr_variant(cfg, optimizer)
        attach_gradr_prior(optimizer, pruned_parameters(core).values(), cfg.alpha_gr, variant)
        log.info("Grad R prior: alpha=%g, variant=%s, optimizing %s parameters",
                 cfg.alpha_gr, variant, _gradr_optimize(cfg).value)
    return optimizer, lr_scheduler
