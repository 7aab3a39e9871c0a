"""``lr_scheduler=hold_cosine``: the learning rate constant over the ramp, then a cosine to a floor
over the hold, checked against the formula by hand, through the real config, and on resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stds.errors import ConfigError
from stds.run.setup.config import instantiate_node
from stds.run.setup.lr import HoldCosine
from tests.conftest import compose_train, run_history, run_metrics, whole_and_split


def test_factor_by_hand() -> None:
    factor = HoldCosine(epochs=30, start=0.5, floor=0.1)  # the hold starts after epoch 15
    assert [factor(e) for e in (0, 1, 14, 15)] == [1.0, 1.0, 1.0, 1.0]
    # 5 of the hold's 15 epochs: cos(π/3) = 1/2, so 0.1 + 0.9 · 3/4
    assert factor(20) == pytest.approx(0.775, abs=1e-12)
    assert factor(25) == pytest.approx(0.1 + 0.9 * 0.25, abs=1e-12)  # cos(2π/3) = −1/2
    assert factor(30) == pytest.approx(0.1, abs=1e-12)


def test_factor_with_a_hold_that_starts_inside_an_epoch() -> None:
    factor = HoldCosine(epochs=30, start=0.35)  # e0 = 10.5, floor 0
    assert factor(10) == 1.0
    assert factor(11) == pytest.approx((1 + math.cos(math.pi * 0.5 / 19.5)) / 2, abs=1e-12)
    assert factor(30) == pytest.approx(0.0, abs=1e-12)
    assert all(HoldCosine(epochs=30, start=1.0)(e) == 1.0 for e in range(31))  # no hold


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"epochs": 30, "start": 0.5, "floor": 1.5}, "lr_scheduler.lr_lambda.floor=1.5"),
    ({"epochs": 30, "start": 0.5, "floor": -0.1}, "lr_scheduler.lr_lambda.floor=-0.1"),
    ({"epochs": 30, "start": 0.0}, "lr_scheduler.lr_lambda.start=0.0"),
    ({"epochs": 0, "start": 0.5}, "lr_scheduler.lr_lambda.epochs=0")])
def test_bad_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        HoldCosine(**kwargs)


def test_the_config_anneals_over_the_scheduler_hold() -> None:
    cfg = compose_train("epochs=8", "lr=0.01", "scheduler=target", "target_sparsity=0.9",
                        "scheduler.ramp_until=0.25", "lr_scheduler=hold_cosine", "lr_scheduler.lr_lambda.floor=0.2")
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=cfg.lr)
    scheduler = instantiate_node(cfg.lr_scheduler, "lr_scheduler")(optimizer=optimizer)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # the hold starts after epoch 0.25 · 8 = 2 and lasts 6 epochs: 0.01 · (0.2 + 0.8 · (1 + cos(π(e − 2)/6)) / 2)
    expected = [0.01] * 3 + [0.01 * (0.2 + 0.8 * (1 + math.cos(math.pi * (e - 2) / 6)) / 2) for e in range(3, 9)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[5] == pytest.approx(0.01 * (0.2 + 0.8 * 0.5), rel=1e-12)  # half the hold: cos(π/2) = 0


def test_bad_floor_in_the_config_is_one_line_naming_the_key() -> None:
    cfg = compose_train("lr_scheduler=hold_cosine", "lr_scheduler.lr_lambda.floor=2")
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigError, match=r"lr_scheduler\.lr_lambda\.floor=2"):
        instantiate_node(cfg.lr_scheduler, "lr_scheduler")(optimizer=optimizer)


def test_state_dict_holds_plain_numbers_and_restores_the_factor(tmp_path) -> None:
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, HoldCosine(epochs=4, start=0.5, floor=0.25))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "lr.pt")
    fresh_optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=1.0)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, HoldCosine(epochs=4, start=0.5, floor=0.25))
    fresh.load_state_dict(torch.load(tmp_path / "lr.pt", weights_only=True))
    fresh_optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr() == [pytest.approx(0.25)]  # e = 4: the floor


@pytest.mark.slow
def test_digits_run_resumed_in_the_hold_ends_as_the_uninterrupted_one(tiny_cfg, tmp_path, monkeypatch) -> None:
    # 3 epochs of 22 steps, the hold after epoch 1.5: killed after step 50 (last checkpoint at 49,
    # in epoch 3, which trains at the annealed rate 0.1 + 0.9 · (1 + cos(π · 0.5 / 1.5)) / 2 of lr)
    overrides = ("scheduler=target", "target_sparsity=0.8", "epochs=3", "checkpoint_every_steps=7",
                 "scheduler.ramp_until=0.5", "lr_scheduler=hold_cosine", "lr_scheduler.lr_lambda.floor=0.1")
    whole, split = whole_and_split(tiny_cfg(*overrides), tmp_path, monkeypatch, 50)
    assert split["schedule"] == whole["schedule"] and split["lr_scheduler"] == whole["lr_scheduler"]
    lrs = [record["lr"] for record in run_history(tmp_path / "split")]
    assert lrs == pytest.approx([2e-3, 2e-3 * (0.1 + 0.9 * 0.75), 2e-3 * 0.1], rel=1e-12)
    assert run_metrics(tmp_path / "split")["test_acc1"] == run_metrics(tmp_path / "whole")["test_acc1"]
