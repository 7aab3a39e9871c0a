"""Spiking neurons from config: `make_neuron` builds one multi-step SpikingJelly neuron.

Every neuron of the models is built by a zero-argument factory, so one config node
(``neuron: {_target_: stds.models.make_neuron, _partial_: true, kind: lif, ...}``) sets the
neuron type and its parameters for the whole network.

Backends. SpikingJelly 2.x has no per-module ``backend`` argument: `LIFNode` and `IFNode`
choose their kernel at every call from the device of the input. On CPU they run the PyTorch
reference; on CUDA they take the first available of SpikingJelly's native CUDA kernel, its
Triton kernel and the PyTorch reference (the process-wide environment variables
``SJ_LIF_CUDA_IMPLEMENTATION`` / ``SJ_IF_CUDA_IMPLEMENTATION`` = ``auto|cuda|triton|torch`` pin
one, read when SpikingJelly is imported). A model built on CPU and moved to CUDA afterwards
therefore uses the fused kernels with nothing else to do; ``backend="auto"`` is exactly this.
``backend="torch"`` builds SpikingJelly's pure-PyTorch `SimpleLIFNode` / `SimpleIFNode`
instead: a step-by-step Python loop on every device (slower; a reference for checking the
fused kernels). The fused kernels need a surrogate SpikingJelly knows by name (all of
`SURROGATES` are); there is no CuPy path in SpikingJelly 2.x.
"""

from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional, neuron, surrogate
from torch import nn

from stds.errors import ConfigError

NEURON_KINDS = ("lif", "if")
"""Valid values of ``kind``: leaky integrate-and-fire, integrate-and-fire."""

SURROGATES: dict[str, Callable[..., nn.Module]] = {
    "atan": surrogate.ATan,
    "sigmoid": surrogate.Sigmoid,
    "piecewise_quadratic": surrogate.PiecewiseQuadratic,
    "piecewise_exp": surrogate.PiecewiseExp,
    "soft_sign": surrogate.SoftSign,
    "super_spike": surrogate.SuperSpike,
    "erf": surrogate.Erf,
}
"""Surrogate gradients by config name; each takes ``alpha`` (its sharpness)."""

BACKENDS = ("auto", "torch")
"""``auto``: SpikingJelly's per-device dispatch (fused on CUDA); ``torch``: pure-PyTorch loop."""


_NO_LONGER = {
    ("backend", "cupy"): "SpikingJelly 2.x has no CuPy backend; its fused CUDA/Triton kernels are used "
                         "automatically on GPU with backend=auto; set model.neuron.backend=auto",
}
"""Values SpikingJelly 1.x took that 2.x dropped: the reason, instead of a bare list of values."""


def _choice(key: str, value: str, valid: tuple[str, ...] | dict) -> str:
    if (key, value) in _NO_LONGER:
        raise ConfigError(f"model.neuron.{key}={value!r}: {_NO_LONGER[key, value]}")
    if value not in valid:
        raise ConfigError(
            f"model.neuron.{key}={value!r} is not valid; use one of {', '.join(valid)}"
        )
    return value


def make_neuron(
    kind: str = "lif",
    tau: float = 2.0,
    surrogate: str = "atan",
    surrogate_alpha: float = 2.0,
    detach_reset: bool = True,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    backend: str = "auto",
) -> nn.Module:
    """A multi-step (``[T, N, ...]`` in and out) SpikingJelly neuron layer.

    ``kind``: ``lif`` (membrane time constant ``tau``, input decays with the potential) or ``if``
    (``tau`` ignored). ``v_reset=None`` is a soft reset (subtract the threshold); a number is a
    hard reset to it. ``detach_reset`` leaves the reset out of the backward graph. Unknown
    ``kind``, ``surrogate`` or ``backend`` raise `stds.errors.ConfigError` naming the key and the
    valid values.
    """
    _choice("kind", kind, NEURON_KINDS)
    _choice("surrogate", surrogate, SURROGATES)
    _choice("backend", backend, BACKENDS)
    common = dict(
        v_threshold=float(v_threshold),
        v_reset=None if v_reset is None else float(v_reset),
        surrogate_function=SURROGATES[surrogate](alpha=float(surrogate_alpha)),
        detach_reset=bool(detach_reset),
        step_mode="m",
    )
    if kind == "lif":
        if not tau > 1.0:
            raise ConfigError(f"model.neuron.tau={tau} is not valid; use a time constant > 1")
        lif = neuron.LIFNode if backend == "auto" else neuron.SimpleLIFNode
        return lif(tau=float(tau), decay_input=True, **common)
    return (neuron.IFNode if backend == "auto" else neuron.SimpleIFNode)(**common)


def neuron_implementation(kind: str, device: torch.device) -> str:
    """The kernel SpikingJelly runs for ``kind`` neurons (``backend="auto"``) on ``device``.

    ``torch-reference`` on CPU; on CUDA ``cuda``, ``triton`` or ``torch`` (for run logs).
    """
    _choice("kind", kind, NEURON_KINDS)
    return str(functional.neuron_implementation(kind, torch.device(device))["implementation"])
