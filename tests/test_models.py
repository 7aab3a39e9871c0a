"""Spiking models: shapes, block semantics, the static stem, weight counts, neurons, configs.

Every expected number here is computed by hand in a comment next to it.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from hydra.errors import InstantiationException
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from tests.conftest import compose_train
from stds.errors import ConfigError
from stds.models import (
    CIFAR10Net,
    DigitsNet,
    SEWResNet,
    make_neuron,
)
from stds.models.neurons import Float32StateIFNode, Float32StateLIFNode
from stds.models.sew_resnet import BasicBlock, Bottleneck
from stds.method.sparse import pruned_parameters, sparsify


def weight_count(model: nn.Module, types: tuple[type, ...]) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


def neurons_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (neuron.LIFNode, neuron.IFNode))]


# ---------------------------------------------------------------- shapes and determinism

SMALL_MODELS = {
    "digits": (lambda: DigitsNet(T=2), (3, 1, 8, 8), 10),
    "cifar10net_digits": (
        lambda: CIFAR10Net(T=2, in_channels=1, image_size=8, channels=8, num_classes=10),
        (3, 1, 8, 8), 10,
    ),
    "cifar10net_rgb": (
        lambda: CIFAR10Net(T=2, in_channels=3, image_size=32, channels=4, num_classes=7),
        (2, 3, 32, 32), 7,
    ),
    "sew18": (lambda: SEWResNet(depth=18, T=2, num_classes=10), (2, 3, 32, 32), 10),
    "sew34": (lambda: SEWResNet(depth=34, T=2, num_classes=5), (2, 3, 32, 32), 5),
    "sew50": (lambda: SEWResNet(depth=50, T=2, num_classes=10, in_channels=1), (2, 1, 32, 32), 10),
}


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_output_shape_and_same_output_after_reset(name):
    build, shape, num_classes = SMALL_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    images = torch.rand(shape) * 3
    with torch.no_grad():
        first = model(images)
        functional.reset_net(model)
        second = model(images)
    assert first.shape == (shape[0], num_classes)
    assert torch.equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152])
def test_deep_sew_resnets_output_shape(depth):
    model = SEWResNet(depth=depth, T=2, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_neuron_state_persists_until_reset():
    model = DigitsNet(T=2).eval()
    with torch.no_grad():
        model(torch.rand(2, 1, 8, 8) * 4)
    assert any(isinstance(n.v, torch.Tensor) and n.v.abs().sum() > 0 for n in neurons_of(model))
    functional.reset_net(model)
    assert all(not isinstance(n.v, torch.Tensor) and n.v == 0.0 for n in neurons_of(model))


def test_non_batch_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        DigitsNet(T=2)(torch.rand(1, 8, 8))


# ---------------------------------------------------------------- make_neuron


def test_make_neuron_defaults_build_a_multistep_lif():
    lif = make_neuron()
    assert isinstance(lif, neuron.LIFNode)
    assert lif.step_mode == "m" and lif.tau == 2.0 and lif.detach_reset
    assert lif.v_threshold == 1.0 and lif.v_reset == 0.0
    assert isinstance(lif.surrogate_function, surrogate.ATan)
    assert lif.surrogate_function.alpha == 2.0


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lif_and_if_dynamics_by_hand(backend):
    # LIF, tau 2, constant input 1.5: H1 = 1.5/2 = 0.75 (no spike); H2 = 0.75 + (1.5-0.75)/2
    # = 1.125 (spike, reset to 0); H3 = 0.75 (no spike).
    lif = make_neuron("lif", tau=2.0, backend=backend)
    spikes = lif(torch.full((3, 1, 1), 1.5))
    assert spikes.flatten().tolist() == [0.0, 1.0, 0.0]
    # IF, input 0.6: V = 0.6, 1.2 (spike, reset to 0), 0.6.
    if_node = make_neuron("if", backend=backend)
    assert if_node(torch.full((3, 1, 1), 0.6)).flatten().tolist() == [0.0, 1.0, 0.0]


def _spikingjelly_node(kind: str, v_reset: float | None) -> nn.Module:
    common = dict(v_reset=v_reset, surrogate_function=surrogate.ATan(alpha=2.0),
                  detach_reset=True, step_mode="m")
    return neuron.LIFNode(tau=2.0, **common) if kind == "lif" else neuron.IFNode(**common)


@pytest.mark.parametrize("kind", ["lif", "if"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_float32_state_neurons_compute_what_spikingjelly_computes_in_float32(kind, v_reset):
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 4) * 1.5).requires_grad_()
    ours, theirs = make_neuron(kind, v_reset=v_reset), _spikingjelly_node(kind, v_reset)
    spikes = ours(x)
    (grad,) = torch.autograd.grad((spikes * torch.arange(4.0)).sum(), x)
    ref_spikes = theirs(x)
    (ref_grad,) = torch.autograd.grad((ref_spikes * torch.arange(4.0)).sum(), x)
    assert spikes.dtype == torch.float32 and 0 < spikes.sum() < spikes.numel()
    assert torch.equal(spikes, ref_spikes) and torch.equal(ours.v, theirs.v)
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_low_precision_input_keeps_a_float32_state(dtype, kind):
    # the dynamics by hand as above (1.5 and 0.6 are the inputs); the state is float32 and the
    # spikes keep the input's dtype. 0.6 in bfloat16 is 0.6015625, in float16 0.60009765625:
    # IF V = 0.6015625, 1.203125 (spike, reset to 0), 0.6015625.
    value = 1.5 if kind == "lif" else 0.6
    node = make_neuron(kind)
    x = torch.full((3, 1, 1), value, dtype=dtype)
    spikes = node(x)
    assert spikes.dtype == dtype and spikes.flatten().tolist() == [0.0, 1.0, 0.0]
    assert node.v.dtype == torch.float32
    expected_v = 0.75 if kind == "lif" else float(x[0, 0, 0])  # LIF: H3 = 0.75
    assert node.v.item() == expected_v
    # the same as SpikingJelly's node on the input cast to float32, spikes and state
    reference = _spikingjelly_node(kind, 0.0)
    assert torch.equal(spikes.float(), reference(x.float())) and torch.equal(node.v, reference.v)
    # after reset_net the state is materialized again in float32, not in the input's dtype
    functional.reset_net(node)
    node(x)
    assert node.v.dtype == torch.float32


def test_float64_input_keeps_spikingjelly_state_rule():
    node = make_neuron("lif")
    node(torch.full((2, 3), 1.5, dtype=torch.float64))
    assert node.v.dtype == torch.float64


def test_soft_reset_and_threshold_from_config():
    # IF, threshold 0.5, soft reset, input 0.7: V = 0.7 (spike, 0.2), 0.9 (spike, 0.4), 1.1 ...
    if_node = make_neuron("if", v_threshold=0.5, v_reset=None)
    assert if_node(torch.full((3, 1), 0.7)).flatten().tolist() == [1.0, 1.0, 1.0]
    assert if_node.v.item() == pytest.approx(0.6)  # 0.4 + 0.7 - 0.5


@pytest.mark.parametrize(
    "kwargs, key, valid",
    [
        (dict(kind="plif"), "kind", "lif, if"),
        (dict(surrogate="relu"), "surrogate", "atan, sigmoid"),
        (dict(backend="numba"), "backend", "auto, torch"),
    ],
)
def test_unknown_neuron_options_name_key_and_valid_values(kwargs, key, valid):
    with pytest.raises(ConfigError, match=key) as info:
        make_neuron(**kwargs)
    assert valid in str(info.value)


def test_models_use_the_neuron_factory_they_are_given():
    model = DigitsNet(T=2, neuron=lambda: make_neuron("if"))
    kinds = {type(n) for n in neurons_of(model)}
    assert kinds == {Float32StateIFNode} and len(neurons_of(model)) == 3


def test_default_neurons():
    assert {type(n) for n in neurons_of(DigitsNet(T=2))} == {Float32StateLIFNode}
    cifar = CIFAR10Net(T=2, in_channels=1, image_size=8, channels=4)
    assert {type(n) for n in neurons_of(cifar)} == {Float32StateLIFNode}
    assert len(neurons_of(cifar)) == 8  # 6 conv + 2 fc
    sew = SEWResNet(depth=18, T=2, num_classes=10)
    assert {type(n) for n in neurons_of(sew)} == {Float32StateIFNode}
    # stem 1 + 8 blocks x 2 + 3 downsample shortcuts = 20
    assert len(neurons_of(sew)) == 20
    assert all(n.detach_reset and n.step_mode == "m" for n in neurons_of(sew))


# ---------------------------------------------------------------- SEW blocks


def _spike_patterns(channels: int) -> torch.Tensor:
    """[T=1, N=1, channels, 2, 2]: channels 0 and 1 hold all four (a, b) pairs over the pixels."""
    x = torch.zeros(1, 1, channels, 2, 2)
    x[0, 0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x[0, 0, 1] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    x[0, 0, 2:] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    return x


def _route(conv: nn.Conv2d, source_of: list[int], gain: float = 1.5) -> None:
    """Output channel c copies input channel ``source_of[c]`` (centre tap, times ``gain``)."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        for out_c, in_c in enumerate(source_of):
            conv.weight[out_c, in_c, k, k] = gain


def _connect_expected(identity, out, connect_f):
    return {"ADD": identity + out, "AND": identity * out, "IAND": identity * (1 - out)}[connect_f]


@pytest.mark.parametrize("connect_f", ["ADD", "AND", "IAND"])
def test_basic_block_connect_truth_table(connect_f):
    # conv1 swaps channels 0 and 1, conv2 copies; the gain 1.5 makes a 1 cross the IF threshold
    # 1, a 0 stays 0. So the residual branch spikes are out[c] = x[1 - c]: with identity = x the
    # pixels hold all four (identity, out) pairs.
    block = BasicBlock(2, 2, 1, None, connect_f, lambda: make_neuron("if")).eval()
    _route(block.conv1, [1, 0])
    _route(block.conv2, [0, 1])
    x = _spike_patterns(2)
    out = x[:, :, [1, 0]]
    y = block(x)
    assert torch.equal(y, _connect_expected(x, out, connect_f))
    # by hand at pixel (0, 1) of channel 0: identity 0, out 1; at (1, 0): identity 1, out 0
    table = {"ADD": (1.0, 1.0, 2.0), "AND": (0.0, 0.0, 1.0), "IAND": (0.0, 1.0, 0.0)}
    assert (y[0, 0, 0, 0, 1].item(), y[0, 0, 0, 1, 0].item(), y[0, 0, 0, 1, 1].item()) == table[
        connect_f
    ]


@pytest.mark.parametrize("connect_f", ["ADD", "AND", "IAND"])
def test_bottleneck_connect_truth_table(connect_f):
    # in 8 = planes 2 x expansion 4, so no shortcut conv. conv1 (8 -> 2) swaps channels 0 and
    # 1, conv2 copies, conv3 (2 -> 8) sends plane c % 2 to channel c: out[c] = x[1 - c % 2].
    block = Bottleneck(8, 2, 1, None, connect_f, lambda: make_neuron("if")).eval()
    _route(block.conv1, [1, 0])
    _route(block.conv2, [0, 1])
    _route(block.conv3, [c % 2 for c in range(8)])
    x = _spike_patterns(8)
    out = x[:, :, [1 - c % 2 for c in range(8)]]
    y = block(x)
    assert torch.equal(y, _connect_expected(x, out, connect_f))
    # IAND is identity * (1 - out) in the Bottleneck too: channel 0, pixel (1, 0) -> 1
    if connect_f == "IAND":
        assert y[0, 0, 0, 1, 0].item() == 1.0 and y[0, 0, 0, 1, 1].item() == 0.0


def test_unknown_connect_function_is_a_config_error():
    with pytest.raises(ConfigError, match="connect_f.*ADD, AND, IAND"):
        SEWResNet(depth=18, T=1, connect_f="OR")


def test_downsample_shortcut_is_conv1x1_bn_if():
    model = SEWResNet(depth=18, T=1, num_classes=10)
    assert model.layer1[0].downsample is None  # 64 -> 64, stride 1
    conv, bn, sn = model.layer2[0].downsample
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert (conv.in_channels, conv.out_channels) == (64, 128)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(sn, neuron.IFNode)
    assert isinstance(SEWResNet(depth=50, T=1).layer1[0].downsample[0], nn.Conv2d)  # 64 -> 256


@pytest.mark.parametrize("connect_f, bias", [("ADD", 0.0), ("IAND", 0.0), ("AND", 1.0)])
def test_zero_init_residual(connect_f, bias):
    model = SEWResNet(depth=18, T=1, connect_f=connect_f, zero_init_residual=True)
    last_bns = [block.bn2 for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                for block in stage]
    assert len(last_bns) == 8
    assert all(bool((bn.weight == 0).all()) and bool((bn.bias == bias).all()) for bn in last_bns)
    assert bool((model.layer1[0].bn1.weight == 1).all())  # only the last BN of a block
    bottleneck = SEWResNet(depth=50, T=1, zero_init_residual=True).layer1[0]
    assert bool((bottleneck.bn3.weight == 0).all()) and bool((bottleneck.bn2.weight == 1).all())


# ---------------------------------------------------------------- the static stem, mean over T


def test_sew_stem_runs_once_on_the_static_image_and_fc_sees_the_time_mean():
    model = SEWResNet(depth=18, T=4, num_classes=10).eval()
    seen: dict[str, list] = {"conv1": [], "sn1": [], "flatten": [], "fc": []}

    def record(name):
        def hook(module, inputs, output):
            seen[name].append((inputs[0].shape, output))
        return hook

    for name in seen:
        getattr(model, name).register_forward_hook(record(name))
    with torch.no_grad():
        scores = model(torch.rand(2, 3, 32, 32))
    assert len(seen["conv1"]) == 1
    assert seen["conv1"][0][0] == (2, 3, 32, 32)  # [N, ...], not [T * N, ...]
    assert seen["sn1"][0][0] == (4, 2, 64, 16, 16)  # repeated over T = 4 after BN
    features_seq = seen["flatten"][0][1]
    assert features_seq.shape == (4, 2, 512)
    assert seen["fc"][0][0] == (2, 512)
    expected = model.fc(features_seq.mean(dim=0))
    assert torch.allclose(scores, expected)


def test_digits_net_averages_its_fc_output_over_time():
    model = DigitsNet(T=3).eval()
    fc = model.features[-1]
    outputs = []
    fc.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    with torch.no_grad():
        scores = model(torch.rand(4, 1, 8, 8) * 3)
    assert outputs[0].shape == (3, 4, 10)
    assert torch.allclose(scores, outputs[0].mean(dim=0))
    assert fc.bias is None


def test_cifar10net_votes_groups_of_ten_neurons():
    model = CIFAR10Net(T=2, in_channels=1, image_size=8, channels=4, num_classes=3).eval()
    fc2 = [m for m in model.features if isinstance(m, nn.Linear)][-1]
    assert (fc2.in_features, fc2.out_features) == (2048, 30)
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    voting = model.features[-1]
    assert isinstance(voting, layer.VotingLayer)
    spikes = torch.zeros(1, 1, 30)
    spikes[0, 0, 10:13] = 1.0  # 3 of the 10 neurons of class 1
    spikes[0, 0, 20:30] = 1.0  # all of class 2
    assert voting(spikes).flatten().tolist() == pytest.approx([0.0, 0.3, 1.0])


def test_cifar10net_dropout_keeps_one_mask_per_sample_over_time():
    torch.manual_seed(0)
    model = CIFAR10Net(T=4, in_channels=1, image_size=8, channels=4).train()
    dropouts = [m for m in model.modules() if isinstance(m, layer.Dropout)]
    assert len(dropouts) == 2 and all(d.step_mode == "m" and d.p == 0.5 for d in dropouts)
    d = dropouts[1]
    y = d(torch.ones(4, 8, 2048))
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - 0.5)
    assert all(torch.equal(y[t], y[0]) for t in range(4))  # the same mask at every step
    assert not torch.equal(y[0, 0], y[0, 1])  # a mask per sample
    functional.reset_net(model)
    assert d.mask is None  # a new mask for the next batch
    # inside the model: the mask drawn at the first step is applied to every step
    masks = []
    d.register_forward_hook(lambda module, inputs, output: masks.append(module.mask.clone()))
    model(torch.rand(2, 1, 8, 8))
    assert masks[0].shape == (2, 2048)


# ---------------------------------------------------------------- weight counts and pruning


def test_cifar10net_weights_all_pruned():
    model = CIFAR10Net(T=1, in_channels=3, num_classes=10, image_size=32, channels=256)
    # convs: 3*256*9 + 5 * 256*256*9 = 6,912 + 2,949,120 = 2,956,032
    # fc1: 256 channels * 8 * 8 pixels * 2048 = 33,554,432; fc2: 2048 * 100 = 204,800
    expected = 2_956_032 + 33_554_432 + 204_800
    assert expected == 36_715_264
    assert weight_count(model, (nn.Conv2d, nn.Linear)) == expected
    assert model.prune_exclude == ()
    sparsify(model, "identity", exclude=model.prune_exclude)
    assert sum(p.numel() for p in pruned_parameters(model).values()) == expected


def test_sew_resnet18_convs_pruned_fc_dense():
    model = SEWResNet(depth=18, T=1, num_classes=1000)
    # stem 3*64*49 = 9,408; layer1 4 * 64*64*9 = 147,456;
    # layer2 128*64*9 + 3*128*128*9 + 64*128 (shortcut) = 73,728 + 442,368 + 8,192 = 524,288;
    # layer3 256*128*9 + 3*256*256*9 + 128*256 = 294,912 + 1,769,472 + 32,768 = 2,097,152;
    # layer4 512*256*9 + 3*512*512*9 + 256*512 = 1,179,648 + 7,077,888 + 131,072 = 8,388,608
    expected = 9_408 + 147_456 + 524_288 + 2_097_152 + 8_388_608
    assert expected == 11_166_912
    assert weight_count(model, (nn.Conv2d,)) == expected
    assert model.prune_exclude == ("fc",)
    names = sparsify(model, "identity", exclude=model.prune_exclude)
    assert "fc" not in names and len(names) == 20  # 17 convs + 3 shortcut convs
    assert sum(p.numel() for p in pruned_parameters(model).values()) == expected


def test_prune_exclude_is_a_tuple_of_patterns():
    assert DigitsNet(T=1, prune_exclude=["stem.*", "features.10"]).prune_exclude == (
        "stem.*", "features.10",
    )
    assert SEWResNet(depth=18, T=1, prune_exclude="fc").prune_exclude == ("fc",)
    assert SEWResNet(depth=18, T=1, prune_exclude=[]).prune_exclude == ()


def test_invalid_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="image_size"):
        DigitsNet(T=1, image_size=10)
    with pytest.raises(ConfigError, match="T=0"):
        DigitsNet(T=0)
    with pytest.raises(ConfigError, match="depth.*18, 34, 50, 101, 152"):
        SEWResNet(depth=20, T=1)


# ---------------------------------------------------------------- configs


def _compose_model(model: str, *extra: str):
    overrides = [f"model={model}", "T=2", *extra]
    return compose_train(*overrides)


@pytest.mark.parametrize(
    "model, extra, cls, depth",
    [
        ("digits_net", ("dataset=digits",), DigitsNet, None),
        ("cifar10net", ("dataset=digits", "model.channels=8"), CIFAR10Net, None),
        ("cifar10net", ("dataset=fake", "model.channels=4"), CIFAR10Net, None),
        ("sew_resnet18", ("dataset=fake",), SEWResNet, 18),
        ("sew_resnet34", ("dataset=fake",), SEWResNet, 34),
        ("sew_resnet50", ("dataset=fake",), SEWResNet, 50),
    ],
)
def test_model_configs_compose_and_instantiate(model, extra, cls, depth):
    cfg = _compose_model(model, *extra)
    net = instantiate(cfg.model).eval()
    assert type(net) is cls and net.T == 2
    if depth is not None:
        assert net.depth == depth and net.connect_f == "ADD" and net.prune_exclude == ("fc",)
    else:
        assert net.prune_exclude == ()
    size, channels = cfg.dataset.image_size, cfg.dataset.in_channels
    with torch.no_grad():
        scores = net(torch.rand(2, channels, size, size))
    assert scores.shape == (2, cfg.dataset.num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("model, depth", [("sew_resnet101", 101), ("sew_resnet152", 152)])
def test_deep_sew_configs_instantiate(model, depth):
    net = instantiate(_compose_model(model, "dataset=fake").model)
    assert isinstance(net, SEWResNet) and net.depth == depth


def test_model_config_keys_reach_the_model():
    cfg = _compose_model(
        "sew_resnet18", "dataset=fake", "model.connect_f=IAND", "model.zero_init_residual=true",
        "model.neuron.kind=lif", "model.neuron.tau=3.0",
    )
    net = instantiate(cfg.model)
    assert net.connect_f == "IAND" and bool((net.layer1[0].bn2.weight == 0).all())
    assert {type(n) for n in neurons_of(net)} == {Float32StateLIFNode}
    assert neurons_of(net)[0].tau == 3.0


def test_unknown_neuron_kind_in_config_fails_naming_the_key():
    cfg = _compose_model("digits_net", "model.neuron.kind=izhikevich")
    with pytest.raises((ConfigError, InstantiationException), match="kind='izhikevich'.*lif, if"):
        instantiate(cfg.model)
