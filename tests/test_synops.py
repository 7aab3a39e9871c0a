"""SynOps, MACs and firing rates against hand-computed counts (`stds.run.measure.synops`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn

from stds.method.sparse import set_threshold, sparsify
from stds.run.measure.synops import FiringRates, count_synops, is_spike_tensor


class Wrap(nn.Module):
    """A model of one multi-step layer fed ``[T, N, ...]`` directly (count with ``samples=N``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.inner(x_seq)


def _conv_2x2() -> nn.Module:
    conv = layer.Conv2d(1, 2, 2, bias=False, step_mode="m")
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 9.0).reshape(2, 1, 2, 2))
    return conv


def _conv_spikes() -> torch.Tensor:
    """[T=2, N=1, 1, 3, 3]: step 0 spikes at (1, 1) and (0, 0); step 1 a spike at (2, 1)."""
    x = torch.zeros(2, 1, 1, 3, 3)
    x[0, 0, 0, 1, 1] = 1
    x[0, 0, 0, 0, 0] = 1
    x[1, 0, 0, 2, 1] = 1
    return x


def test_conv_dense_counts_spikes_times_fan_out_within_the_border():
    # output 2x2 per channel. (1,1) reaches 4 positions x 2 channels = 8; (0,0) only output
    # (0,0): 2; (2,1) only output row 1, columns 0 and 1: 2 x 2 = 4. Total 14 over T.
    counts = count_synops(Wrap(_conv_2x2()), _conv_spikes(), samples=1)
    assert counts["synops"] == 14
    assert counts["synops_layers"] == {"inner": 14}
    assert counts["first_layer_macs"] == 0 and counts["macs"] == 0


def test_conv_pruned_ignores_zero_weights():
    conv = _conv_2x2()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 0  # channel 0, kernel position (0, 0)
        conv.weight[1, 0, 1, 1] = 0  # channel 1, kernel position (1, 1)
    # (1,1) meets every kernel position once per channel: 8 - 2 = 6; (0,0) meets only
    # position (0, 0): channel 1 alone = 1; (2,1) meets positions (1, 1) and (1, 0):
    # channel 0 both, channel 1 only (1, 0) = 3. Total 10.
    assert count_synops(Wrap(conv), _conv_spikes(), samples=1)["synops"] == 10


def test_conv_with_padding_and_a_pruned_centre():
    conv = layer.Conv2d(1, 1, 3, padding=1, bias=False, step_mode="m")
    nn.init.constant_(conv.weight, 0.5)
    x = torch.zeros(1, 1, 1, 2, 2)
    x[0, 0, 0, 0, 0] = 1  # reaches the 4 outputs through kernel positions (1,1) (1,0) (0,1) (0,0)
    assert count_synops(Wrap(conv), x, samples=1)["synops"] == 4
    with torch.no_grad():
        conv.weight[0, 0, 1, 1] = 0
    assert count_synops(Wrap(conv), x, samples=1)["synops"] == 3
    with torch.no_grad():
        conv.weight[0, 0, 2, 2] = 0  # never used by this spike
    assert count_synops(Wrap(conv), x, samples=1)["synops"] == 3


def test_grouped_conv_counts_each_group_with_its_own_weights():
    conv = layer.Conv2d(2, 4, 1, groups=2, bias=False, step_mode="m")
    nn.init.constant_(conv.weight, 1.0)
    with torch.no_grad():
        conv.weight[0] = 0  # group 0 keeps 1 of its 2 output channels
    x = torch.zeros(1, 1, 2, 1, 1)
    x[0, 0, 0] = 1  # one spike into group 0
    x[0, 0, 1] = 1  # one spike into group 1
    assert count_synops(Wrap(conv), x, samples=1)["synops"] == 1 + 2


def test_transposed_conv_counts_every_weight_a_spike_meets():
    conv = nn.ConvTranspose2d(1, 2, 2, bias=False)  # a spike meets all 2 x 2 x 2 weights
    nn.init.constant_(conv.weight, 1.0)
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 1, 0] = 1
    assert count_synops(conv, x)["synops"] == 8
    with torch.no_grad():
        conv.weight[0, 1, 0, 0] = 0  # weight [in, out, kh, kw]: output channel 1 loses one
    assert count_synops(conv, x)["synops"] == 7


def test_large_spike_counts_are_counted_exactly():
    # 2**24 + 1 is not a float32 number: the count must not go through float32
    conv = nn.Conv2d(1, 3, 1, bias=False).double()
    nn.init.constant_(conv.weight, 1.0)
    with torch.no_grad():
        conv.weight[2] = 0
    x = torch.full((1, 1, 1, 1), 2.0**24 + 1, dtype=torch.float64)
    assert count_synops(conv, x)["synops"] == 2 * (2**24 + 1)


def _linear(bias: bool) -> nn.Module:
    fc = layer.Linear(3, 4, bias=bias, step_mode="m")
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0, 2], [0, 0, 3], [4, 0, 0], [5, 6, 0]]))
        if bias:
            fc.bias.fill_(0.5)
    return fc


def _linear_spikes() -> torch.Tensor:
    """[T=2, N=2, 3]; spikes into inputs 0, 1, 2: 2, 1, 2."""
    return torch.tensor([[[1.0, 1, 0], [0, 0, 1]], [[1, 0, 1], [0, 0, 0]]])


@pytest.mark.parametrize("bias", [True, False])  # addmm and mm
def test_linear_pruned_and_dense(bias):
    fc = _linear(bias)
    # non-zero weights per input column: 3, 1, 2 -> 2*3 + 1*1 + 2*2 = 11 over 2 samples
    counts = count_synops(Wrap(fc), _linear_spikes(), samples=2)
    assert counts["synops"] == 5.5 and counts["samples"] == 2
    with torch.no_grad():
        fc.weight.fill_(0.1)
    assert count_synops(Wrap(fc), _linear_spikes(), samples=2)["synops"] == (2 + 1 + 2) * 4 / 2


def test_gmp_masked_weights_are_not_counted():
    from stds.method.gmp import MagnitudePruningSchedule

    fc = layer.Linear(3, 4, bias=False, step_mode="m")
    with torch.no_grad():
        fc.weight.copy_(torch.arange(1.0, 13.0).reshape(4, 3))
    sparsify(fc, "gmp")
    MagnitudePruningSchedule(0.5, total_steps=1, ramp="linear", every=1).attach(fc).step(1)
    # the 6 smallest |w| (rows 0 and 1) masked: 2 non-zero weights per input column, spikes 2, 1, 2
    assert count_synops(Wrap(fc), _linear_spikes(), samples=2)["synops"] == (2 * 2 + 1 * 2 + 2 * 2) / 2


def test_non_contiguous_input_takes_another_path_and_counts_the_same():
    fc = _linear(bias=True)
    x = _linear_spikes().transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not x.is_contiguous()
    assert count_synops(Wrap(fc), x, samples=2)["synops"] == 5.5


def test_spike_counts_above_one_count_as_several_spikes():
    fc = _linear(bias=False)
    x = torch.tensor([[[2.0, 0, 0]]])  # two spikes into input 0 (e.g. a SEW ADD junction)
    assert count_synops(Wrap(fc), x, samples=1)["synops"] == 2 * 3


def test_analog_input_is_counted_as_macs_with_non_zero_weights():
    fc = _linear(bias=False)
    x = torch.full((1, 5, 3), 0.25)  # T=1, 5 samples, not spikes
    counts = count_synops(Wrap(fc), x, samples=5)
    assert counts["synops"] == 0
    assert counts["macs"] == 6 * 5 / 5  # 6 non-zero weights per row
    assert counts["first_layer_macs"] == 6.0
    assert counts["macs_layers"] == {"inner": 6.0} and counts["synops_layers"] == {}


def test_analog_conv_macs_count_every_output_position():
    conv = layer.Conv2d(1, 2, 2, bias=False, step_mode="m")
    nn.init.constant_(conv.weight, 1.0)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 0  # 7 non-zero weights
    x = torch.full((1, 3, 1, 3, 3), -0.5)  # 3 samples, output 2x2
    assert count_synops(Wrap(conv), x, samples=3)["first_layer_macs"] == 7 * 4


def test_is_spike_tensor():
    assert is_spike_tensor(torch.tensor([0.0, 1.0, 2.0]))
    assert is_spike_tensor(torch.tensor([True, False]))
    assert not is_spike_tensor(torch.tensor([0.0, 0.5]))
    assert not is_spike_tensor(torch.tensor([0.0, -1.0]))


class Tiny(nn.Module):
    """The models' layout in miniature: a static stem, T=2 steps of IF neurons, an fc, mean."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 1, 1, bias=False)
        self.sn = neuron.IFNode(v_threshold=1.0, v_reset=0.0, step_mode="m")
        self.fc = layer.Linear(4, 2, bias=False, step_mode="m")
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 1, 1], [0, 0, 2, 1]]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images).flatten(1)  # [N, 4]
        spikes = self.sn(x.unsqueeze(0).repeat(2, 1, 1))  # [T=2, N, 4]
        return self.fc(spikes).mean(0)


def _tiny_images() -> torch.Tensor:
    # IF, threshold 1, hard reset: 1.0 -> 2 spikes, 0.6 -> 1 (at step 2), 0.3 -> 0, 1.5 -> 2
    return torch.tensor([1.0, 0.6, 0.3, 1.5]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)


def test_model_with_analog_stem_spiking_layer_and_pruned_fc():
    model = Tiny()
    counts = count_synops(model, _tiny_images())
    # fc: non-zero weights per input column 1, 0, 2, 2; spikes 2, 1, 0, 2 -> 2 + 0 + 0 + 4
    assert counts["synops"] == 6.0
    assert counts["synops_layers"] == {"fc": 6.0}
    # stem: 1 weight x 4 output positions, run once on the static image (not per step)
    assert counts["first_layer_macs"] == 4.0 and counts["macs_layers"] == {"stem": 4.0}
    assert counts["firing_rates"] == {"sn": 5 / 8}
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    assert count_synops(model, _tiny_images())["synops"] == 5 * 2


def test_counts_go_through_the_reparameterization():
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.05, 1, 1], [0.05, 0.05, 2, 1]]))
    sparsify(model, "st", d=0.0, exclude=("stem",))
    assert count_synops(model, _tiny_images())["synops"] == 5 * 2  # every weight is non-zero
    set_threshold(model, 0.1)  # w = sign(θ) max(|θ| - 0.1, 0): the 0.05 entries become 0
    assert count_synops(model, _tiny_images())["synops"] == 6.0


def test_counts_are_the_same_under_bfloat16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts = count_synops(Tiny(), _tiny_images())
    assert counts["synops"] == 6.0 and counts["first_layer_macs"] == 4.0


def test_neuron_state_is_reset_before_and_after():
    model = Tiny()
    model(_tiny_images())  # leaves membrane potentials behind
    assert count_synops(model, _tiny_images())["synops"] == 6.0
    assert count_synops(model, _tiny_images())["synops"] == 6.0


def test_firing_rates_over_an_evaluation_loop_skip_the_counting_pass():
    model = Tiny()
    with torch.no_grad(), FiringRates(model) as rates:
        model(_tiny_images())
        functional.reset_net(model)
        count_synops(model, _tiny_images())  # not recorded by the monitor
        model(torch.zeros(2, 1, 2, 2))  # no spikes
        functional.reset_net(model)
        assert rates.rates() == {"sn": 5 / 16}
    model(_tiny_images())  # after the block: no hooks left
    assert rates.rates() == {"sn": 5 / 16}
    assert not model.sn._forward_hooks


def _brute_force(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """SynOps per layer from the captured spike inputs: the full convolution with the mask."""
    found: dict[str, float] = {}

    def hook(name):
        def record(module, args, output):
            x, w = args[0], (module.weight != 0).double()
            if isinstance(module, nn.Conv2d):
                x = x.flatten(0, 1).double()
                total = F.conv2d(x, w, None, module.stride, module.padding).sum()
            else:
                total = (x.double() @ w.t()).sum()
            found[name] = float(total) / images.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (layer.Conv2d, layer.Linear))]
    with torch.no_grad():
        model(images)
    functional.reset_net(model)
    for handle in handles:
        handle.remove()
    return found


def test_digits_net_agrees_with_a_brute_force_count():
    from stds.models import DigitsNet

    torch.manual_seed(0)
    model = DigitsNet(T=3, channels=(8, 8, 8)).eval()
    with torch.no_grad():  # larger weights, so that every spiking layer fires
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(8)
    sparsify(model, "st", d=0.0)
    set_threshold(model, 0.5)  # prunes 20 to 50 % of each layer
    images = 2 * torch.randn(5, 1, 8, 8)
    counts = count_synops(model, images)
    expected = _brute_force(model, images)
    assert counts["synops_layers"] == pytest.approx(expected, rel=0, abs=1e-9)
    assert min(expected.values()) > 0  # every layer sees spikes
    assert counts["synops"] == pytest.approx(sum(expected.values()), abs=1e-9)
    stem = model.stem[0]
    assert counts["first_layer_macs"] == int((stem.weight != 0).sum()) * 8 * 8
