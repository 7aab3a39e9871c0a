"""The models `stds` knows: `MODELS`, one entry per model, added by `register_model`.

An entry holds what builds the model (a class or factory: the ``_target_`` of its config), the
config group node ``model=<name>`` selects (None where ``conf/model/<name>.yaml`` holds it, with
its comments), and the model's layer order for the NIR export (``nir_parts``, None: no NIR export).
The allowlist of targets a saved config may name (`stds.run.files.rebuild`), the config groups
(`stds.run.setup.config.register_configs`) and the NIR export (`stds.results.nir.model_parts`)
all read this one list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from stds.registry import Buildable, Registry, config_node

Parts = tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]
"""(static stem, per-step layers), each a list of (name, module) in order."""


@dataclass(frozen=True)
class ModelEntry(Buildable):
    """One registered model: what builds it, its ``model=<name>`` node, its NIR layer order."""

    nir_parts: Callable[[Any], Parts] | None = None


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, target: Callable[..., nn.Module], config: dict[str, Any] | None = None,
                   nir_parts: Callable[[Any], Parts] | None = None) -> ModelEntry:
    """Make ``target`` a model of `stds`: one call. ``config`` (its ``_target_`` is filled in) becomes
    ``model=<name>``; a saved config may then name ``target``; ``nir_parts(model)`` gives the
    NIR export its (stem, per-step layers)."""
    return MODELS.add(name, ModelEntry(target, config_node(target, config), nir_parts))


def children(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``module``'s children as (``prefix.name``, child), in order."""
    return [(f"{prefix}.{name}", child) for name, child in module.named_children()]


def stem_and_features(model: Any) -> Parts:
    """NIR parts of a net with a ``stem`` (run once on the image) and ``features`` (per step)."""
    return children("stem", model.stem), children("features", model.features)
