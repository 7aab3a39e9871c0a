"""Models rebuilt from a saved config (a checkpoint's or ``pruned.pt``'s ``config``): for
``init_from``, export and reports, which read runs other than the one being trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from stds.errors import CheckpointError
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


def check_saved_config(config: Any, source: Path, path: str = "config") -> None:
    """Refuse a saved config that carries an interpolation: configs are written resolved, so a
    ``${...}`` in one was planted (resolving it could read the environment or call a resolver)."""
    if isinstance(config, dict):
        for key, value in config.items():
            check_saved_config(value, source, f"{path}.{key}")
    elif isinstance(config, list):
        for index, value in enumerate(config):
            check_saved_config(value, source, f"{path}[{index}]")
    elif isinstance(config, str) and "${" in config:
        raise CheckpointError(f"{path} in {source} holds an interpolation ({config!r}); saved configs are "
                              "resolved when written, so this file was altered: use a run directory you trust")
