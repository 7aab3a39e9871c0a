"""Speed settings of a training run and the probes that check them.

Settings (``channels_last`` and ``compile`` in ``conf/train.yaml``):

- `resolve_channels_last`: ``channels_last=auto`` is on for a model with convolutions on CUDA.
  cuDNN's fast fp16/bf16 convolutions work in NHWC; with NCHW tensors it converts the layout
  around every convolution (the cost is in ``benchmarks/RESULTS.md``). With the model's
  weights in channels_last (`apply_layout`) and the input batch converted too
  (`to_device_batch`), each time step stays channels_last through conv, BN, pooling and the
  neurons. On CPU ``auto`` is off (measured slower or no faster there; see
  ``benchmarks/RESULTS.md``).
- `maybe_compile`: ``compile=true`` wraps the model in `torch.compile`. The reparameterized
  layers and SpikingJelly's neurons trace as one graph without breaks (the threshold d is read
  from its buffer under compilation, so changing d does not recompile).

Probes (used by ``benchmarks/step_time.py`` and the tests):

- `NeuronPathProbe`: which path each spiking neuron really took in a forward pass, by the
  condition SpikingJelly checks (`stds.models.neurons.fused_kernel_condition`).
- `profile_step`: kernel launches, GPU-busy time and fused neuron operator calls of one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from stds.errors import ConfigError
from stds.models.neurons import NeuronHooks, fused_kernel_condition

CHANNELS_LAST_CHOICES = ("auto", "true", "false")
"""Valid values of ``channels_last``."""

FUSED_NEURON_OPS = ("sj_lif::forward", "sj_if::forward")
"""Names of SpikingJelly's fused LIF / IF operators as the profiler records them."""


def check_channels_last(value: object) -> str:
    """``channels_last`` normalised to ``auto``, ``true`` or ``false``; else `ConfigError`."""
    text = str(value).strip().lower()
    if text not in CHANNELS_LAST_CHOICES:
        raise ConfigError(
            f"channels_last={value!r} is not valid; use one of {', '.join(CHANNELS_LAST_CHOICES)}"
        )
    return text


def has_convolutions(model: nn.Module) -> bool:
    """True when ``model`` holds a 2-d convolution (the layers channels_last speeds up)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def resolve_channels_last(value: object, model: nn.Module, device: torch.device) -> bool:
    """Whether to train in channels_last: ``auto`` = CUDA and a convolutional model."""
    setting = check_channels_last(value)
    if setting == "auto":
        return torch.device(device).type == "cuda" and has_convolutions(model)
    return setting == "true"


def apply_layout(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device``, its 4-d weights to channels_last if asked (in place).

    Call it on the bare model, before `DistributedDataParallel` and before the optimizer is
    built (DDP's gradient buckets and the optimizer's state follow the parameters' layout).
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(model)`` when ``compile`` is set, else ``model`` itself.

    Under DDP, pass the DDP-wrapped model (`torch.compile` then splits the graph at DDP's
    gradient buckets). The returned module shares parameters and neuron state with ``model``.
    """
    return torch.compile(model) if compile else model


def to_device_batch(
    images: torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """``images [N, C, H, W]`` on ``device`` (asynchronous from pinned memory), in the model's
    layout: a channels_last model needs a channels_last batch, or its first convolution
    converts it."""
    device = torch.device(device)
    images = images.to(device, non_blocking=device.type == "cuda")
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


class NeuronPathProbe(NeuronHooks):
    """Records, for every spiking neuron call inside the ``with`` block, whether it met the
    fused-kernel condition (``fused_calls`` of ``calls``).

    It reads the neuron's input dtype, its state after the call and its surrogate, as
    SpikingJelly's ``lif_multi_step`` / ``if_multi_step`` do (on the eager model: `NeuronHooks`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls = 0
        self.fallback: list[str] = []

    def hook(self, name: str) -> Callable[..., None]:
        def record(node: nn.Module, args: tuple, output: object) -> None:
            self.calls += 1
            if not fused_kernel_condition(args[0].dtype, node.v, node.surrogate_function):
                self.fallback.append(f"{name} (input {args[0].dtype}, state {_dtype(node.v)})")

        return record

    @property
    def fused_calls(self) -> int:
        """Neuron calls that took SpikingJelly's fused kernel."""
        return self.calls - len(self.fallback)


def _dtype(state: object) -> str:
    return str(state.dtype) if isinstance(state, torch.Tensor) else type(state).__name__


@dataclass
class StepProfile:
    """What one profiled step did."""

    wall_s: float  # host time of the step, synchronised
    kernels: int  # device kernels launched (CUDA; 0 on CPU)
    device_ops: int  # kernels plus device copies and memsets (CUDA; 0 on CPU)
    gpu_busy_s: float  # summed duration of the device activity (CUDA; 0 on CPU)
    fused_neuron_ops: int  # calls of SpikingJelly's fused LIF / IF operators (eager models)

    @property
    def gpu_busy_share(self) -> float:
        """GPU-busy time over wall time: near 1 when the GPU, not the host, is the limit."""
        return self.gpu_busy_s / self.wall_s if self.wall_s > 0 else 0.0


def _is_device_event(event: Any) -> bool:
    device_type = getattr(event, "device_type", None)
    return device_type is not None and device_type != torch.autograd.DeviceType.CPU


def profile_step(step: Callable[[], object], device: torch.device) -> StepProfile:
    """Run ``step()`` once under `torch.profiler` and count what it launched.

    Run a few warm-up steps first (cuDNN autotuning, compilation and allocator growth are not
    part of a step). Kernels are the device events that are not memory copies or memsets.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    events = prof.events()
    on_device = [e for e in events if _is_device_event(e)]
    kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
    busy_us = sum(e.time_range.elapsed_us() for e in on_device)
    fused = sum(1 for e in events if e.name in FUSED_NEURON_OPS)
    return StepProfile(wall, len(kernels), len(on_device), busy_us / 1e6, fused)
