"""Threshold schedules at hand-computed points, including past the end of training."""

from __future__ import annotations

import pytest
from torch import nn

from stds.method.schedule import SCHEDULES, ThresholdSchedule, register_schedule, threshold_at, unregister_schedule
from tests.conftest import model_d
from stds.method.sparse import sparsify

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
        unregister_schedule("test_square")


def test_fraction_is_clipped() -> None:
    register_schedule("test_overshoot")(lambda x: 2 * x - 0.5)
    try:
        assert threshold_at(0, 4, 0.8, "test_overshoot") == 0.0
        assert threshold_at(3, 4, 0.8, "test_overshoot") == 0.8
    finally:
        unregister_schedule("test_overshoot")


def test_threshold_schedule_sets_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    sparsify(model, "stmod", 0.0)
    schedule = ThresholdSchedule(final=0.5, total_steps=4, kind="linear").attach(model)
    assert schedule.step(1) == 0.125
    assert model_d(model) == 0.125
    assert schedule.step(10) == 0.5
    assert model_d(model) == 0.5
    with pytest.raises(ValueError, match="unknown schedule"):
        ThresholdSchedule(final=0.5, total_steps=4, kind="nope")


# cubic: 0.8 * (1 - (1 - x)^3) at x = 1/4, 1/2, 3/4 of 8 steps: 0.8 * (0.578125, 0.875, 0.984375)
def test_cubic_by_hand() -> None:
    got = [threshold_at(step, 8, FINAL, "cubic") for step in (0, 2, 4, 6, 8, 12)]
    assert got == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8], abs=1e-12)


# ramp_until: x = step / (ramp_until * total_steps), capped at 1
@pytest.mark.parametrize(("kind", "ramp_until", "steps", "expected"), [
    ("linear", 0.5, [0, 1, 2, 3, 4, 5, 8], [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8]),   # ramp over 4 of 8
    ("sine", 0.75, [0, 3, 6, 7, 8], [0.0, 0.4, 0.8, 0.8, 0.8]),                    # x = 1/2 at step 3 of 6
    ("cubic", 0.5, [0, 1, 2, 4, 6], [0.0, 0.8 * 0.578125, 0.8 * 0.875, 0.8, 0.8]),   # x = 1/4, 1/2 of 4
    ("linear", 0.3, [0, 3, 6, 9, 10], [0.0, 0.08, 0.16, 0.24, 0.24]),              # 9 = 0.3 * 30 steps
])
def test_ramp_until_by_hand(kind: str, ramp_until: float, steps: list[int], expected: list[float]) -> None:
    final = 0.24 if ramp_until == 0.3 else FINAL
    total = 30 if ramp_until == 0.3 else 8
    got = [threshold_at(step, total, final, kind, ramp_until) for step in steps]
    assert got == pytest.approx(expected, abs=1e-12)


def _old_threshold_at(step: int, total_steps: int, final: float, kind: str) -> float:
    """The rule before ramp_until, written out: final · clip(f(min(step / total_steps, 1)))."""
    return final * min(max(SCHEDULES[kind](min(step / total_steps, 1.0)), 0.0), 1.0)


@pytest.mark.parametrize("kind", ["constant", "linear", "sine", "cubic"])
@pytest.mark.parametrize(("total", "final"), [(1320, 0.5), (7, 0.3), (97, 1.7)])
def test_ramp_until_one_is_bit_identical_to_the_old_rule(kind: str, total: int, final: float) -> None:
    schedule = ThresholdSchedule(final, total, kind)
    assert schedule.ramp_until == 1.0
    for step in range(total + 5):
        old = _old_threshold_at(step, total, final, kind)
        assert threshold_at(step, total, final, kind, 1.0) == old  # ==: bit for bit, no tolerance
        assert schedule.at(step) == old


@pytest.mark.parametrize("kind", ["linear", "sine", "cubic"])
def test_d_is_constant_after_ramp_until(kind: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    sparsify(model, "stmod", 0.0)
    schedule = ThresholdSchedule(final=0.5, total_steps=100, kind=kind, ramp_until=0.6).attach(model)
    ds = [schedule.step(step) for step in range(101)]
    assert ds[:61] == sorted(ds[:61]) and ds[59] < 0.5
    assert ds[60:] == [0.5] * 41  # reached at step 60 = 0.6 * 100 and held to the end
    assert model_d(model) == 0.5
    assert not schedule.holding(60) and schedule.holding(61)


@pytest.mark.parametrize("bad", [0.0, 1.5, float("nan"), -0.2])
def test_bad_ramp_until_is_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="ramp_until must lie in"):
        threshold_at(0, 10, 0.1, "linear", bad)
    with pytest.raises(ValueError, match="ramp_until must lie in"):
        ThresholdSchedule(final=0.1, total_steps=10, kind="sine", ramp_until=bad)


@pytest.mark.parametrize("scheduler", ["scheduler=sine", "scheduler=cubic", "scheduler=target"])
@pytest.mark.parametrize("bad", ["0", "1.5", "nan"])
def test_bad_ramp_until_in_the_config_is_one_line_naming_the_key(tiny_cfg, scheduler: str, bad: str) -> None:
    from stds.errors import ConfigError
    from stds.run.setup.config import validate

    extra = ("target_sparsity=0.9",) if scheduler == "scheduler=target" else ()
    with pytest.raises(ConfigError, match=r"^scheduler\.ramp_until=") as raised:
        validate(tiny_cfg(scheduler, *extra, f"scheduler.ramp_until={bad}"))
    assert "\n" not in str(raised.value) and "(0, 1]" in str(raised.value)


def test_the_config_builds_ramp_until_and_cubic(tiny_cfg) -> None:
    from stds.run.setup.build import build_threshold_schedule
    from stds.run.setup.config import validate

    cfg = tiny_cfg("scheduler=cubic", "scheduler.ramp_until=0.5", "flat_width=0.4")
    validate(cfg)
    schedule = build_threshold_schedule(cfg, total_steps=8)
    assert (schedule.kind, schedule.ramp_until) == ("cubic", 0.5)
    assert [schedule.at(s) for s in (2, 4, 7)] == pytest.approx([0.4 * 0.875, 0.4, 0.4], abs=1e-12)
    assert build_threshold_schedule(tiny_cfg(), 8).ramp_until == 1.0  # sine, as before
