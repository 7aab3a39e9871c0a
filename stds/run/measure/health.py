"""Diagnoses of a run that trains without error but learns nothing, each with its likely fix.

`diagnose` reads one epoch's record (the dict `stds.run.life.loop` writes to ``metrics.jsonl``) and the
run's config, and returns one-line warnings; the loop logs them and keeps them in the record's
and ``metrics.json``'s ``warnings``. Per epoch:

- over-pruned: every pruned weight is zero (``sparsity`` 1.0), or sparsity above
  `OVER_PRUNED_SPARSITY` (0.99) with test top-1 at chance: the threshold d grew faster than the
  weights could follow (e.g. the default ``flat_width=0.5`` with ``epochs=2``). The fix named is
  the pruning's (lower ``flat_width``, more epochs, or ``scheduler=target``), not the lr's;
- no weight is pruned (``sparsity`` exactly 0.0) although the method prunes and the threshold d is
  above 0: the weights grew far past d (e.g. ``lr=1e9``);
- test top-1 at chance for two epochs in a row, or at the end: at most ``1/C + min(0.5/C, 0.05)`` for ``C`` classes
  (0.15 for 10 classes, 0.0015 for 1000), the accuracy of a network that predicts one class.

`diagnose_run` reads the whole history when the run ends: test top-1 that fell by more than
`FALL_MIN` (0.05) from the run's most accurate epoch to the last one while sparsity rose by more
than `RISE_MIN` (0.01) is over-pruning too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CHANCE_MARGIN_RELATIVE = 0.5
"""Top-1 up to chance x (1 + this) counts as chance ..."""
CHANCE_MARGIN_MAX = 0.05
"""... but never more than this above chance (2 classes: 0.55, not 0.75)."""
OVER_PRUNED_SPARSITY = 0.99
"""Sparsity above this with test top-1 at chance is over-pruning, whatever the lr."""
FALL_MIN = 0.05
"""Test top-1 lower than the run's best by more than this at the end ..."""
RISE_MIN = 0.01
"""... while sparsity rose by more than this since that epoch: the run ends over-pruned."""


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


def pruning_fix(cfg: Any) -> str:
    """What to change when a run prunes more than its weights can follow, naming the keys."""
    if str(_get(cfg, "scheduler.kind", "")) == "target":
        return (f"target_sparsity={_get(cfg, 'target_sparsity')} is more than this network keeps "
                f"in {_get(cfg, 'epochs')} epochs; lower target_sparsity or train more epochs")
    width = _get(cfg, "flat_width")
    return (f"flat_width={width} is too large for {_get(cfg, 'epochs')} epochs; lower flat_width "
            f"(e.g. flat_width={_smaller(width)}), train more epochs, or ask for a sparsity with "
            "scheduler=target target_sparsity=0.9")


def _smaller(width: Any) -> str:
    """A tenth of ``width`` as a short number (0.5 -> 0.05): a try that prunes far less."""
    try:
        return f"{float(width) / 10:.3g}"
    except (TypeError, ValueError):
        return "<smaller>"


def fully_pruned(record: Mapping[str, Any], cfg: Any) -> str | None:
    """The warning for an epoch that ends with every pruned weight at zero, else None."""
    sparsity = record.get("sparsity")
    if sparsity is None or sparsity < 1.0:
        return None
    return f"every weight is pruned (sparsity 1.0) at epoch {record.get('epoch')}: {pruning_fix(cfg)}"


def over_pruned(record: Mapping[str, Any], cfg: Any) -> str | None:
    """The warning for an epoch at chance with sparsity above `OVER_PRUNED_SPARSITY`, else None."""
    sparsity, acc = record.get("sparsity"), record.get("test_acc1")
    num_classes = int(_get(cfg, "dataset.num_classes", 0))
    if sparsity is None or sparsity <= OVER_PRUNED_SPARSITY or not _chance(record, num_classes):
        return None
    return (f"over-pruned: sparsity {sparsity:.4f} with test_acc1 {acc:.4f} at chance (1/{num_classes}) "
            f"at epoch {record.get('epoch')}: {pruning_fix(cfg)}")


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

    A fully pruned or over-pruned network is also at chance; then only the pruning warning is
    given (its fix is the one that helps, not a lower lr).
    """
    pruned = fully_pruned(record, cfg) or over_pruned(record, cfg)
    if pruned is not None:
        return [pruned]
    found = [never_pruned(record, cfg), at_chance(record, cfg, previous)]
    return [warning for warning in found if warning is not None]


def accuracy_fell_while_pruning(history: Sequence[Mapping[str, Any]], cfg: Any) -> str | None:
    """The warning for a run whose last epoch's test top-1 is more than `FALL_MIN` below its most
    accurate epoch while its sparsity is more than `RISE_MIN` above that epoch's, else None."""
    scored = [r for r in history if r.get("test_acc1") is not None and r.get("sparsity") is not None]
    if len(scored) < 2:
        return None
    last = scored[-1]
    peak = max(scored, key=lambda r: r["test_acc1"])  # the first of equal bests
    fell = peak["test_acc1"] - last["test_acc1"]
    rose = last["sparsity"] - peak["sparsity"]
    if fell <= FALL_MIN or rose <= RISE_MIN:
        return None
    return (f"over-pruned: test_acc1 fell from {peak['test_acc1']:.4f} at epoch {peak.get('epoch')} "
            f"(sparsity {peak['sparsity']:.4f}) to {last['test_acc1']:.4f} at epoch {last.get('epoch')} "
            f"(sparsity {last['sparsity']:.4f}): {pruning_fix(cfg)}")


def diagnose_run(history: Sequence[Mapping[str, Any]], cfg: Any) -> list[str]:
    """One-line warnings about a finished run from its epochs' records (``metrics.jsonl``), beyond
    those of its last epoch: accuracy that fell while sparsity rose. A last epoch already warned
    about as pruned or at chance gets no second warning."""
    if not history or history[-1].get("warnings"):
        return []
    fell = accuracy_fell_while_pruning(history, cfg)
    return [fell] if fell is not None else []
