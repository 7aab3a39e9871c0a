"""Export a trained run as a NIR graph (Neuromorphic Intermediate Representation): ``model.nir``.

The graph computes, one time step per evaluation of the graph, what the model computes in
inference (``docs/nir.md`` has the derivations):

- the static image enters at node ``input`` and is fed unchanged at each of the ``T`` steps;
- a convolution followed by BatchNorm is one ``Conv2d`` node with the BatchNorm folded in
  (weight ``w * s`` and bias ``beta - mean * s``, ``s = gamma / sqrt(var + eps)`` per output
  channel), so every pruned zero stays exactly zero; nodes are named after the model's layers;
- LIF and IF neurons are SpikingJelly's exchange nodes written with ``dt = 1`` (one NIR time unit
  per step): LIF ``tau`` = SpikingJelly's tau, ``r = 1`` (decay_input), ``v_leak = v_reset``;
  IF ``r = 1``; hard reset to ``v_reset``; ``v_threshold``;
- max pooling of 0/1 spikes is a ``SumPool2d`` node (``<layer>.sum``) followed by
  ``Threshold(0.5)`` (``<layer>``): "at least one spike in the window", exact for spikes;
- a SEW ``ADD`` junction is a ``Scale`` node of ones (``<block>.add``) with two incoming edges
  (NIR sums the edges that enter a node);
- CIFAR10Net's voting layer is a ``Linear`` node averaging each group of output neurons;
- the class scores are the ``output`` node's values averaged over the T steps (graph metadata
  ``readout``); SEW ResNet's fc, which the model applies to time-averaged features, is applied
  at every step, which gives the same average because it is affine.

SpikingJelly's ``nir_exchange.export_to_nir`` writes every node it has a mapping for (Conv2d,
Linear, Flatten, AvgPool2d, LIF, IF); it works on one traced module, so each such layer is
exported alone and the graph (edges, BatchNorm folding, max pooling, junctions, voting) is
assembled here, which the exchange module has no mappings for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron
from spikingjelly.activation_based.nir_exchange import export_to_nir
from torch import Tensor, nn

from stds.errors import ExportError
from stds.models import MODELS
from stds.models.sew_resnet import SEWBlock
from stds.models.zoo import children
from stds.results.pruned import trained_network

__all__ = [
    "DT",
    "NIR_NAME",
    "NirExport",
    "export_nir",
    "fold_batchnorm",
    "model_graph",
    "zero_weights",
]

NIR_NAME = "model.nir"
NIR_FORMAT_VERSION = 1
DT = 1.0
"""Time step the neuron parameters are written for: one NIR time unit per SpikingJelly step."""
POOL_THRESHOLD = 0.5
"""Threshold after a sum pool of 0/1 spikes: a window sum > 0.5 means at least one spike."""

LIF_TYPES = (neuron.LIFNode, neuron.SimpleLIFNode)
IF_TYPES = (neuron.IFNode, neuron.SimpleIFNode)
SKIPPED_IN_INFERENCE = (nn.Dropout, layer.Dropout, nn.Identity)
"""Layers that are the identity in inference (dropout) and leave no node."""


@dataclass(frozen=True)
class Signal:
    """What a node sends on its outgoing edges: the node's name, the per-sample shape of its
    output and whether its values are 0/1 spikes."""

    node: str
    shape: tuple[int, ...]
    spikes: bool


@dataclass
class GraphBuilder:
    """Nodes and edges of the graph being assembled, in the order they are added."""

    nodes: dict[str, nir.NIRNode] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, node: nir.NIRNode, *inputs: Signal, spikes: bool,
            shape: Iterable[int] | None = None) -> Signal:
        """Add ``node`` fed by ``inputs`` (their sum, as NIR defines); its output as a `Signal`."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} added twice")
        self.nodes[name] = node
        self.edges += [(source.node, name) for source in inputs]
        if shape is None:
            shape = node.output_type["output"]
        return Signal(name, tuple(int(n) for n in shape), spikes)


def _refuse(name: str, module: nn.Module, why: str) -> ExportError:
    return ExportError(f"layer {name} ({type(module).__name__}) cannot be exported to NIR: {why}")


def exchange_node(module: nn.Module, shape: tuple[int, ...]) -> nir.NIRNode:
    """The node SpikingJelly's ``export_to_nir`` writes for one single-step layer whose input
    is ``[1, *shape]`` (the layer traced alone inside an ``nn.Sequential``)."""
    graph = export_to_nir(nn.Sequential(module), torch.zeros(1, *shape), dt=DT)
    (node,) = [n for n in graph.nodes.values() if not isinstance(n, (nir.Input, nir.Output))]
    return node


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``conv`` followed by ``bn`` in eval mode, computed in float64 and
    returned in the weight's dtype. Each output channel is scaled by ``gamma / sqrt(var + eps)``,
    so a zero weight stays exactly zero."""
    weight = conv.weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if conv.bias is None \
        else conv.bias.detach().double()
    if bn is not None:
        gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bias)
        beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(bias)
        scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = beta + (bias - bn.running_mean.double()) * scale
    dtype = conv.weight.dtype
    return weight.to(dtype), bias.to(dtype)


def _conv(b: GraphBuilder, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
          x: Signal) -> Signal:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _refuse(name, conv, "only ungrouped, zero-padded convolutions with numeric padding")
    if bn is not None and bn.running_var is None:
        raise _refuse(name, bn, "its BatchNorm keeps no running statistics to fold")
    weight, bias = fold_batchnorm(conv, bn)
    plain = layer.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, bias=True)
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
    return b.add(name, exchange_node(plain, x.shape), x, spikes=False)


def _linear(b: GraphBuilder, name: str, fc: nn.Linear, x: Signal) -> Signal:
    plain = layer.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None)
    plain.load_state_dict(fc.state_dict())
    return b.add(name, exchange_node(plain, x.shape), x, spikes=False)


def plain_neuron(name: str, module: nn.Module) -> nn.Module:
    """A single-step SpikingJelly ``LIFNode`` / ``IFNode`` with ``module``'s dynamics: the class
    SpikingJelly's exchange maps (ours are subclasses or SpikingJelly's ``Simple*`` loops)."""
    if not isinstance(module, LIF_TYPES + IF_TYPES):
        raise _refuse(name, module, "NIR's LIF and IF are the only neurons exported")
    if module.v_reset is None:
        raise _refuse(name, module, "it resets softly (v_reset=None) and NIR's LIF/IF reset to "
                      "v_reset; train with model.neuron.v_reset=0.0")
    common = {"v_threshold": float(module.v_threshold), "v_reset": float(module.v_reset)}
    if isinstance(module, LIF_TYPES):
        return neuron.LIFNode(tau=float(module.tau), decay_input=bool(module.decay_input), **common)
    return neuron.IFNode(**common)


def _neuron(b: GraphBuilder, name: str, module: nn.Module, x: Signal) -> Signal:
    return b.add(name, exchange_node(plain_neuron(name, module), x.shape), x, spikes=True)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _max_pool(b: GraphBuilder, name: str, pool: nn.MaxPool2d, x: Signal) -> Signal:
    """Max pooling of 0/1 spikes as SumPool2d (zero padding) + Threshold(0.5): a window's maximum
    is 1 exactly when its sum is at least one spike. NIR has no max pooling."""
    if not x.spikes:
        raise _refuse(name, pool, f"it pools the output of {x.node}, which is not 0/1 spikes; NIR "
                      "has no max pooling and SumPool2d + Threshold equals it only on spikes")
    if pool.ceil_mode or _pair(pool.dilation) != (1, 1):
        raise _refuse(name, pool, "only max pooling without ceil_mode or dilation")
    kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
    stride = _pair(pool.stride or pool.kernel_size)
    shape = F.max_pool2d(torch.zeros(1, *x.shape), kernel, stride, padding).shape[1:]
    summed = b.add(f"{name}.sum", nir.SumPool2d(np.array(kernel), np.array(stride),
                                                np.array(padding)), x, spikes=False, shape=shape)
    threshold = nir.Threshold(np.full(tuple(shape), POOL_THRESHOLD, dtype=np.float32))
    return b.add(name, threshold, summed, spikes=True)


def _avg_pool(b: GraphBuilder, name: str, pool: nn.Module, x: Signal) -> Signal:
    """Average pooling as an AvgPool2d node. Written here: SpikingJelly's exchange cannot export a
    pooling layer alone (its graph input takes the type of the first node, which a pool lacks)."""
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        size = _pair(pool.output_size)
        if x.shape[1] % size[0] or x.shape[2] % size[1]:
            raise _refuse(name, pool, f"adaptive pooling of {x.shape[1:]} to {size} has unequal windows")
        kernel = stride = (x.shape[1] // size[0], x.shape[2] // size[1])
        padding = (0, 0)
    else:
        if pool.ceil_mode or pool.divisor_override is not None or (
                any(_pair(pool.padding)) and not pool.count_include_pad):
            raise _refuse(name, pool, "NIR's AvgPool2d has no ceil_mode, divisor or excluded padding")
        kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
        stride = _pair(pool.stride or pool.kernel_size)
    shape = F.avg_pool2d(torch.zeros(1, *x.shape), kernel, stride, padding).shape[1:]
    node = nir.AvgPool2d(np.array(kernel), np.array(stride), np.array(padding))
    return b.add(name, node, x, spikes=False, shape=shape)


def _voting(b: GraphBuilder, name: str, voting: layer.VotingLayer, x: Signal) -> Signal:
    """CIFAR10Net's voting layer (the mean of each group of ``voting_size`` outputs) as Linear."""
    group = int(voting.voting_size)
    classes = x.shape[-1] // group
    weight = np.zeros((classes, x.shape[-1]), dtype=np.float32)
    for k in range(classes):
        weight[k, k * group:(k + 1) * group] = 1.0 / group
    return b.add(name, nir.Linear(weight), x, spikes=False)


def _sew_block(b: GraphBuilder, name: str, block: SEWBlock, x: Signal) -> Signal:
    """The block's units, its shortcut, and the ADD junction: a Scale node of ones fed by both."""
    if block.connect_f != "ADD":
        raise _refuse(name, block, f"connect_f={block.connect_f} multiplies spikes and a NIR node "
                      "only sums its inputs; export a model trained with model.connect_f=ADD")
    out = x
    for i in range(1, block.n_units + 1):
        out = _conv(b, f"{name}.conv{i}", getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), out)
        out = _neuron(b, f"{name}.sn{i}", getattr(block, f"sn{i}"), out)
    identity = x
    if block.downsample is not None:
        identity = sequence(b, children(f"{name}.downsample", block.downsample), x)
    junction = nir.Scale(np.ones(out.shape, dtype=np.float32))
    return b.add(f"{name}.add", junction, identity, out, spikes=False)


def _layer(b: GraphBuilder, name: str, module: nn.Module, x: Signal) -> Signal:
    """The nodes of one layer that is not a convolution (those are paired with their BN)."""
    if isinstance(module, nn.Sequential):
        return sequence(b, children(name, module), x)
    if isinstance(module, SEWBlock):
        return _sew_block(b, name, module, x)
    if isinstance(module, (neuron.BaseNode, neuron.SimpleBaseNode)):
        return _neuron(b, name, module, x)
    if isinstance(module, nn.MaxPool2d):
        return _max_pool(b, name, module, x)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _avg_pool(b, name, module, x)
    if isinstance(module, nn.Flatten):
        plain = layer.Flatten(module.start_dim, module.end_dim)
        return b.add(name, exchange_node(plain, x.shape), x, spikes=x.spikes)
    if isinstance(module, nn.Linear):
        return _linear(b, name, module, x)
    if isinstance(module, layer.VotingLayer):
        return _voting(b, name, module, x)
    raise _refuse(name, module, "NIR has no node for it")


def sequence(b: GraphBuilder, modules: list[tuple[str, nn.Module]], x: Signal) -> Signal:
    """The nodes of ``modules`` applied in order to ``x``; a convolution takes the BatchNorm
    that follows it; dropout (the identity in inference) leaves no node."""
    i = 0
    while i < len(modules):
        name, module = modules[i]
        following = modules[i + 1][1] if i + 1 < len(modules) else None
        if isinstance(module, SKIPPED_IN_INFERENCE):
            i += 1
        elif isinstance(module, nn.Conv2d):
            bn = following if isinstance(following, nn.BatchNorm2d) else None
            x = _conv(b, name, module, bn, x)
            i += 2 if bn is not None else 1
        elif isinstance(module, nn.BatchNorm2d):
            raise _refuse(name, module, "only BatchNorm right after a convolution is folded")
        else:
            x = _layer(b, name, module, x)
            i += 1
    return x


def model_parts(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The model's layers as (static stem, per-step layers) in order, with their names.

    The stem, which the model runs once on the static image, is run at every step in the graph
    (same input, same output). SEW ResNet's fc, applied by the model to the features averaged
    over T, is a per-step layer here: it is affine, so averaging before or after it is the same.
    """
    entry = next((e for e in MODELS.values() if type(model) is e.target), None)
    if entry is None or entry.nir_parts is None:
        exported = ", ".join(e.target.__name__ for e in MODELS.values() if e.nir_parts is not None)
        raise ExportError(f"model {type(model).__name__} has no NIR export; the exported models are {exported} "
                          "(a model of your own: register_model(..., nir_parts=...), docs/architecture.md)")
    return entry.nir_parts(model)


def model_graph(model: nn.Module, image_shape: tuple[int, int, int],
                metadata: dict[str, Any] | None = None) -> nir.NIRGraph:
    """The NIR graph of ``model`` (eval mode, plain weights) for images ``[C, H, W]``."""
    stem, steps = model_parts(model)
    b = GraphBuilder()
    x = b.add("input", nir.Input({"input": np.array(image_shape)}), spikes=False, shape=image_shape)
    x = sequence(b, stem + steps, x)
    b.add("output", nir.Output({"output": np.array(x.shape)}), x, spikes=x.spikes, shape=x.shape)
    info = {**describe(model), **(metadata or {})}
    return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=info)


def describe(model: nn.Module) -> dict[str, Any]:
    """Graph metadata that tells a reader how to feed the graph and read its output."""
    votes = [name for name, m in model.named_modules() if isinstance(m, layer.VotingLayer)]
    voting = f" (node {votes[0]} is the voting layer: a Linear averaging each group)" if votes else ""
    return {
        "stds_nir_format": NIR_FORMAT_VERSION,
        "model": type(model).__name__,
        "T": int(model.T),
        "dt": DT,
        "input": "one static image [C, H, W] as the run's dataset yields it (see dataset), fed "
                 "unchanged at each of the T steps; all neuron states start at v_reset",
        "readout": "class scores = the output node's values averaged over the T steps; the "
                   f"predicted class is their argmax{voting}",
        "neurons": "parameters for a forward-Euler step of dt = 1 per time step: LIF v <- v + "
                   "(v_leak - v + r * I) / tau, IF v <- v + r * I; spike when v reaches "
                   "v_threshold (SpikingJelly fires at v >= v_threshold), then v <- v_reset",
        "max_pool": "SumPool2d node <layer>.sum then Threshold node <layer> (0.5): max pooling of "
                    "0/1 spikes",
        "junctions": "Scale nodes <block>.add (all ones) sum their two incoming edges (SEW ADD)",
    }


def zero_weights(graph: nir.NIRGraph, names: Iterable[str]) -> int:
    """Exactly-zero entries of the ``weight`` of the nodes ``names``."""
    return sum(int(np.count_nonzero(graph.nodes[name].weight == 0)) for name in names)


@dataclass(frozen=True)
class NirExport:
    """A written ``model.nir``: its path, graph, pruned-layer node names and zero counts."""

    path: Path
    graph: nir.NIRGraph
    pruned: list[str]
    zeros_in_file: int
    zeros_in_run: int


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """``[C, H, W]`` of the run's images (``dataset.in_channels``, ``dataset.image_size``)."""
    dataset = config.get("dataset") or {}
    try:
        size = int(dataset["image_size"])
        return int(dataset["in_channels"]), size, size
    except (KeyError, TypeError, ValueError):
        raise ExportError("the run's config has no dataset.in_channels and dataset.image_size; "
                          "the NIR graph needs the image shape") from None


def export_nir(run_dir: Path | str, which: str = "last", out: Path | str | None = None,
               verbose: bool = True) -> NirExport:
    """Write the NIR graph of ``checkpoints/<which>.pt`` to ``out`` (default
    ``<run_dir>/model.nir``); print what it holds if ``verbose``."""
    net = trained_network(run_dir, which)
    metadata = {
        "source": json.dumps(net.source),
        "dataset": json.dumps(net.config.get("dataset")),
        "pruned_layers": ",".join(net.layers),
        "zero_weights": int(net.sparsity["zeros"]),
    }
    graph = model_graph(net.model, image_shape(net.config), metadata)
    zeros = zero_weights(graph, net.layers)
    target = Path(out) if out is not None else Path(run_dir) / NIR_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    nir.write(tmp, graph)
    tmp.replace(target)
    result = NirExport(target, graph, net.layers, zeros, int(net.sparsity["zeros"]))
    if verbose:
        print(summary(result))
    return result


def summary(result: NirExport) -> str:
    """Two lines: the file and its nodes; the zero weights in the file against the run's."""
    kinds: dict[str, int] = {}
    for node in result.graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    listing = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    numel = sum(result.graph.nodes[name].weight.size for name in result.pruned)
    same = "same as" if result.zeros_in_file == result.zeros_in_run else "DIFFERS from"
    return (f"{result.path}: {len(result.graph.nodes)} nodes ({listing}), "
            f"{len(result.graph.edges)} edges\n"
            f"zero weights in the {len(result.pruned)} pruned layers: {result.zeros_in_file:,} of "
            f"{numel:,} ({100 * result.zeros_in_file / max(numel, 1):.2f}%), {same} the run's "
            f"{result.zeros_in_run:,}")
