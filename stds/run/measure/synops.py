"""Synaptic operations (SynOps) and firing rates of a spiking model at evaluation.

Counting rules (every number is per evaluated sample: the batch total divided by its size):

- A weight op (convolution, ``mm``, ``addmm``, ``bmm``, ``baddbmm``, which is what ``nn.Conv*``
  and ``nn.Linear`` dispatch to, on any number of leading dimensions) whose input is a *spike
  tensor* performs one synaptic operation per spike arriving per non-zero outgoing weight:
  ``sum over input units of spikes x (number of non-zero weights that spike meets)``. Convolution
  borders are exact: a spike near the edge meets only the kernel positions that land inside the
  output. The multi-step layers see all T steps, so the count is summed over T.
- A spike tensor is a bool tensor or one whose values are all non-negative integers (spike
  counts, as the ADD junction of SEW ResNet produces; a value k counts as k spikes).
- Any other input is *analog* (real-valued, such as the static image) and its op is counted as
  multiply-accumulates with non-zero weights: every non-zero weight once per output position
  (zero padding included, the usual MAC count) for a convolution, once per input row for a
  matrix product. An analog layer is counted as executed: the models run their stem once on the
  static image (not once per step), so its MACs are not multiplied by T.
- ``first_layer_macs`` holds the MACs of the first analog weight layer executed (the stem);
  ``macs`` holds all analog layers (it also holds, e.g., a classifier on time-averaged spikes).

These rules are `extra_rules` of SpikingJelly's `SynOpCounter` (whose own rules count spikes x
fan-out and ignore zero weights) run under its `DispatchCounterMode`. Pruned weights come out of
their reparameterization before the op, so ``(w != 0)`` sees the pruned network.

Firing rate of a spiking layer (every `neuron.BaseNode`): mean number of output spikes per
neuron per time step, over every sample it saw (`FiringRates`).
"""

from __future__ import annotations

import contextlib
import weakref
from math import prod
from typing import Any, Callable, Iterator

import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.op_counter import BaseCounter, DispatchCounterMode, SynOpCounter
from torch import Tensor, nn

from stds.method.sparse import unwrap_model
from stds.models.neurons import NeuronHooks

__all__ = ["FiringRates", "count_synops", "is_spike_tensor", "mac_rules", "synop_rules"]

aten = torch.ops.aten
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
"""Layers whose ops are reported per layer."""


def is_spike_tensor(x: Tensor) -> bool:
    """True when ``x`` is bool or all its values are non-negative integers (spike counts)."""
    if x.dtype == torch.bool:
        return True
    if not x.is_floating_point():
        return bool((x >= 0).all())
    return bool(((x >= 0) & (x == torch.floor(x))).all())


@contextlib.contextmanager
def _exact_arithmetic(device: torch.device) -> Iterator[None]:
    """Ops run by the rules themselves: not seen by a dispatch mode, not autocast.

    The rules run inside `DispatchCounterMode.__torch_dispatch__`, where PyTorch has already
    popped that mode, so the counter never sees them; but a dispatch mode *around* the count
    (FlopCounterMode, the profiler's, another counter) would count the rules' own reductions and
    counting convolutions. Excluding the Python dispatch key hides them from every mode. PyTorch
    has no public call for this (``torch.utils._python_dispatch._disable_current_modes`` is
    private too, and pops the modes instead), hence the private guard, used here only.
    """
    guard = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python))
    with torch.no_grad(), guard, torch.autocast(device.type, enabled=False):
        yield


def _matmul_synops(x: Tensor, w: Tensor) -> int:
    """``x [B, in] @ w [in, out]``: sum_i (spikes into unit i) x (non-zero weights in row i)."""
    with _exact_arithmetic(x.device):
        spikes_per_input = x.to(torch.float64).sum(dim=0)
        fan_out = (w != 0).sum(dim=1).to(torch.float64)
        return int(torch.dot(spikes_per_input, fan_out).item())


def _batched_matmul_synops(x: Tensor, w: Tensor) -> int:
    """``x [G, B, in] @ w [G, in, out]``: `_matmul_synops` summed over G."""
    with _exact_arithmetic(x.device):
        spikes_per_input = x.to(torch.float64).sum(dim=1)
        fan_out = (w != 0).sum(dim=2).to(torch.float64)
        return int((spikes_per_input * fan_out).sum().item())


_FLOAT32_EXACT = 2**24
"""Integers up to this bound, and sums of non-negative ones that stay below it, are exact in
float32."""


def _conv_synops(x: Tensor, w: Tensor, conv_args: tuple) -> int:
    """Spikes x non-zero weights reached, borders exact: a convolution of the spikes with the
    count of non-zero weights over each group's output channels (one output channel per group).

    The convolution runs in float32 (fast kernels) when no output element can reach 2**24 (all
    terms are non-negative integers, so every partial sum is exact), else in float64; the
    elements are summed in float64.
    """
    stride, padding, dilation, transposed, output_padding, groups = conv_args
    with _exact_arithmetic(x.device):
        mask = (w != 0).to(torch.float32)
        if not transposed:  # weight [out, in/groups, ...] -> [groups, in/groups, ...]
            out_channels = mask.shape[0]
            mask = mask.reshape(groups, out_channels // groups, *mask.shape[1:]).sum(dim=1)
        # transposed: weight [in, out/groups, ...], counted with the full mask. An output
        # element meets each mask entry of its group at most once, each with at most max(x).
        per_output = mask.sum() if transposed else mask.flatten(1).sum(dim=1).max()
        bound = float(x.max()) * float(per_output) if x.numel() else 0.0
        dtype = torch.float32 if bound < _FLOAT32_EXACT else torch.float64
        counts = torch.ops.aten.convolution.default(
            x.to(dtype), mask.to(dtype), None, stride, padding, dilation, transposed,
            output_padding, groups)
        return int(counts.sum(dtype=torch.float64).item())


def _nonzero(w: Tensor) -> int:
    with _exact_arithmetic(w.device):
        return int((w != 0).sum().item())


def _split_conv(args: tuple) -> tuple[Tensor, Tensor, tuple]:
    x, w, _bias, *conv_args = args[:9]
    return x, w, tuple(conv_args)


def _mm_operands(func: Any, args: tuple) -> tuple[Tensor, Tensor]:
    return (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else args[:2]


def _rule(func: Any, spikes: bool) -> Callable[[tuple, dict, Any], int]:
    """The counting rule of ``func`` for spike inputs (``spikes``) or for analog inputs."""

    def count(args: tuple, kwargs: dict, out: Any) -> int:
        if func == aten.convolution.default:
            x, w, conv_args = _split_conv(args)
        else:
            x, w = _mm_operands(func, args)
        if is_spike_tensor(x) != spikes:
            return 0
        if not spikes:  # analog: MACs with non-zero weights
            if func == aten.convolution.default:
                transposed = conv_args[3]
                positions = prod((x if transposed else out).shape[2:])
                return _nonzero(w) * (x if transposed else out).shape[0] * positions
            return _nonzero(w) * x.shape[-2]  # each non-zero weight once per input row
        if func == aten.convolution.default:
            return _conv_synops(x, w, conv_args)
        if x.dim() == 3:
            return _batched_matmul_synops(x, w)
        return _matmul_synops(x, w)

    return count


_WEIGHT_OPS = (
    aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.baddbmm.default,
)


def synop_rules() -> dict[Any, Callable]:
    """`SynOpCounter` ``extra_rules``: spike inputs count spikes x non-zero weights; analog 0."""
    return {func: _rule(func, spikes=True) for func in _WEIGHT_OPS}


def mac_rules() -> dict[Any, Callable]:
    """Rules of the MAC counter: analog inputs count MACs with non-zero weights; spikes 0."""
    return {func: _rule(func, spikes=False) for func in _WEIGHT_OPS}


_ACTIVE_MONITORS: "weakref.WeakSet[FiringRates]" = weakref.WeakSet()
"""Monitors inside their ``with`` block; `count_synops` pauses those watching its model."""


class FiringRates(NeuronHooks):
    """Firing rate of every spiking layer (`neuron.BaseNode`) over the forward passes in a block.

    ``with FiringRates(model) as fr: <evaluation loop>`` then ``fr.rates()`` ->
    ``{qualified layer name: mean spikes per neuron per time step}``. One forward hook per
    spiking layer adds its output's sum on the device (no host synchronisation until `rates`).
    A `count_synops` pass inside the block is not recorded, so the first batch is not counted
    twice. Under DDP each rank sees only its share of the test set.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        super().__init__(self.model)
        self.paused = False
        self._spikes: dict[str, Tensor] = {}
        self._outputs: dict[str, int] = {}

    def __enter__(self) -> FiringRates:
        super().__enter__()
        _ACTIVE_MONITORS.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _ACTIVE_MONITORS.discard(self)

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if self.paused or not torch.is_tensor(output):
                return
            total = output.detach().sum(dtype=torch.float64)
            self._spikes[name] = self._spikes[name] + total if name in self._spikes else total
            self._outputs[name] = self._outputs.get(name, 0) + output.numel()

        return record

    def watches(self, model: nn.Module) -> bool:
        """True when one of the spiking layers watched here belongs to ``model``."""
        watched = set(self.neurons.values())
        return any(m in watched for m in unwrap_model(model).modules())

    def rates(self) -> dict[str, float]:
        """Layer name -> spikes / (neurons x time steps x samples) over what was recorded."""
        return {
            name: float(self._spikes[name]) / self._outputs[name]
            for name in self.neurons
            if self._outputs.get(name)
        }

    def reset(self) -> None:
        """Forget what was recorded."""
        self._spikes.clear()
        self._outputs.clear()


@contextlib.contextmanager
def _paused_monitors(model: nn.Module) -> Iterator[None]:
    paused = [m for m in list(_ACTIVE_MONITORS) if not m.paused and m.watches(model)]
    for monitor in paused:
        monitor.paused = True
    try:
        yield
    finally:
        for monitor in paused:
            monitor.paused = False


def _per_layer(
    core: nn.Module, synop_counter: BaseCounter, mac_counter: BaseCounter, samples: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-sample SynOps of spike-driven layers and MACs of analog layers, in execution order."""
    root = type(core).__name__
    scopes = {
        f"{root}.{name}" if name else root: name
        for name, m in core.named_modules()
        if isinstance(m, WEIGHT_LAYER_TYPES)
    }
    synops_layers, macs_layers = {}, {}
    for scope in synop_counter.records:  # a scope is first recorded when its layer first runs
        if scope not in scopes:
            continue
        synops = sum(synop_counter.records[scope].values())
        macs = sum(mac_counter.records.get(scope, {}).values())
        if macs:
            macs_layers[scopes[scope]] = macs / samples
        if synops or not macs:
            synops_layers[scopes[scope]] = synops / samples
    return synops_layers, macs_layers


@torch.no_grad()
def count_synops(model: nn.Module, images: Tensor, samples: int | None = None) -> dict[str, Any]:
    """SynOps, MACs and firing rates of one forward pass of ``images``, per sample.

    Returns ``synops`` (spike-driven ops x non-zero weights, summed over T and all layers),
    ``first_layer_macs`` (MACs of the first analog layer: the stem on the static image),
    ``macs`` (all analog layers), ``synops_layers`` / ``macs_layers`` (qualified layer name ->
    per-sample count), ``firing_rates`` (of this batch) and ``samples``. All counts are floats
    (batch totals divided by ``samples``, by default ``images.shape[0]``). See the module
    docstring for the rules.

    Cost: one extra forward pass under a Python dispatch mode, plus per weight op a few
    reductions, two host synchronisations and, for a convolution, one float32 convolution with
    one output channel per group (CIFAR10Net, T=4, 16 images on 2 CPU cores: about 1.45x the
    plain forward). ``reset_net`` is called before and after. Call it on the
    unwrapped model, in evaluation mode, once per evaluation on one batch.
    """
    core = unwrap_model(model)
    samples = int(images.shape[0] if samples is None else samples)
    synop_counter = SynOpCounter(extra_rules=synop_rules())
    mac_counter = BaseCounter()
    mac_counter.rules.update(mac_rules())
    functional.reset_net(core)
    with _paused_monitors(core), FiringRates(core) as rates:
        try:
            with DispatchCounterMode([synop_counter, mac_counter]):
                core(images)
        finally:
            functional.reset_net(core)
    synops_layers, macs_layers = _per_layer(core, synop_counter, mac_counter, samples)
    return {
        "samples": samples,
        "synops": synop_counter.get_total() / samples,
        "first_layer_macs": next(iter(macs_layers.values()), 0.0),
        "macs": mac_counter.get_total() / samples,
        "synops_layers": synops_layers,
        "macs_layers": macs_layers,
        "firing_rates": rates.rates(),
    }
