"""Models rebuilt from a saved config (a checkpoint's or ``pruned.pt``'s ``config``): for
``init_from``, export and reports, which read runs other than the one being trained.

A saved config is data from a file that anyone with write access to a shared directory may have
written, so nothing it names is built before `check_saved_config` has walked it: every
``_target_`` must be in `allowed_targets()` (the registered models, datasets, optimizers and
learning-rate schedules, and the neuron factory), and no string may hold an interpolation (a saved config
is resolved when it is written; ``${oc.env:...}`` in one was put there by hand). Hydra 1.3 has no
target allowlist of its own (its blocklist lets ``numpy.load`` through), so it is kept here.
A model, dataset, optimizer or learning-rate schedule registered with `stds.models.register_model`,
`stds.data.register_dataset` or `stds.run.setup.optim_registry` is allowed by that registration;
`allow_target` adds any other name (``docs/architecture.md``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import stds.data
import stds.models
from stds.errors import CheckpointError, one_line
from stds.method.sparse import sparsify
from stds.run.files.safe import UnsafeFileError, checked_value, read_yaml, walk
from stds.run.setup.optim_registry import LR_SCHEDULES, OPTIMIZERS


_NEURONS = {"stds.models.make_neuron", "stds.models.neurons.make_neuron"}  # every model's neuron factory
_EXTRA: set[str] = set()  # `allow_target`'s names


def allowed_targets() -> set[str]:
    """Every ``_target_`` a config read from a file may name: the registered models
    (`stds.models.MODELS`), datasets (`stds.data.DATASETS`), optimizers and learning-rate schedules
    (`OPTIMIZERS`, `LR_SCHEDULES`, with the callables their nodes build), the neuron factory, and
    names given to `allow_target`. Read at each check, so a thing registered after import is allowed too."""
    registered = [*stds.models.MODELS.values(), *stds.data.DATASETS.values(),
                  *OPTIMIZERS.values(), *LR_SCHEDULES.values()]
    return set().union(*(entry.target_names for entry in registered)) | _NEURONS | _EXTRA


_TARGET_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def allow_target(name: str) -> None:
    """Let saved configs name ``name`` (``"mypackage.models.MyNet"``) as a ``_target_``: call it
    in your own code before exporting or starting from a run of your model."""
    if not isinstance(name, str) or not _TARGET_NAME.match(name):
        raise ValueError(f"allow_target({name!r}): give a dotted name such as 'mypackage.models.MyNet'")
    _EXTRA.add(name)


def _shown(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _check_leaf(path: str, key: str, value: Any, source: Path) -> None:
    if key == "_target_" and (not isinstance(value, str) or value not in allowed_targets()):
        raise CheckpointError(
            f"{source}: config key {path} = {_shown(value)!r} is not an allowed _target_ (the registered "
            "models, datasets, optimizers and lr schedules, and the neurons); nothing was built. If it is "
            "your own class, call stds.run.files.rebuild.allow_target(<its name>) first (docs/architecture.md)"
        )
    if isinstance(value, str) and "${" in value:
        raise CheckpointError(
            f"{source}: config key {path} holds an interpolation ({_shown(value)!r}); a saved config is "
            "resolved when written, so this file was altered; nothing was built: use a file you trust"
        )


def check_saved_config(config: dict, source: Path) -> None:
    """Refuse (`CheckpointError`, one line naming the key path and ``source``) a saved plain config
    with a ``_target_`` outside `allowed_targets()` or any key or string holding ``${``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: its config is not a mapping; use a stds checkpoint or pruned.pt")
    for path, key, value in walk(config):
        if isinstance(key, str) and "${" in key:
            _check_leaf(path, "", key, source)
        if not isinstance(value, (dict, list, tuple)):
            _check_leaf(path, str(key), value, source)
        elif key == "_target_":
            _check_leaf(path, "_target_", value, source)


def _resolve_references(node: Any, tree: dict, source: Path, path: str = "") -> Any:
    """``node`` with each leaf read through `checked_value` (whole-value references to keys of
    ``tree`` followed by this code, any other interpolation refused)."""
    if isinstance(node, dict):
        return {key: _resolve_references(value, tree, source, f"{path}.{key}" if path else str(key))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve_references(value, tree, source, f"{path}.{i}") for i, value in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    value = checked_value(tree, node, source, path)
    if isinstance(value, (dict, list)):
        raise CheckpointError(f"{source}: config key {path} refers to a whole section; use a file you trust")
    return value


def load_saved_yaml(path: Path, root: Path | None = None) -> dict:
    """A run's ``.hydra/config.yaml`` (written unresolved) as a plain dict, read by
    `stds.run.files.safe.read_yaml` (``root``: the run directory, default two folders up). Only
    whole-value references to its own keys (``${T}``, ``${dataset.num_classes}``) are resolved,
    by this module; any other interpolation (``${oc.env:HOME}``, ``${${r}:X}``, ``a${x}``) is
    refused naming the key and the file, and nothing is resolved by OmegaConf."""
    try:
        raw = read_yaml(path, root if root is not None else path.parent.parent)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({one_line(exc)}); use a run directory you trust") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a mapping of config keys; use a run directory you trust")
    if any(isinstance(key, str) and "${" in key for _, key, _ in walk(raw)):
        raise CheckpointError(f"{path}: a config key is itself an interpolation; not read: use a file you trust")
    try:
        return _resolve_references(raw, raw, path)
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None


def build_model(config: dict[str, Any], source: Path | str = "the saved config") -> nn.Module:
    """The plain model of ``config["model"]`` (no reparameterization), after `check_saved_config`
    (``source``: the file the config came from, for the error line)."""
    check_saved_config(config, Path(source))
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{source}: its config has no model mapping (a model._target_ and its "
                              "arguments); nothing was built: give a stds checkpoint or pruned.pt")
    try:
        return instantiate(OmegaConf.create(config["model"]))
    except Exception as exc:  # noqa: BLE001 - a saved value of the wrong type (image_size: "x") fails anywhere
        cause = exc.__cause__ or exc
        # the type only: the message may quote a value of the file, which is data, never shown
        raise CheckpointError(f"{source}: its model config does not build {config['model'].get('_target_')} "
                              f"({type(cause).__name__}: a value of the wrong type?); nothing was built: "
                              "give a stds checkpoint or pruned.pt") from None


def sparsified_model(config: dict[str, Any], source: Path | str = "the saved config") -> nn.Module:
    """The model with the reparameterizations the run trained with (thresholds from its state)."""
    model = build_model(config, source)
    sparse = config.get("sparse") or {}
    exclude = sparse.get("exclude") if isinstance(sparse, dict) else None
    if exclude is None:
        exclude = getattr(model, "prune_exclude", ())
    if not isinstance(sparse, dict) or not isinstance(exclude, (list, tuple)) \
            or not all(isinstance(name, str) for name in exclude):
        raise CheckpointError(f"{source}: its config's sparse.exclude is not a list of layer names; "
                              "nothing was built: give a stds checkpoint or pruned.pt")
    sparsify(model, str(sparse.get("method", "identity")), exclude=tuple(exclude))
    return model
