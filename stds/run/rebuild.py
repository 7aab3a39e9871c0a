"""Models rebuilt from a saved config (a checkpoint's or ``pruned.pt``'s ``config``): for
``init_from``, export and reports, which read runs other than the one being trained."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from stds.method.sparse import sparsify


def build_model(config: dict[str, Any]) -> nn.Module:
    """The plain model of ``config["model"]`` (no reparameterization)."""
    return instantiate(OmegaConf.create(config["model"]))


def sparsified_model(config: dict[str, Any]) -> nn.Module:
    """The model with the reparameterizations the run trained with (thresholds from its state)."""
    model = build_model(config)
    sparse = config.get("sparse") or {}
    exclude = sparse.get("exclude")
    if exclude is None:
        exclude = getattr(model, "prune_exclude", ())
    sparsify(model, str(sparse.get("method", "identity")), exclude=tuple(exclude))
    return model
