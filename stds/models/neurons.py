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

Mixed precision. ``functional.lif_multi_step`` / ``if_multi_step`` take the fused kernel (the
registered operator ``sj_lif::forward`` / ``sj_if::forward``: native CUDA or Triton on CUDA, one
operator on CPU) only when all of `fused_kernel_condition` hold: a surrogate SpikingJelly knows
by name, an input of float32, float16 or bfloat16, and a **float32** membrane state. Otherwise
they silently run the PyTorch reference one time step at a time (about 1,600 kernel launches per
CIFAR10Net step on an H100). SpikingJelly's nodes give the state the dtype of their input, so
under autocast (fp16 or bf16 convolutions) every neuron fell back. ``backend="auto"`` therefore
builds `Float32StateLIFNode` / `Float32StateIFNode`: SpikingJelly's nodes with a float32 state
whenever the input is float16 or bfloat16. The low-precision input goes to the kernel as it is
(the kernel reads it and computes in float32) and the spikes keep the input's dtype, as before.

Why this way: casting the neuron input to float32 also reaches the kernel but adds a kernel per
neuron, forward and backward; SpikingJelly's precision API (``neuron_storage``) runs only through
Triton on CUDA and needs the model rewritten (the H100 figures behind this choice are in
``benchmarks/RESULTS.md``). In float32 (and float64) the two
classes compute exactly what SpikingJelly's nodes do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Self

import torch
from spikingjelly.activation_based import functional, neuron, surrogate
from torch import nn
from torch.utils.hooks import RemovableHandle

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

FUSED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes SpikingJelly's fused LIF / IF operators accept (the state must be float32)."""

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Input dtypes under which `Float32StateLIFNode` / `Float32StateIFNode` keep a float32 state."""


def fused_kernel_condition(
    input_dtype: torch.dtype, state: object, surrogate_function: object
) -> bool:
    """True when SpikingJelly 2.0's ``lif_multi_step`` / ``if_multi_step`` take the fused kernel.

    Their check, restated: the surrogate is one of SpikingJelly's binary surrogates with a plain
    number ``alpha`` (every entry of `SURROGATES`), the input is float32, float16 or bfloat16
    and the membrane state ``state`` is a float32 tensor. Anything else runs the reference loop.
    """
    known = type(surrogate_function) in SURROGATES.values()
    spiking = bool(getattr(surrogate_function, "spiking", True))
    plain_alpha = isinstance(getattr(surrogate_function, "alpha", None), (int, float))
    return (
        known
        and spiking
        and plain_alpha
        and input_dtype in FUSED_INPUT_DTYPES
        and isinstance(state, torch.Tensor)
        and state.dtype == torch.float32
    )


MATERIALIZE_STATES_PARAMETERS = ("self", "inputs", "states", "step_mode")
"""SpikingJelly 2.0's ``BaseNode.materialize_states(inputs, states, step_mode)``, which
`_Float32State` overrides; its ``_neuron_precision`` attribute says whether the precision API
set a dtype. Checked by `check_spikingjelly_contract` before a float32-state node is built."""


def check_spikingjelly_contract() -> None:
    """Raise one line naming the API if SpikingJelly no longer has the hook `_Float32State` relies on."""
    import inspect

    api = "spikingjelly.activation_based.neuron.BaseNode.materialize_states"
    hook = getattr(neuron.BaseNode, "materialize_states", None)
    if hook is None:
        raise ConfigError(f"{api} is gone in this SpikingJelly; install spikingjelly>=2.0,<2.1 "
                          "or set model.neuron.backend=torch")
    names = tuple(inspect.signature(hook).parameters)
    if names != MATERIALIZE_STATES_PARAMETERS:
        raise ConfigError(f"{api}{names} is not (inputs, states, step_mode) as in SpikingJelly 2.0; install "
                          "spikingjelly>=2.0,<2.1 or set model.neuron.backend=torch")


class _Float32State:
    """Mixin for SpikingJelly's `BaseNode`: a float32 membrane state for float16/bfloat16 input.

    SpikingJelly gives the state the input's dtype; its fused kernels need it in float32 (see
    the module docstring). Other input dtypes, and a precision set through SpikingJelly's
    precision API, keep SpikingJelly's own rule.
    """

    def materialize_states(
        self, inputs: tuple[torch.Tensor, ...], states: tuple[object, ...], step_mode: str
    ) -> tuple[object, ...]:
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        if x.dtype not in LOW_PRECISION or self._neuron_precision is not None:
            return super().materialize_states(inputs, states, step_mode)
        v = states[0]
        if isinstance(v, float):
            v = torch.full_like(x, v, dtype=torch.float32)
        elif v.shape != x.shape:
            fill = self.v_reset if self.v_reset is not None else 0.0
            v = torch.full_like(x, fill, dtype=torch.float32)
        elif v.dtype != torch.float32 or v.device != x.device:
            v = v.to(device=x.device, dtype=torch.float32)
        return (v, *states[1:])


class Float32StateLIFNode(_Float32State, neuron.LIFNode):
    """SpikingJelly's `LIFNode` whose state stays float32 under autocast (fused kernel kept)."""


class Float32StateIFNode(_Float32State, neuron.IFNode):
    """SpikingJelly's `IFNode` whose state stays float32 under autocast (fused kernel kept)."""


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
    hard reset to it. ``detach_reset`` leaves the reset out of the backward graph.
    ``backend="auto"`` builds `Float32StateLIFNode` / `Float32StateIFNode` (fused kernels under
    autocast too), ``backend="torch"`` SpikingJelly's `SimpleLIFNode` / `SimpleIFNode`. Unknown
    ``kind``, ``surrogate`` or ``backend`` raise `stds.errors.ConfigError` naming the key and the
    valid values.
    """
    _choice("kind", kind, NEURON_KINDS)
    _choice("surrogate", surrogate, SURROGATES)
    _choice("backend", backend, BACKENDS)
    if backend == "auto":
        check_spikingjelly_contract()
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
        lif = Float32StateLIFNode if backend == "auto" else neuron.SimpleLIFNode
        return lif(tau=float(tau), decay_input=True, **common)
    return (Float32StateIFNode if backend == "auto" else neuron.SimpleIFNode)(**common)


def neuron_implementation(kind: str, device: torch.device) -> str:
    """The kernel SpikingJelly runs for ``kind`` neurons (``backend="auto"``) on ``device``.

    ``torch-reference`` on CPU; on CUDA ``cuda``, ``triton`` or ``torch`` (for run logs).
    """
    _choice("kind", kind, NEURON_KINDS)
    return str(functional.neuron_implementation(kind, torch.device(device))["implementation"])


class NeuronHooks(ABC):
    """A ``with`` block in which every spiking layer (SpikingJelly's ``BaseNode``) of a model has
    one forward hook, the one `hook` makes for its name; the hooks are removed when it ends.

    ``neurons``: qualified module name -> spiking layer. Hooks do not run one by one inside a
    `torch.compile` graph: use it on the eager model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.neurons = {name: m for name, m in model.named_modules() if isinstance(m, neuron.BaseNode)}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        for name, node in self.neurons.items():
            self._handles.append(node.register_forward_hook(self.hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @abstractmethod
    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        """The forward hook ``(layer, args, output)`` of the spiking layer ``name``."""
