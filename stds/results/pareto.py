"""Pareto fronts and constraints of a search, on plain numbers (no files, no Optuna).

A point is on the front when no other point is at least as good in every objective and better in
one. The report reads finished trials from their run directories, not from the study's database
(which may be on another machine), so it cannot ask Optuna's study for its best trials; the test
is a few lines over at most a few hundred trials, written here for that reason.

Constraints (`Bound`, `constraint_values`: `stds.run.measure.objectives`, which the trials use to
tell the study) follow Optuna's convention (``constraints_func``): one value per bound, feasible when
every value is <= 0. A bound ``min`` asks for ``value >= min`` (``min - value <= 0``), a bound
``max`` for ``value <= max`` (``value - max <= 0``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from stds.run.measure.objectives import Bound, constraint_values

__all__ = ["Bound", "constraint_values", "dominates", "feasible", "pareto_mask"]


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, up in zip(a, b, maximize, strict=True):
        gain = x - y if up else y - x
        if gain < 0:
            return False
        better = better or gain > 0
    return better


def pareto_mask(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point dominates it (equal points are all on the front)."""
    return [not any(dominates(other, point, maximize) for other in points) for point in points]


def feasible(values: Mapping[str, float | None], bounds: Mapping[str, Bound]) -> bool:
    """Whether every bound holds."""
    return all(v <= 0 for v in constraint_values(values, bounds))
