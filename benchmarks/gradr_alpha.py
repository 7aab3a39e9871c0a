"""Grad R's prior α chosen per wanted sparsity S, for ``benchmarks/target_frontier.py gradr``.

Grad R reaches its sparsity through the threshold μ (``flat_width``) and the prior α
(``alpha_gr``), not through S, so a comparison at equal sparsity first searches α for each S on
one seed: the next α is interpolated from the runs that bracket S, log α linear in log(1 − S)
(the reached connectivity falls about as a power of α), or stepped by ``factor`` out of the
tried range until S is bracketed. The α whose run ended closest to S is then trained on every
seed. Written here because the rule is a few lines over runs the benchmark already reads; an
Optuna study would spend trials on exploring where one interpolation per step suffices.
"""

from __future__ import annotations

import math


def rounded(alpha: float) -> float:
    """α to 3 significant digits: the same α is the same run directory and Hydra override."""
    return float(f"{alpha:.3g}")


def next_alpha(tried: list[tuple[float, float]], target: float, start: float, factor: float = 3.0) -> float:
    """The α to try next for ``target`` sparsity, given ``tried`` (α, reached sparsity) runs.

    No run yet: ``start``. Runs on both sides of ``target``: the closest one below and the closest
    one above, log α interpolated linearly in log(1 − sparsity), or halved in log α where the one
    above pruned every weight (sparsity 1: its log(1 − sparsity) is not finite). All below: the largest α below
    times ``factor``; all above: the smallest α above divided by it.
    """
    if not tried:
        return rounded(start)
    below = [(s, a) for a, s in tried if s < target]
    above = [(s, a) for a, s in tried if s >= target]
    if not above:
        return rounded(max(a for _, a in below) * factor)
    if not below:
        return rounded(min(a for _, a in above) / factor)
    (s_lo, a_lo), (s_hi, a_hi) = max(below), min(above)
    if s_hi >= 1.0:  # nothing left: log(1 - S) has no value there, so halve the bracket in log alpha
        share = 0.5
    else:
        x_lo, x_hi, x = (math.log1p(-v) for v in (s_lo, s_hi, target))
        share = 0.5 if x_hi == x_lo else (x - x_lo) / (x_hi - x_lo)
    return rounded(math.exp(math.log(a_lo) + share * (math.log(a_hi) - math.log(a_lo))))


def closest(tried: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The (α, sparsity) run that ended closest to ``target`` (the smaller α on a tie)."""
    return min(tried, key=lambda run: (abs(run[1] - target), run[0]))

