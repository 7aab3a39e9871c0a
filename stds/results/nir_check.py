"""Run an exported ``model.nir`` in another framework and compare it with `stds`.

Readers. ``norse_from_nir`` builds the graph with Norse (the ``.[nir]`` extra), whose dynamics
are those of the file: it reads ``dt`` and integrates LIF as ``v += dt / tau * (v_leak - v + I)``
and IF as ``v += I``, resets to a value, and fires on ``v > v_threshold`` (SpikingJelly fires on
``v >= v_threshold``; the two differ only when v lands exactly on the threshold). snnTorch's
importer fixes dt = 1e-4, turns NIR's IF into a leaky neuron (beta 0.9) with subtractive reset
and reads no pooling, so it cannot run these graphs as written. ``spikingjelly_from_nir`` builds
it with SpikingJelly's own importer (the round trip of the tests).

Neither importer has every node the graph uses, so both get the same small modules for them
(`NODE_ADDITIONS`): ``SumPool2d`` with its padding (nirtorch's default drops the padding),
``Threshold`` (``x > threshold``, as NIR defines it) and ``Scale``; Norse also gets a batched
``Flatten`` (its own flattens the batch dimension too, as NIR's dims exclude it).
"""

from __future__ import annotations

import importlib.metadata
import keyword
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nir
import nirtorch
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from spikingjelly.activation_based import functional
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stds.errors import ExportError
from stds.results.pruned import trained_network
from stds.results.nir import DT, NIR_NAME
from stds.run.setup.config import instantiate_node

__all__ = [
    "NODE_ADDITIONS",
    "CheckResult",
    "check_run",
    "format_check",
    "graph_forward",
    "norse_from_nir",
    "spikingjelly_from_nir",
    "stds_forward",
]


class SumPool2d(nn.Module):
    """NIR's SumPool2d: the sum of each window, zero padding included (exact on integers)."""

    def __init__(self, node: nir.SumPool2d) -> None:
        super().__init__()
        self.kernel = tuple(int(k) for k in np.broadcast_to(node.kernel_size, (2,)))
        self.stride = tuple(int(s) for s in np.broadcast_to(node.stride, (2,)))
        self.padding = tuple(int(p) for p in np.broadcast_to(node.padding, (2,)))

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, divisor_override=1)


class Threshold(nn.Module):
    """NIR's Threshold: 1 where the input is above the threshold, else 0."""

    def __init__(self, node: nir.Threshold) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.from_numpy(np.asarray(node.threshold)))

    def forward(self, x: Tensor) -> Tensor:
        return (x > self.threshold).to(x.dtype)


class Scale(nn.Module):
    """NIR's Scale: the input (the sum of the incoming edges) times ``scale``, elementwise."""

    def __init__(self, node: nir.Scale) -> None:
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(np.asarray(node.scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class BatchedFlatten(nn.Flatten):
    """NIR's Flatten on a batch: NIR's dims count from the first dim after the batch."""

    def __init__(self, node: nir.Flatten) -> None:
        start, end = int(node.start_dim), int(node.end_dim)
        super().__init__(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)


NODE_ADDITIONS: dict[type, Callable[[Any], nn.Module]] = {
    nir.SumPool2d: SumPool2d,
    nir.Threshold: Threshold,
    nir.Scale: Scale,
}
"""Torch modules for the nodes the importers lack (or, for SumPool2d, read without padding)."""


def spikingjelly_from_nir(graph: nir.NIRGraph, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The graph as SpikingJelly's importer builds it (single-step; call with ``state``).

    ``import_from_nir`` takes no extra node types, so its node mapper is used with
    `NODE_ADDITIONS` through ``nirtorch.nir_to_torch``, as ``import_from_nir`` itself does.
    """
    from spikingjelly.activation_based.nir_exchange import from_nir

    node_map = {**from_nir._NodeMapper(dt=DT).map_dict, **NODE_ADDITIONS}
    return nirtorch.nir_to_torch(graph, node_map, dtype=dtype)


def norse_from_nir(graph: nir.NIRGraph, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The graph as Norse's importer builds it, at ``dt = 1``.

    Norse's ``from_nir`` maps every node through ``_import_norse_module`` and takes no extra
    node types; that mapper is used here for the nodes it covers (Conv2d, Linear, Affine, LIF,
    IF), `NODE_ADDITIONS` and `BatchedFlatten` for the rest. Norse resets to 0 whatever the
    node's ``v_reset`` says, so a graph with another reset is refused.
    """
    try:
        with warnings.catch_warnings():  # Norse 1.1 scripts functions with the deprecated torch.jit
            warnings.simplefilter("ignore", FutureWarning)
            from norse.torch.utils.import_nir import _import_norse_module
    except ImportError:
        raise ExportError("the NIR check needs Norse: pip install -e '.[nir]'") from None
    for name, node in graph.nodes.items():
        if isinstance(node, (nir.LIF, nir.IF)) and np.any(node.v_reset != 0):
            raise ExportError(f"node {name} resets to v_reset != 0, which Norse's importer ignores; "
                              "the check runs only graphs with v_reset=0")
    norse_node = partial(_import_norse_module, dt=DT)
    node_map = {kind: norse_node for kind in (nir.Affine, nir.Conv2d, nir.Linear, nir.LIF, nir.IF)}
    node_map.update({**NODE_ADDITIONS, nir.Flatten: BatchedFlatten})
    return nirtorch.nir_to_torch(graph, node_map, dtype=dtype)


def module_name(node: str) -> str:
    """The attribute name nirtorch gives the module of NIR node ``node``."""
    name = node.replace(".", "_")
    return "nir_node_" + name if keyword.iskeyword(name) else name


def neuron_nodes(graph: nir.NIRGraph) -> list[str]:
    """Names of the graph's LIF and IF nodes, in graph order."""
    return [name for name, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.IF))]


def _count_spikes(modules: dict[str, nn.Module], counts: dict[str, int]) -> list[Any]:
    """Forward hooks adding each module's output spikes (first element of a tuple) to ``counts``."""
    def hook(name: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        spikes = output[0] if isinstance(output, tuple) else output
        counts[name] += int(spikes.sum().item())

    return [m.register_forward_hook(partial(hook, name)) for name, m in modules.items()]


def graph_forward(module: nn.Module, graph: nir.NIRGraph, images: Tensor, T: int,
                  counts: dict[str, int] | None = None) -> Tensor:
    """Class scores of an imported graph: ``images`` fed at each of ``T`` steps, the output
    averaged over the steps. Spikes of each LIF/IF node are added to ``counts`` if given."""
    modules = {name: module.get_submodule(module_name(name)) for name in neuron_nodes(graph)}
    hooks = _count_spikes(modules, counts) if counts is not None else []
    try:
        state, total = None, 0.0
        with torch.no_grad():
            for _ in range(T):
                out, state = module(images, state)
                total = total + out
    finally:
        for handle in hooks:
            handle.remove()
    return total / T


def stds_forward(model: nn.Module, images: Tensor, names: list[str],
                 counts: dict[str, int] | None = None) -> Tensor:
    """The model's class scores (eval mode); spikes of its neuron layers ``names`` (summed over
    steps) added to ``counts`` if given."""
    modules = {name: model.get_submodule(name) for name in names}
    hooks = _count_spikes(modules, counts) if counts is not None else []
    try:
        with torch.no_grad():
            scores = model(images)
    finally:
        for handle in hooks:
            handle.remove()
        functional.reset_net(model)
    return scores


@dataclass(frozen=True)
class CheckResult:
    """Agreement of the other framework with `stds` on the test images."""

    framework: str
    images: int
    same_class: int
    correct_stds: int
    correct_other: int
    spikes_stds: dict[str, int]
    spikes_other: dict[str, int]
    T: int
    dtype: str


def run_test_set(config: dict[str, Any]) -> Any:
    """The run's test dataset; only the datasets of `stds.data` are built from a saved config."""
    node = config.get("dataset") or {}
    target = str(node.get("_target_", ""))
    if not target.startswith("stds.data."):
        raise ExportError(f"dataset._target_={target!r} is not one of stds.data's datasets; the "
                          "check builds only those from a run's config")
    return instantiate_node(OmegaConf.create(node), "dataset").test


def check_run(run_dir: Path | str, path: Path | str | None = None, which: str = "last",
              limit: int | None = None, batch_size: int = 256,
              dtype: torch.dtype = torch.float32) -> CheckResult:
    """Run ``path`` (default ``<run_dir>/model.nir``) in Norse on the run's test set (the first
    ``limit`` images if given) and compare classes and spike counts with the run's model."""
    net = trained_network(run_dir, which)
    graph = nir.read(Path(path) if path is not None else Path(run_dir) / NIR_NAME)
    other = norse_from_nir(graph, dtype)
    model = net.model.to(dtype)
    names = neuron_nodes(graph)
    spikes_stds, spikes_other = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    dataset = run_test_set(net.config)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    same = correct_stds = correct_other = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = images.to(dtype)
        ours = stds_forward(model, images, names, spikes_stds).argmax(dim=1)
        theirs = graph_forward(other, graph, images, model.T, spikes_other).argmax(dim=1)
        same += int((ours == theirs).sum())
        correct_stds += int((ours == labels).sum())
        correct_other += int((theirs == labels).sum())
    version = importlib.metadata.version("norse")
    return CheckResult(f"Norse {version}", len(dataset), same, correct_stds, correct_other,
                       spikes_stds, spikes_other, model.T, str(dtype).removeprefix("torch."))


def format_check(result: CheckResult) -> str:
    """The agreement line, the accuracies and a table of spikes per neuron layer."""
    n, short = max(result.images, 1), result.framework.split()[0]
    ran = (f"check: {result.framework} ran the graph on {result.images} test images, "
           f"T={result.T}, {result.dtype}")
    same = (f"predicted class: same as stds on {result.same_class} of {result.images} images "
            f"({100 * result.same_class / n:.2f}%); test accuracy stds "
            f"{100 * result.correct_stds / n:.2f}%, {short} {100 * result.correct_other / n:.2f}%")
    header = f"{'layer':<24} {'stds spikes':>14} {short + ' spikes':>14} {'difference':>11}"
    lines = [ran, same, header]
    for name, ours in result.spikes_stds.items():
        theirs = result.spikes_other[name]
        lines.append(f"{name:<24} {ours:>14,} {theirs:>14,} {theirs - ours:>+11,}")
    return "\n".join(lines)
