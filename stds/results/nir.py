"""Export a trained run as a NIR graph (Neuromorphic Intermediate Representation): ``model.nir``.

The graph computes, one time step per evaluation of the graph, what the model computes in
inference (``docs/nir.md`` has the derivations):

- the static image enters at node ``input`` and is fed unchanged at each of the ``T`` steps;
- a convolution followed by BatchNorm is one ``Conv2d`` node with the BatchNorm folded in
  (weight ``w * s`` and bias ``beta - mean * s``, ``s = gamma / sqrt(var + eps)`` per output
  channel), so every pruned zero stays exactly zero; nodes are named after the model's layers;
- LIF and IF neurons are SpikingJelly's exchange nodes for a time step ``dt`` (default 1e-4 s,
  the step SpikingJelly's and snnTorch's importers assume): LIF ``tau`` = steps x dt, ``r = 1``
  (decay_input), ``v_leak = v_reset``; IF ``r = 1 / dt``; hard reset to ``v_reset``, a field
  left out of the file where it is 0 (nir 1.0.4 cannot parse it; nir >= 1.0.6 reads it back as 0);
- max pooling of 0/1 spikes is a window sum (``<layer>.sum``) followed by a LIF node
  (``<layer>``) that fires exactly when the sum is at least one spike (`POOL_NEURON`); the sum is
  a ``SumPool2d`` node, or, where the pooling is padded, a ``Conv2d`` of ones per channel with
  the padding, which readers cannot drop (they read SumPool2d without its padding);
- a SEW ``ADD`` junction is a 1x1 ``Conv2d`` of identity weights (``<block>.add``) with two
  incoming edges (NIR sums the edges that enter a node): a node every reader maps;
- CIFAR10Net's voting layer is a ``Linear`` node averaging each group of output neurons;
- the class scores are the ``output`` node's values averaged over the T steps (graph metadata
  ``readout``); SEW ResNet's fc, which the model applies to time-averaged features, is applied
  at every step, which gives the same average because it is affine;
- flatten dims are negative (``-3 .. -1``), which every reader applies to a batch unchanged.

SpikingJelly's ``nir_exchange.export_to_nir`` writes the Conv2d, Linear, LIF and IF nodes; it
works on one traced module, so each such layer is exported alone and the graph (edges, BatchNorm
folding, max pooling, junctions, voting) is assembled here, which the exchange has no mappings for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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

__all__ = [
    "DT",
    "POOL_NEURON",
    "fold_batchnorm",
    "identity_conv",
    "model_graph",
]

NIR_FORMAT_VERSION = 2
DT = 1e-4
"""Default time step (s) the neuron parameters are written for: one SpikingJelly step is ``dt``;
1e-4 is what SpikingJelly's importer assumes by default and what snnTorch's importer fixes."""
POOL_NEURON = {"tau_steps": 2.0, "v_threshold": 0.25}
"""The neuron after a window sum of 0/1 spikes: a LIF (v_leak 0, reset to 0) starts every step
at 0 (it either fired and reset, or got 0 and stayed at 0), so v = sum / 2 and it fires exactly
when the sum is at least 1 (0.5 > 0.25; a sum of 0 leaves v = 0). A LIF, not an IF: snnTorch 1.0
reads NIR's IF as a leaky neuron with subtractive reset, which does not return to 0."""

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
    """Nodes and edges of the graph being assembled, in the order they are added, and the time
    step ``dt`` the neuron parameters are written for."""

    dt: float = DT
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


def exchange_node(module: nn.Module, shape: tuple[int, ...], dt: float = DT) -> nir.NIRNode:
    """The node SpikingJelly's ``export_to_nir`` writes for one single-step layer whose input
    is ``[1, *shape]`` (the layer traced alone inside an ``nn.Sequential``)."""
    graph = export_to_nir(nn.Sequential(module), torch.zeros(1, *shape), dt=dt)
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
    return b.add(name, exchange_node(plain_neuron(name, module), x.shape, b.dt), x, spikes=True)


def identity_conv(channels: int, kernel: tuple[int, int] = (1, 1), stride: tuple[int, int] = (1, 1),
                  padding: tuple[int, int] = (0, 0), input_shape: tuple[int, int] | None = None
                  ) -> nir.Conv2d:
    """A Conv2d that sums each channel's window into the same channel (weights 1 from channel c
    to c, 0 elsewhere; no bias): exact on spikes and on sums of spikes. A 1x1 one is the identity."""
    weight = np.zeros((channels, channels, *kernel), dtype=np.float32)
    weight[np.arange(channels), np.arange(channels)] = 1.0
    return nir.Conv2d(input_shape, weight, np.array(stride), np.array(padding), np.array((1, 1)), 1,
                      np.zeros(channels, dtype=np.float32))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pool_neuron(b: GraphBuilder, name: str, x: Signal) -> Signal:
    """The LIF node that turns a window sum of spikes into "at least one spike" (`POOL_NEURON`)."""
    ones = np.ones(x.shape)
    node = nir.LIF(tau=ones * POOL_NEURON["tau_steps"] * b.dt, r=ones, v_leak=0 * ones,
                   v_threshold=ones * POOL_NEURON["v_threshold"], v_reset=0 * ones)
    return b.add(name, node, x, spikes=True)


def _max_pool(b: GraphBuilder, name: str, pool: nn.MaxPool2d, x: Signal) -> Signal:
    """Max pooling of 0/1 spikes as a window sum + `_pool_neuron`: a window's maximum is 1
    exactly when its sum is at least one spike. NIR has no max pooling. The sum is SumPool2d
    without padding; with padding a Conv2d (`identity_conv`), since the readers map SumPool2d
    to a pool without padding."""
    if not x.spikes:
        raise _refuse(name, pool, f"it pools the output of {x.node}, which is not 0/1 spikes; NIR "
                      "has no max pooling and SumPool2d + Threshold equals it only on spikes")
    if pool.ceil_mode or _pair(pool.dilation) != (1, 1):
        raise _refuse(name, pool, "only max pooling without ceil_mode or dilation")
    kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
    stride = _pair(pool.stride or pool.kernel_size)
    shape = F.max_pool2d(torch.zeros(1, *x.shape), kernel, stride, padding).shape[1:]
    if any(padding):
        window = identity_conv(x.shape[0], kernel, stride, padding, input_shape=x.shape[1:])
    else:
        window = nir.SumPool2d(np.array(kernel), np.array(stride), np.array(padding))
    summed = b.add(f"{name}.sum", window, x, spikes=False, shape=shape)
    return _pool_neuron(b, name, summed)


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


def _flatten(b: GraphBuilder, name: str, flatten: nn.Flatten, x: Signal) -> Signal:
    """Flatten as a node with negative dims: the readers shift positive NIR dims past the batch
    dim or not (SpikingJelly does, Norse and snnTorch do not); a negative dim means the same in
    all of them. The model's dims count the batch (dim 0), which is not flattened."""
    start, end = (d if d < 0 else d - 1 - len(x.shape) for d in (flatten.start_dim, flatten.end_dim))
    if start < -len(x.shape):
        raise _refuse(name, flatten, "it flattens the batch dimension")
    node = nir.Flatten({"input": np.array(x.shape)}, start, end)
    return b.add(name, node, x, spikes=x.spikes)


def _voting(b: GraphBuilder, name: str, voting: layer.VotingLayer, x: Signal) -> Signal:
    """CIFAR10Net's voting layer (the mean of each group of ``voting_size`` outputs) as Linear."""
    group = int(voting.voting_size)
    classes = x.shape[-1] // group
    weight = np.zeros((classes, x.shape[-1]), dtype=np.float32)
    for k in range(classes):
        weight[k, k * group:(k + 1) * group] = 1.0 / group
    return b.add(name, nir.Linear(weight), x, spikes=False)


def _sew_block(b: GraphBuilder, name: str, block: SEWBlock, x: Signal) -> Signal:
    """The block's units, its shortcut, and the ADD junction: an identity 1x1 Conv2d fed by both.
    The edge into the block's first unit comes before the shortcut's, so an executor that walks
    the graph depth first (Norse's) runs the units before the junction."""
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
    junction = identity_conv(out.shape[0], input_shape=out.shape[1:])
    return b.add(f"{name}.add", junction, identity, out, spikes=False, shape=out.shape)


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
        return _flatten(b, name, module, x)
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
                metadata: dict[str, Any] | None = None, dt: float = DT) -> nir.NIRGraph:
    """The NIR graph of ``model`` (eval mode, plain weights) for images ``[C, H, W]``, its
    neuron parameters written for a time step of ``dt`` seconds."""
    if not dt > 0:
        raise ExportError(f"dt={dt} is not valid; give a time step > 0 (seconds per step)")
    stem, steps = model_parts(model)
    b = GraphBuilder(dt=float(dt))
    x = b.add("input", nir.Input({"input": np.array(image_shape)}), spikes=False, shape=image_shape)
    x = sequence(b, stem + steps, x)
    b.add("output", nir.Output({"output": np.array(x.shape)}), x, spikes=x.spikes, shape=x.shape)
    info = {**describe(model, b.dt), **(metadata or {})}
    return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=info)


def describe(model: nn.Module, dt: float) -> dict[str, Any]:
    """Graph metadata that tells a reader how to feed the graph and read its output."""
    votes = [name for name, m in model.named_modules() if isinstance(m, layer.VotingLayer)]
    voting = f" (node {votes[0]} is the voting layer: a Linear averaging each group)" if votes else ""
    return {
        "stds_nir_format": NIR_FORMAT_VERSION,
        "model": type(model).__name__,
        "T": int(model.T),
        "dt": dt,
        "input": "one static image [C, H, W] as the run's dataset yields it (see dataset), fed "
                 "unchanged at each of the T steps; all neuron states start at v_reset",
        "readout": "class scores = the output node's values averaged over the T steps; the "
                   f"predicted class is their argmax{voting}",
        "neurons": f"parameters for a forward-Euler step of dt = {dt} s per time step (give "
                   "this dt to the reader): LIF v <- v + dt / tau * (v_leak - v + r * I), IF v <- "
                   "v + dt * r * I; spike when v reaches v_threshold, then v <- v_reset (0 where "
                   "the field is absent)",
        "max_pool": "window sum <layer>.sum (SumPool2d, or a Conv2d of ones per channel where "
                    "padded) then LIF node <layer> that fires when the sum is >= 1 spike",
        "junctions": "1x1 identity Conv2d nodes <block>.add sum their two incoming edges (SEW ADD)",
    }
