"""``energy_uj``: the formula by hand, our SynOps against SpikingJelly's own ``SynOpCounter`` on the
same net and inputs (equal on dense weights; larger there by exactly the spikes that meet pruned
zeros), and a run whose metrics, report column and plot carry it."""

from __future__ import annotations

import csv
import json
from functools import partial

import pytest
import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter
from torch import nn

from stds.models import DigitsNet, make_neuron
from stds.run.measure.energy import energy_uj
from stds.run.measure.synops import count_synops, synop_rules
from tests.conftest import TINY, compose_train


def test_energy_is_ac_times_synops_plus_mac_times_first_layer_macs():
    assert energy_uj(1000.0, 200.0) == pytest.approx((0.9 * 1000 + 4.6 * 200) / 1e6)  # 1.82e-3 µJ
    assert energy_uj(1000.0, 200.0, ac_pj=2.0, mac_pj=1.0) == pytest.approx(2.2e-3)
    assert energy_uj(None, 200.0) is None and energy_uj(1.0, None) is None


def _counted(layer: nn.Module, spikes: torch.Tensor, rules: dict | None) -> int:
    counter = SynOpCounter(extra_rules=rules)
    with torch.no_grad(), DispatchCounterMode([counter]):
        layer(spikes)
    return int(counter.get_total())


@pytest.mark.parametrize("layer", [nn.Linear(12, 5, bias=False), nn.Conv2d(2, 4, 3, padding=1, bias=False)])
def test_spikingjelly_counts_pruned_zeros_and_we_do_not(layer):
    torch.manual_seed(0)
    spikes = (torch.rand(3, 12) if isinstance(layer, nn.Linear) else torch.rand(3, 2, 6, 6)) < 0.3
    spikes = spikes.float()
    assert _counted(layer, spikes, None) == _counted(layer, spikes, synop_rules())  # dense: the same
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) > 0.5).float())
    # the same layer with weight 1 exactly where it is 0: it counts the spikes that meet zeros
    zeros_met = type(layer)(*([12, 5] if isinstance(layer, nn.Linear) else [2, 4, 3]), bias=False,
                            **({} if isinstance(layer, nn.Linear) else {"padding": 1}))
    with torch.no_grad():
        zeros_met.weight.copy_((layer.weight == 0).float())
    ours, theirs = _counted(layer, spikes, synop_rules()), _counted(layer, spikes, None)
    assert theirs - ours == _counted(zeros_met, spikes, synop_rules()) > 0


def test_on_a_dense_digits_net_our_synops_are_spikingjellys():
    torch.manual_seed(0)
    model = DigitsNet(T=4, in_channels=1, num_classes=10, image_size=8, channels=[8, 16, 16],
                      neuron=partial(make_neuron, kind="lif", backend="torch")).eval()
    images = torch.rand(2, 1, 8, 8) * 8  # bright enough to spike
    ours = count_synops(model, images)
    functional.reset_net(model)
    counter = SynOpCounter()
    with torch.no_grad(), DispatchCounterMode([counter]):
        model(images)
    functional.reset_net(model)
    assert ours["synops"] > 0 and ours["synops"] * 2 == counter.get_total()  # ours is per sample
    assert ours["first_layer_macs"] == 8 * 9 * 64  # 8 filters of 3x3 on 8x8, padded: 4608 per image


@pytest.mark.slow
def test_a_run_writes_energy_and_the_report_shows_and_plots_it(tmp_path):
    from stds.results.sweep import collect_runs, write_report
    from stds.run.life.trainer import train

    train(compose_train(*TINY, "logging.synops=true", "logging.energy_ac_pj=2.0", "flat_width=0.05"),
          tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["energy_uj"] == pytest.approx((2.0 * metrics["synops"] + 4.6 * metrics["first_layer_macs"]) / 1e6)
    paths = write_report(collect_runs([tmp_path / "run"]), tmp_path / "report")
    row = next(csv.DictReader(paths["csv"].open()))
    assert float(row["energy_uj"]) == pytest.approx(metrics["energy_uj"])
    assert paths["energy_png"].stat().st_size > 0 and "report_energy.png" in paths["md"].read_text()


def test_first_layer_macs_against_spikingjellys_mac_counter():
    """On the analog stem: SpikingJelly's ``MACCounter`` and ours agree on dense weights; with pruned
    zeros it counts each zero weight once per output position too (zero padding included)."""
    from spikingjelly.activation_based.op_counter import MACCounter

    from stds.run.measure.synops import mac_rules

    torch.manual_seed(0)
    conv, images = nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.rand(2, 1, 8, 8)

    def counted(rules):
        counter = MACCounter(extra_rules=rules)
        with torch.no_grad(), DispatchCounterMode([counter]):
            conv(images)
        return int(counter.get_total())

    assert counted(None) == counted(mac_rules()) == 2 * 8 * 9 * 64  # 2 images, 8 filters of 3x3 at 64 positions
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.5).float())
    zeros = int((conv.weight == 0).sum())
    assert counted(None) - counted(mac_rules()) == zeros * 64 * 2 > 0
