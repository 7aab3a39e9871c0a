"""The optimizer, its learning-rate schedule and the Grad R prior, built from the config."""

from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from stds.gradr import attach_gradr_prior
from stds.sparse import pruned_parameters

log = logging.getLogger(__name__)


def _gradr_variant(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> str:
    variant = cfg.gradr_variant.value
    if variant != "auto":
        return variant
    adaptive = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    return "sign_preserving" if adaptive else "plain"


def build_optimization(cfg: DictConfig, core: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer over all parameters, its learning-rate schedule, and the Grad R prior if α > 0."""
    optimizer = instantiate(cfg.optimizer)(params=core.parameters())
    lr_scheduler = instantiate(cfg.lr_scheduler)(optimizer=optimizer)
    if cfg.alpha_gr > 0:
        variant = _gradr_variant(cfg, optimizer)
        attach_gradr_prior(optimizer, pruned_parameters(core).values(), cfg.alpha_gr, variant)
        log.info("Grad R prior: alpha=%g, variant=%s", cfg.alpha_gr, variant)
    return optimizer, lr_scheduler
