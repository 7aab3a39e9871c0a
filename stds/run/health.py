"""Diagnoses of a run that trains without error but learns nothing, each with its likely fix.

`diagnose` reads one epoch's record (the dict `stds.run.loop` writes to ``metrics.jsonl``) and the
run's config, and returns one-line warnings; the loop logs them and keeps them in the record's
and ``metrics.json``'s ``warnings``. Three conditions are checked:

- every pruned weight is zero (``sparsity`` 1.0): the threshold d grew faster than the weights
  could follow (e.g. the default ``flat_width=0.5`` with ``epochs=2``);
- no weight is pruned (``sparsity`` exactly 0.0) although the method prunes and the threshold d is
  above 0: the weights grew far past d (e.g. ``lr=1e9``);
- test top-1 at chance for two epochs in a row, or at the end: at most ``1/C + min(0.5/C, 0.05)`` for ``C`` classes
  (0.15 for 10 classes, 0.0015 for 1000), the accuracy of a network that predicts one class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHANCE_MARGIN_RELATIVE = 0.5
"""Top-1 up to chance x (1 + this) counts as chance ..."""
CHANCE_MARGIN_MAX = 0.05
"""... but never more than this above chance (2 classes: 0.55, not 0.75)."""


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg.a.b`` for a DictConfig or a plain dict; ``default`` where a key is missing."""
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return default
    return default if node is None else node


def chance_limit(num_classes: int) -> float:
    """The highest top-1 that still counts as chance for ``num_classes`` classes."""
    chance = 1.0 / num_classes
    return chance + min(CHANCE_MARGIN_RELATIVE * chance, CHANCE_MARGIN_MAX)


def fully_pruned(record: Mapping[str, Any], cfg: Any) -> str | None:
    """The warning for an epoch that ends with every pruned weight at zero, else None."""
    sparsity = record.get("sparsity")
    if sparsity is None or sparsity < 1.0:
        return None
    epoch, epochs = record.get("epoch"), _get(cfg, "epochs")
    if str(_get(cfg, "scheduler.kind", "")) == "target":
        fix = f"target_sparsity={_get(cfg, 'target_sparsity')} leaves nothing; lower target_sparsity"
    else:
        width = _get(cfg, "flat_width")
        fix = (f"flat_width={width} is too large for {epochs} epochs; lower flat_width or train "
               "longer (more epochs)")
    return f"every weight is pruned (sparsity 1.0) at epoch {epoch}: {fix}"


def never_pruned(record: Mapping[str, Any], cfg: Any) -> str | None:
    """The warning for an epoch that ends with no pruned weight at zero although the run prunes
    (``sparse.method`` st or stmod) with a threshold d > 0, else None."""
    sparsity, d = record.get("sparsity"), record.get("d")
    method = _get(cfg, "sparse.method", "identity")
    method = getattr(method, "value", method)  # the schema's enum, or a plain string
    if sparsity is None or sparsity > 0.0 or d is None or d <= 0 or method == "identity":
        return None
    return (f"no weight is pruned (sparsity 0.0) at epoch {record.get('epoch')} although d={d:.4g}: every "
            f"|theta| grew past the threshold; lower lr (now {_get(cfg, 'lr')}) or raise flat_width")


def _chance(record: Mapping[str, Any] | None, num_classes: int) -> bool:
    acc = None if record is None else record.get("test_acc1")
    return acc is not None and num_classes >= 2 and acc <= chance_limit(num_classes)


def at_chance(record: Mapping[str, Any], cfg: Any, previous: Mapping[str, Any] | None = None) -> str | None:
    """The warning for a test top-1 at chance that stayed there for an epoch (this epoch and
    ``previous``, the one before) or that the run ends with, else None.

    One epoch at chance alone is not warned about: a spiking network can need an epoch before its
    output layer fires at all (the digits net with batch 64 is at chance after its first epoch).
    """
    acc, epoch = record.get("test_acc1"), record.get("epoch") or 0
    num_classes = int(_get(cfg, "dataset.num_classes", 0))
    last = epoch >= int(_get(cfg, "epochs", 0) or 0)
    if epoch < 1 or not _chance(record, num_classes) or not (last or _chance(previous, num_classes)):
        return None
    return (f"test_acc1 {acc:.4f} is at chance (1/{num_classes} = {1 / num_classes:.4f}) after epoch "
            f"{epoch}: the network learns nothing; lower lr (now {_get(cfg, 'lr')}) or check the data "
            "(labels, dataset.num_classes, normalisation)")


def diagnose(record: Mapping[str, Any], cfg: Any, previous: Mapping[str, Any] | None = None) -> list[str]:
    """One-line warnings about one epoch's ``record`` (``previous``: the epoch before, if any)
    under ``cfg``; empty for a healthy epoch.

    A fully pruned network is also at chance; then only the pruning warning is given (its fix is
    the one that helps).
    """
    pruned = fully_pruned(record, cfg)
    if pruned is not None:
        return [pruned]
    found = [never_pruned(record, cfg), at_chance(record, cfg, previous)]
    return [warning for warning in found if warning is not None]
