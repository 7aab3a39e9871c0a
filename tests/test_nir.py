"""NIR export (`stds.results.nir`) and its check in other frameworks (`stds.results.nir_check`)."""

from __future__ import annotations

import importlib.util
import json

import h5py
import nir
import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import REPO, compose_train
from stds.errors import ExportError
from stds.models import CIFAR10Net, DigitsNet, SEWResNet, make_neuron
from stds.results.nir import DT, POOL_NEURON, GraphBuilder, Signal, fold_batchnorm, model_graph, sequence
from stds.results.nir_check import (
    READERS,
    check_graph,
    check_run,
    format_check,
    graph_forward,
    neuron_nodes,
    stds_forward,
)
from stds.results.nir_file import NIR_NAME, export_nir, write_graph, zero_weights
from stds.run.life.trainer import train

INSTALLED = [name for name, reader in READERS.items() if importlib.util.find_spec(reader.package)]
"""The public readers installed here (Norse and snnTorch come with the ``.[nir]`` extra)."""
needs_readers = pytest.mark.skipif(len(INSTALLED) < len(READERS),
                                   reason="a NIR reader is missing (pip install -e '.[nir]')")


def _written(graph: nir.NIRGraph, tmp_path, name: str = "graph.nir"):
    path = tmp_path / name
    write_graph(path, graph)
    return path


def test_fold_batchnorm_by_hand():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    bn = nn.BatchNorm2d(2, eps=0.0).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 0.0]).view(2, 1, 1, 1))
        bn.weight.copy_(torch.tensor([2.0, 5.0]))
        bn.bias.copy_(torch.tensor([1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.5, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    weight, bias = fold_batchnorm(conv, bn)
    # scale = gamma / sqrt(var): 1 and 10; bias = beta - mean * scale: 0.5 and -21
    assert weight.flatten().tolist() == [3.0, 0.0] and bias.tolist() == [0.5, -21.0]
    x = torch.randn(4, 1, 3, 3)
    torch.testing.assert_close(nn.functional.conv2d(x, weight, bias), bn(conv(x)))


def _hand_made_digits_net() -> DigitsNet:
    """A 1-channel DigitsNet on 4x4 images whose convs pass only their kernel's centre.

    stem: centre 2, BN y = 2 (x - 0.5) + 1 = 2x (folded: centre 4, bias 0); features.1: centre
    1.5; features.5: centre 4; fc: 0.5. Every other BN is the identity (eps 0).
    """
    model = DigitsNet(T=3, in_channels=1, num_classes=1, image_size=4, channels=(1, 1, 1)).eval()
    centres = {"stem.0": 2.0, "features.1": 1.5, "features.5": 4.0}
    with torch.no_grad():
        for name, value in centres.items():
            conv = model.get_submodule(name)
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = value
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.eps = 0.0
        model.stem[1].weight.fill_(2.0)
        model.stem[1].running_mean.fill_(0.5)
        model.stem[1].bias.fill_(1.0)
        model.features[10].weight.fill_(0.5)
    return model


def _hand_made_image() -> torch.Tensor:
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 0] = 1.0    # stem current 4: LIF (tau 2) h = 2 at every step -> 1, 1, 1
    image[0, 0, 2, 2] = 0.375  # current 1.5: h = 0.75, 1.125 (spike, reset), 0.75 -> 0, 1, 0
    return image


# features.0: 3 + 1 spikes. features.3 (current 1.5 x spikes): pixel (0,0) fires 0, 1, 0 as above,
# pixel (2,2) gets 0, 1.5, 0: h = 0, 0.75, 0.375 -> none. Max pool: the top-left window 0, 1, 0;
# features.7 (current 4 x spikes) copies it; max pool to 1x1: 0, 1, 0; fc 0.5: mean 0.5 / 3.
# The pooling neurons (features.4, features.8) fire once each, with the window that holds a spike.
HAND_SPIKES = {"features.0": 4, "features.3": 1, "features.4": 1, "features.7": 1, "features.8": 1}
HAND_SCORE = 0.5 / 3


def _hand_graph(tmp_path, dt: float = DT):
    model = _hand_made_digits_net()
    path = _written(model_graph(model, (1, 4, 4), dt=dt), tmp_path)
    return model, path, nir.read(path)


def test_hand_made_weights_spike_as_computed_by_hand(tmp_path):
    model, _, graph = _hand_graph(tmp_path)
    stem = graph.nodes["stem.0"]
    assert stem.weight[0, 0, 1, 1] == 4.0 and np.count_nonzero(stem.weight) == 1
    assert stem.bias.tolist() == [0.0]
    lif = graph.nodes["features.0"]
    assert isinstance(lif, nir.LIF) and np.all(lif.tau == 2 * DT) and np.all(lif.r == 1.0)
    assert np.all(lif.v_leak == 0.0) and np.all(lif.v_reset == 0.0) and np.all(lif.v_threshold == 1.0)
    assert isinstance(graph.nodes["features.4.sum"], nir.SumPool2d)
    pool = graph.nodes["features.4"]
    assert isinstance(pool, nir.LIF) and np.all(pool.tau == POOL_NEURON["tau_steps"] * DT)
    assert np.all(pool.v_threshold == 0.25) and ("features.4.sum", "features.4") in graph.edges
    counts = dict.fromkeys(neuron_nodes(graph), 0)
    assert stds_forward(model, _hand_made_image(), list(counts), counts).item() == pytest.approx(HAND_SCORE)
    assert counts == HAND_SPIKES


@pytest.mark.parametrize("reader", INSTALLED)
def test_hand_made_weights_in_each_public_reader(tmp_path, reader):
    model, path, graph = _hand_graph(tmp_path)
    counts = dict.fromkeys(neuron_nodes(graph), 0)
    module = READERS[reader].load(path, DT)
    scores = graph_forward(module, graph, _hand_made_image(), model.T, counts, READERS[reader].reset)
    assert scores.item() == pytest.approx(HAND_SCORE) and counts == HAND_SPIKES


def test_dt_is_written_into_the_parameters(tmp_path):
    model, path, graph = _hand_graph(tmp_path, dt=1.0)
    assert graph.metadata["dt"] == 1.0 and np.all(graph.nodes["features.0"].tau == 2.0)
    counts = dict.fromkeys(neuron_nodes(graph), 0)
    scores = graph_forward(READERS["spikingjelly"].load(path, 1.0), graph, _hand_made_image(),
                           model.T, counts)
    assert scores.item() == pytest.approx(HAND_SCORE) and counts == HAND_SPIKES
    with pytest.raises(ExportError, match="dt=0 is not valid"):
        model_graph(model, (1, 4, 4), dt=0)


def test_file_leaves_out_zero_resets_and_older_nir_fields(tmp_path):
    _, path, graph = _hand_graph(tmp_path)
    with h5py.File(path) as f:
        nodes = f["node/nodes"]
        assert [name for name in nodes if "v_reset" in nodes[name]] == []
        assert {"tau", "r", "v_leak", "v_threshold"} <= set(nodes["features.0"])
    assert np.all(graph.nodes["features.0"].v_reset == 0.0)  # nir fills in the zeros on read


def _strong(model: nn.Module, prune: float) -> nn.Module:
    """Random BatchNorm statistics that make the layers spike, and ``prune`` of each conv and
    linear weight set to exactly zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 3.0, generator=generator)
                m.bias.uniform_(0.0, 2.5, generator=generator)
                m.running_mean.uniform_(-0.3, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                gain = 3.0 if isinstance(m, nn.Conv2d) else 10.0
                m.weight.mul_(gain).mul_(torch.rand(m.weight.shape, generator=generator) >= prune)
    return model.eval()


def _weight_zeros(model: nn.Module) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _random_batches(shape, n: int = 2, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=generator), torch.zeros(size, dtype=torch.long))
            for _ in range(n)]


NETS = {
    "digits": (lambda: DigitsNet(T=3, channels=(8, 8, 8)), (1, 8, 8)),
    "cifar10net": (lambda: CIFAR10Net(T=3, channels=8, hidden=32, voting=4, image_size=8), (3, 8, 8)),
    "sew_resnet18_add": (lambda: SEWResNet(depth=18, T=3, num_classes=10, width=8), (3, 32, 32)),
}


def _checked(net: str, tmp_path, readers: list[str], corrupt=None):
    torch.manual_seed(0)
    build, shape = NETS[net]
    model = _strong(build(), prune=0.5)
    graph = model_graph(model, shape)
    zeros = _weight_zeros(model)
    assert zero_weights(graph, zeros) == sum(zeros.values()) > 0
    if corrupt is not None:
        corrupt(graph)
    path = _written(graph, tmp_path)
    return check_graph(model, path, _random_batches(shape), readers)


@needs_readers
@pytest.mark.parametrize("net", ["digits", "cifar10net"])
def test_every_public_reader_reproduces_the_net(tmp_path, net):
    result = _checked(net, tmp_path, list(READERS))
    assert result.passed and sum(result.spikes_stds.values()) > 0
    for reader in result.readers:
        assert reader.error is None and reader.out_of_order == []
        assert reader.same_class == result.images == 16
        assert reader.spikes == result.spikes_stds  # identical spikes in every layer
        assert reader.max_score_difference == 0.0
    assert "PASS" in format_check(result) and "FAIL" not in format_check(result)


@needs_readers
@pytest.mark.slow
def test_sew_resnet_add_in_the_public_readers(tmp_path):
    """SpikingJelly reproduces SEW ResNet; Norse's executor runs each downsample shortcut after
    the junction it feeds and snnTorch refuses IF neurons: both fail the check, named."""
    result = _checked("sew_resnet18_add", tmp_path, list(READERS))
    spikingjelly, norse, snntorch = result.readers
    assert result.reader_passed(spikingjelly) and spikingjelly.spikes == result.spikes_stds
    assert spikingjelly.max_score_difference < 1e-4  # fc per step, then averaged: rounding only
    assert not result.reader_passed(norse) and norse.out_of_order
    assert "no module for node avgpool (AvgPool2d)" in norse.out_of_order
    assert not result.reader_passed(snntorch) and "r != 1 not supported" in snntorch.error
    assert not result.passed


def _negate_fc(graph: nir.NIRGraph) -> None:
    graph.nodes["features.10"].weight = -graph.nodes["features.10"].weight


@pytest.mark.parametrize("reader", INSTALLED)
def test_a_corrupted_weight_fails_the_check(tmp_path, reader):
    result = _checked("digits", tmp_path, [reader], corrupt=_negate_fc)
    (only,) = result.readers
    assert only.error is None and only.spikes == result.spikes_stds  # the fc feeds no neuron
    assert only.same_class < result.images and not result.passed
    assert f"{reader} " in format_check(result) and "FAIL" in format_check(result)


def test_sew_graph_has_no_node_a_reader_lacks():
    graph = model_graph(SEWResNet(depth=18, T=2, num_classes=10, width=8).eval(), (3, 32, 32))
    add = graph.nodes["layer1.0.add"]
    assert isinstance(add, nir.Conv2d) and add.weight.shape == (8, 8, 1, 1)
    assert np.array_equal(add.weight[:, :, 0, 0], np.eye(8)) and not np.any(add.bias)
    into = sorted(source for source, target in graph.edges if target == "layer1.0.add")
    assert into == ["layer1.0.sn2", "maxpool"]
    into = sorted(source for source, target in graph.edges if target == "layer2.0.add")
    assert into == ["layer2.0.downsample.2", "layer2.0.sn2"]
    out_of_block_input = [target for source, target in graph.edges if source == "maxpool"]
    assert out_of_block_input == ["layer1.0.conv1", "layer1.0.add"]  # the units first
    pool = graph.nodes["maxpool.sum"]  # padded: a Conv2d of ones per channel keeps the padding
    assert isinstance(pool, nir.Conv2d) and list(pool.padding) == [1, 1] and list(pool.stride) == [2, 2]
    assert pool.weight[0, 0].tolist() == [[1.0] * 3] * 3 and not np.any(pool.weight[0, 1])
    flatten = graph.nodes["flatten"]
    assert (flatten.start_dim, flatten.end_dim) == (-3, -1)
    assert not any(isinstance(n, (nir.Scale, nir.Threshold)) for n in graph.nodes.values())


@pytest.mark.parametrize("connect_f", ["AND", "IAND"])
def test_and_iand_are_refused_in_one_line(connect_f):
    model = SEWResNet(depth=18, T=2, num_classes=10, width=8, connect_f=connect_f).eval()
    with pytest.raises(ExportError, match=rf"layer layer1\.0 \(BasicBlock\).*connect_f={connect_f}") as err:
        model_graph(model, (3, 32, 32))
    assert "\n" not in str(err.value)


def test_max_pool_of_non_spikes_and_soft_reset_are_refused():
    b = GraphBuilder()
    analog = Signal("input", (1, 4, 4), spikes=False)
    with pytest.raises(ExportError, match=r"layer pool \(MaxPool2d\).*not 0/1 spikes"):
        sequence(b, [("pool", nn.MaxPool2d(2))], analog)
    soft = DigitsNet(T=2, neuron=lambda: make_neuron(v_reset=None)).eval()
    with pytest.raises(ExportError, match=r"layer features\.0 .*soft"):
        model_graph(soft, (1, 8, 8))


@pytest.fixture(scope="module")
def trained_digits_run(tmp_path_factory):
    """A small digits net trained for one epoch (22 steps) with the real config; a high learning
    rate and a low firing threshold keep its spikes alive after so few steps."""
    run = tmp_path_factory.mktemp("digits") / "run"
    cfg = compose_train("dataset=digits", "epochs=1", "batch_size=64", "T=2", "lr=0.01",
                        "model.channels=[8,8,8]", "model.neuron.v_threshold=0.5",
                        "flat_width=0.02", "logging.synops=false", "logging.progress_bar=false")
    train(cfg, run)
    return run


@pytest.mark.slow
def test_trained_run_exports_with_its_zeros(trained_digits_run, capsys):
    written = export_nir(trained_digits_run)
    assert written.path == trained_digits_run / NIR_NAME
    graph = nir.read(written.path)
    pruned = graph.metadata["pruned_layers"].split(",")
    assert pruned == ["stem.0", "features.1", "features.5", "features.10"]
    numel = sum(graph.nodes[name].weight.size for name in pruned)
    run_sparsity = json.loads((trained_digits_run / "metrics.json").read_text())["sparsity"]
    zeros = zero_weights(graph, pruned)
    assert zeros == round(run_sparsity * numel) == written.zeros_in_run > 0
    assert graph.metadata["zero_weights"] == zeros
    assert graph.metadata["T"] == 2 and "averaged over the T steps" in graph.metadata["readout"]
    assert "same as the run's" in capsys.readouterr().out


@pytest.mark.slow
@needs_readers
def test_trained_run_agrees_in_every_public_reader(trained_digits_run):
    export_nir(trained_digits_run, verbose=False)
    result = check_run(trained_digits_run)
    assert result.images == 360 and result.passed and sum(result.spikes_stds.values()) > 0
    for reader in result.readers:
        assert reader.same_class == 360 and reader.spikes == result.spikes_stds
        assert reader.correct == result.correct_stds
    assert format_check(result).count(": PASS, same class as stds on 360 of 360 images") == 3


def _export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_errors_are_one_line(tmp_path, capsys):
    main = _export_cli()
    assert main([str(tmp_path / "missing"), "--format", "nir"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--check"])  # --check needs --format nir
    assert exit_info.value.code == 2 and "--check and --check-images need --format nir" in capsys.readouterr().err
    for argv, message in ((["--readers", "foo"], "--readers=foo is not valid: foo; use some of "
                           "spikingjelly,norse,snntorch"),
                          (["--min-agreement", "2"], "--min-agreement=2.0 is not valid"),
                          (["--dt", "-1"], "--dt=-1.0 is not valid")):
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--format", "nir", "--check", *argv])
        assert message in capsys.readouterr().err


@pytest.mark.slow
@needs_readers
def test_cli_writes_model_nir_and_checks(trained_digits_run, capsys):
    (trained_digits_run / NIR_NAME).unlink(missing_ok=True)
    main = _export_cli()
    assert main([str(trained_digits_run), "--format", "nir", "--check", "--check-images", "40"]) == 0
    out = capsys.readouterr().out
    assert (trained_digits_run / NIR_NAME).exists()
    assert "same as the run's" in out and "check: 40 test images, T=2, dt=0.0001 s" in out
    assert "neuron parameters for dt = 0.0001 s" in out
    assert "features.7" in out and not (trained_digits_run / "pruned.pt").exists()


@pytest.mark.slow
@needs_readers
def test_cli_exits_non_zero_when_the_file_disagrees(trained_digits_run, capsys, monkeypatch):
    """The file written is corrupted (the fc's weights negated) before the check reads it."""
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location("export_cli", REPO / "launch" / "export.py"))
    module.__spec__.loader.exec_module(module)

    def export_corrupted(*args, **kwargs):
        written = export_nir(*args, **kwargs)
        graph = nir.read(written.path)
        _negate_fc(graph)
        write_graph(written.path, graph)
        return written

    monkeypatch.setattr(module, "export_nir", export_corrupted)
    argv = [str(trained_digits_run), "--format", "nir", "--check", "--check-images", "40"]
    assert module.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAIL, same class as stds on" in captured.out
    assert captured.err.startswith("Error: the NIR check failed for spikingjelly, norse, snntorch")
    assert module.main(argv + ["--min-agreement", "0", "--readers", "spikingjelly"]) == 0
