"""Reparameterizations of pruned weights against hand-computed values."""

from __future__ import annotations

import io

import pytest
import torch
from spikingjelly.activation_based import layer as sj_layer
from torch import nn
from torch.nn.utils import parametrize

from stds.method.sparse import (
    reparams,
    dense_state_dict,
    make_reparam,
    pruned_layers,
    pruned_parameters,
    set_threshold,
    sparsify,
    sparsity,
)

# θ chosen so that |θ| = d (0.25) and θ = 0 occur; all values exact in binary floating point
THETA = [-1.0, -0.25, -0.125, 0.0, 0.125, 0.25, 0.75]
D = 0.25
UPSTREAM = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]

EXPECTED_W = {
    "identity": THETA,
    "st": [-0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
    "stmod": [-0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
}
# dL/dθ for dL/dw = UPSTREAM
EXPECTED_GRAD = {
    "identity": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # dw/dθ = 1
    "st": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0],  # 1 where |θ| > d
    "stmod": [1.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0],  # 1 where θ ≠ 0
}


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False),  # 18 weights
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 4),  # 32 weights
        nn.ReLU(),
        nn.Linear(4, 3),  # 12 weights: the head
    )


@pytest.mark.parametrize("name", ["identity", "st", "stmod"])
def test_forward_values(name: str) -> None:
    w = make_reparam(name, D)(torch.tensor(THETA))
    assert w.tolist() == EXPECTED_W[name]


@pytest.mark.parametrize("name", ["identity", "st", "stmod"])
def test_gradient_follows_definition(name: str) -> None:
    theta = torch.tensor(THETA, requires_grad=True)
    make_reparam(name, D)(theta).backward(torch.tensor(UPSTREAM))
    assert theta.grad.tolist() == EXPECTED_GRAD[name]


@pytest.mark.parametrize("name", ["st", "stmod"])
def test_zero_threshold_prunes_only_exact_zeros(name: str) -> None:
    theta = torch.tensor([-0.5, 0.0, 1e-30], requires_grad=True)
    w = make_reparam(name, 0.0)(theta)
    w.sum().backward()
    assert w.tolist() == theta.tolist()
    assert theta.grad.tolist() == [1.0, 0.0, 1.0]


def test_unknown_reparam_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="identity, st, stmod"):
        make_reparam("magnitude")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_invalid_flat_width_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="threshold d"):
        make_reparam("stmod", bad)
    model = small_net()
    with pytest.raises(ValueError, match="threshold d"):
        sparsify(model, "st", d=bad)
    sparsify(model, "st")
    with pytest.raises(ValueError, match="threshold d"):
        set_threshold(model, bad)


def test_reparam_method_names() -> None:
    names = ["identity", "st", "stmod"]
    assert [make_reparam(n).method for n in names] == names


@pytest.mark.parametrize("name", ["st", "stmod"])
def test_inverse_map_keeps_initial_weights(name: str) -> None:
    layer = nn.Linear(16, 8)
    w0 = layer.weight.detach().clone()
    sparsify(layer, name, d=0.05)
    theta = layer.parametrizations.weight.original.detach()
    assert torch.equal(theta, torch.sign(w0) * (w0.abs() + 0.05))
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-7)
    assert torch.equal(torch.sign(layer.weight.detach()), torch.sign(w0))


def test_identity_registration_keeps_weights_exactly() -> None:
    layer = nn.Linear(16, 8)
    w0 = layer.weight.detach().clone()
    sparsify(layer, "identity", d=0.3)
    assert torch.equal(layer.weight.detach(), w0)
    assert torch.equal(layer.parametrizations.weight.original.detach(), w0)


def test_sparsify_exclude_and_names() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), sj_layer.Conv2d(2, 2, 1)))
    model.add_module("head", nn.Sequential(nn.Linear(4, 4), sj_layer.Linear(4, 2)))
    model.add_module("norm", nn.BatchNorm1d(2))
    assert sparsify(model, "stmod", exclude=("head.1",)) == ["features.0", "features.1", "head.0"]
    assert list(pruned_layers(model)) == ["features.0", "features.1", "head.0"]
    params = pruned_parameters(model)
    assert params["head.0"] is model.head[0].parametrizations.weight.original
    assert not parametrize.is_parametrized(model.head[1])


def test_exclude_patterns_are_fnmatch() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert sparsify(model, "st", exclude=["head.*"]) == ["body"]
    other = nn.Sequential()
    other.add_module("fc", nn.Linear(4, 4))
    other.add_module("f", nn.Linear(4, 4))
    assert sparsify(other, "st", exclude="fc") == ["f"]  # one pattern, not the letters f and c


def test_sparsify_twice_is_an_error() -> None:
    model = small_net()
    sparsify(model, "stmod", 0.1)
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, "st", 0.1)


def _thresholds(model: nn.Module) -> set[float]:
    """The distinct d held by the model's reparameterizations (buffer and host copy must agree)."""
    values = set()
    for reparam in reparams(model):
        assert reparam.current_d() == pytest.approx(float(reparam.d))
        values.add(float(reparam.d))
    return values


def test_set_threshold_sets_every_layer() -> None:
    model = small_net()
    sparsify(model, "stmod", 0.1)
    (value,) = _thresholds(model)
    assert value == pytest.approx(0.1)
    set_threshold(model, 0.5)
    assert _thresholds(model) == {0.5}
    for layer in pruned_layers(model).values():
        assert layer.parametrizations.weight[0].d.item() == 0.5


def test_threshold_in_state_dict_survives_save_load() -> None:
    model = small_net()
    sparsify(model, "stmod", 0.0)
    set_threshold(model, 0.375)
    state = model.state_dict()
    assert state["4.parametrizations.weight.0.d"].item() == 0.375
    assert state["4.parametrizations.weight.0.d"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    other = small_net()
    sparsify(other, "stmod", 0.0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert _thresholds(other) == {0.375}
    assert torch.equal(other[4].weight, model[4].weight)


def test_sparsity_counts_by_hand() -> None:
    model = small_net()
    sparsify(model, "st", 0.0, exclude=("6",))
    with torch.no_grad():
        model[0].parametrizations.weight.original[0].zero_()  # 9 of 18 conv weights
        model[4].parametrizations.weight.original[:, :2] = 0.0  # 8 of 32 linear weights
    result = sparsity(model)
    assert result == {"total": 17 / 50, "zeros": 17, "numel": 50, "layers": {"0": 0.5, "4": 0.25}}

    set_threshold(model, 1e3)  # larger than every |θ|
    result = sparsity(model)
    assert result == {"total": 1.0, "zeros": 50, "numel": 50, "layers": {"0": 1.0, "4": 1.0}}


def test_sparsity_at_an_intermediate_threshold() -> None:
    layer = nn.Linear(4, 2, bias=False)
    sparsify(layer, "stmod", 0.0)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(
            torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.5, -0.6, 0.7, -0.8]])
        )
    set_threshold(layer, 0.35)  # prunes 0.1, -0.2, 0.3
    assert sparsity(layer) == {"total": 3 / 8, "zeros": 3, "numel": 8, "layers": {"": 3 / 8}}


def test_sparsity_without_pruned_layers() -> None:
    assert sparsity(small_net()) == {"total": 0.0, "zeros": 0, "numel": 0, "layers": {}}


@pytest.mark.parametrize("name", ["identity", "st", "stmod"])
def test_dense_state_dict_loads_into_plain_model(name: str) -> None:
    model = small_net()
    plain = small_net()
    plain_keys = list(plain.state_dict())
    sparsify(model, name, 0.0, exclude=("6",))
    set_threshold(model, 0.2)
    theta_before = model[4].parametrizations.weight.original.detach().clone()
    model.eval()
    plain.eval()

    exported = dense_state_dict(model)
    assert list(exported) == plain_keys
    assert torch.equal(exported["4.weight"], model[4].weight.detach())
    if name != "identity":
        assert int((exported["4.weight"] == 0).sum()) > 0
    plain.load_state_dict(exported, strict=True)
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(plain(x), model(x))
    # the sparsified model is untouched, and the export does not alias θ
    assert parametrize.is_parametrized(model[4])
    exported["4.weight"].add_(1.0)
    assert torch.equal(model[4].parametrizations.weight.original, theta_before)


@pytest.mark.parametrize("name", ["st", "stmod"])
def test_bf16_autocast_keeps_sparsity_pattern(name: str) -> None:
    model = small_net()
    sparsify(model, name, 0.0)
    set_threshold(model, 0.2)
    x = torch.randn(4, 1, 4, 4)

    out32 = model(x)
    out32.sum().backward()
    grads32 = {n: p.grad.clone() for n, p in pruned_parameters(model).items()}
    model.zero_grad()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
        zeros16 = {n: (m.weight.to(torch.bfloat16) == 0) for n, m in pruned_layers(model).items()}
    assert out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    for n, m in pruned_layers(model).items():
        zeros32 = m.weight.detach() == 0
        assert zeros32.any()
        assert torch.equal(zeros16[n], zeros32)
        theta = pruned_parameters(model)[n]
        assert theta.dtype == torch.float32 and theta.grad.dtype == torch.float32
        pruned_grad = theta.grad[zeros32]
        if name == "st":  # pruned synapses receive no gradient, as in fp32
            assert torch.equal(pruned_grad, torch.zeros_like(pruned_grad))
            assert torch.equal(grads32[n][zeros32], torch.zeros_like(pruned_grad))
        else:  # stmod: pruned synapses keep receiving gradient
            assert pruned_grad.abs().sum() > 0


def test_works_with_parametrize_cached() -> None:
    layer = nn.Linear(3, 1, bias=False)
    sparsify(layer, "stmod", 0.0)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[0.5, -0.1, 0.0]]))
    set_threshold(layer, 0.25)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    with parametrize.cached():
        y = layer(x) + layer(2 * x)  # w = [0.25, 0, 0], used twice
    assert y.item() == pytest.approx(0.25 + 0.5)
    y.backward()
    # dL/dw = x + 2x = [3, 6, 9]; stmod passes it through where θ ≠ 0
    assert layer.parametrizations.weight.original.grad.tolist() == [[3.0, 6.0, 0.0]]


def test_threshold_moves_with_the_module() -> None:
    model = small_net()
    sparsify(model, "stmod", 0.5)
    model.double()
    reparam = model[4].parametrizations.weight[0]
    assert reparam.d.dtype == torch.float64
    assert model[4].weight.dtype == torch.float64
    set_threshold(model, 0.25)
    assert _thresholds(model) == {0.25}


@pytest.mark.parametrize("name", ["st", "stmod"])
def test_compiled_layer_follows_the_threshold_without_recompiling(name: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _check_compiled_layer(name)


def _check_compiled_layer(name: str) -> None:
    layer = nn.Linear(len(THETA), 1, bias=False)
    sparsify(layer, name, 0.0)
    theta = layer.parametrizations.weight.original
    with torch.no_grad():
        theta.copy_(torch.tensor([THETA]))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.tensor([UPSTREAM])
    for d, w in ((D, EXPECTED_W[name]), (0.5, [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25])):
        set_threshold(layer, d)  # a new d must not make dynamo trace again
        theta.grad = None
        y = compiled(x)
        y.backward()
        assert y.item() == pytest.approx(sum(wi * xi for wi, xi in zip(w, UPSTREAM)))
        expected = [g if wi != 0 or name == "stmod" else 0.0 for g, wi in zip(UPSTREAM, w)]
        expected[THETA.index(0.0)] = 0.0  # θ = 0 gets no gradient from either function
        assert theta.grad.tolist() == [expected]
