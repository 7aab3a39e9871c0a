"""Threshold schedules at hand-computed points, including past the end of training."""

from __future__ import annotations

import pytest
from torch import nn

from stds.method.schedule import SCHEDULES, ThresholdSchedule, threshold_at, register_schedule
from stds.method.sparse import get_flat_width, sparsify

FINAL = 0.8
TOTAL = 4
# steps 0..4 are x = 0, 1/4, 1/2, 3/4, 1; steps 6 and 400 are past the end (x capped at 1)
STEPS = [0, 1, 2, 3, 4, 6, 400]
EXPECTED = {
    "constant": [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
    "linear": [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8],
    # 0.8 * (1 + sin(pi (x - 1/2))) / 2: (1 -+ sqrt(2)/2) / 2 = 0.1464466 / 0.8535534 at 1/4, 3/4
    "sine": [0.0, 0.11715729, 0.4, 0.68284271, 0.8, 0.8, 0.8],
}


@pytest.mark.parametrize("kind", ["constant", "linear", "sine"])
def test_schedule_values(kind: str) -> None:
    got = [threshold_at(step, TOTAL, FINAL, kind) for step in STEPS]
    assert got == pytest.approx(EXPECTED[kind], abs=1e-8)


@pytest.mark.parametrize("kind", ["constant", "linear", "sine"])
def test_schedule_reaches_final_exactly_and_never_overshoots(kind: str) -> None:
    assert threshold_at(1000, 1000, 0.3, kind) == 0.3
    assert max(threshold_at(s, 1000, 0.3, kind) for s in range(0, 2001, 7)) <= 0.3


def test_sine_is_monotone_and_symmetric() -> None:
    values = [threshold_at(s, 100, 1.0, "sine") for s in range(101)]
    assert values == sorted(values)
    assert values[25] + values[75] == pytest.approx(1.0)


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="constant, cubic, linear, sine"):
        threshold_at(0, 10, 0.1, "cosine")


@pytest.mark.parametrize(
    ("step", "total", "final", "match"),
    [(0, 0, 0.1, "total_steps"), (0, -5, 0.1, "total_steps"), (-1, 10, 0.1, "^step must"),
     (0, 10, -0.1, "flat_width")],
)
def test_invalid_arguments(step: int, total: int, final: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        threshold_at(step, total, final, "linear")


def test_register_schedule_adds_a_kind() -> None:
    @register_schedule("test_square")
    def square(x: float) -> float:
        return x * x

    try:
        assert SCHEDULES["test_square"] is square
        assert threshold_at(1, 2, 0.8, "test_square") == pytest.approx(0.2)
        assert threshold_at(5, 2, 0.8, "test_square") == pytest.approx(0.8)
        with pytest.raises(ValueError, match="already registered"):
            register_schedule("test_square")(square)
    finally:
        del SCHEDULES["test_square"]


def test_fraction_is_clipped() -> None:
    register_schedule("test_overshoot")(lambda x: 2 * x - 0.5)
    try:
        assert threshold_at(0, 4, 0.8, "test_overshoot") == 0.0
        assert threshold_at(3, 4, 0.8, "test_overshoot") == 0.8
    finally:
        del SCHEDULES["test_overshoot"]


def test_threshold_schedule_sets_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    sparsify(model, "stmod", 0.0)
    schedule = ThresholdSchedule(final=0.5, total_steps=4, kind="linear").attach(model)
    assert schedule.step(1) == 0.125
    assert get_flat_width(model) == 0.125
    assert schedule.step(10) == 0.5
    assert get_flat_width(model) == 0.5
    with pytest.raises(ValueError, match="unknown schedule"):
        ThresholdSchedule(final=0.5, total_steps=4, kind="nope")
