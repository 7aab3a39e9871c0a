"""Reparameterizations of pruned weights, registered with ``torch.nn.utils.parametrize``.

A pruned layer keeps a hidden parameter θ (stored as ``<layer>.parametrizations.weight.original``)
and computes its weight as w = f(θ, d), with d the current threshold ("flat width"):

- ``identity``: w = θ (dense training; d is stored but has no effect);
- ``st``: w = sign(θ)·max(|θ| − d, 0), true gradient: dw/dθ = 1 where |θ| > d, else 0;
- ``stmod`` (STDS): the same forward; the gradient of max(·, 0) is passed straight through, so
  dw/dθ = 1 for every θ ≠ 0 and pruned synapses keep learning and can regrow.

Each reparameterization is a module holding d in a float32 scalar buffer ``d`` (saved as
``<layer>.parametrizations.weight.0.d``; it moves with ``.to()``). Its inverse map
θ = sign(w)(|w| + d) is used when it is registered, so registering it with threshold D keeps the
freshly initialised weights (up to one rounding of |w| + D − D).

Every function here accepts a plain model or one wrapped in ``DistributedDataParallel``,
``DataParallel`` or ``torch.compile``; register the reparameterizations before wrapping.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from stds.registry import Registry

__all__ = [
    "PRUNABLE_TYPES",
    "REPARAMS",
    "register_reparam",
    "Reparam",
    "dense_state_dict",
    "load_dense_weights",
    "make_reparam",
    "pruned_layers",
    "pruned_parameters",
    "reparams",
    "set_threshold",
    "sparsify",
    "sparsity",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
"""Layer types whose weight `sparsify` reparameterizes (subclasses such as SpikingJelly's too)."""


def _check_d(d: float) -> float:
    """The threshold ``d`` as a float; a negative or non-finite value is a ValueError."""
    value = float(d)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"the threshold d must be a finite number >= 0, got {d!r}")
    return value


def _shrink(theta: Tensor, d: float | Tensor) -> Tensor:
    """sign(θ)·max(|θ| − d, 0), whose autograd gradient is 1 where |θ| > d, else 0.

    One fused kernel for a host number d; for a tensor d (the form `torch.compile` traces without
    specialising on d's value) a ``where``, since clamping to tensor bounds would split the
    gradient at |θ| = d.
    """
    if isinstance(d, Tensor):
        return torch.where(theta.abs() > d, theta - d * theta.sign(), 0.0)
    return F.softshrink(theta, d)


class _SoftThresholdStraightThrough(torch.autograd.Function):
    """w = sign(θ)·max(|θ| − d, 0) with the gradient of max(·, 0) passed through: 1 where θ ≠ 0."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, d: float | Tensor) -> Tensor:
        ctx.save_for_backward(theta)
        return _shrink(theta, d)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_w: Tensor) -> tuple[Tensor, None]:
        (theta,) = ctx.saved_tensors
        return torch.where(theta != 0, grad_w, 0.0), None


class Reparam(nn.Module):
    """Base of the reparameterizations: holds the threshold d in the buffer ``d``.

    The forward pass reads a host copy of d (no device read per call); `set_threshold` and
    ``load_state_dict`` keep it equal to the buffer, so set d through them. Under
    `torch.compile` the buffer itself is read. Subclasses define ``forward(theta) -> w`` and are
    listed in `REPARAMS`.
    """

    method: ClassVar[str] = ""
    # the scheduler.kind this reparameterization brings (None: the config's scheduler.kind)
    schedule_kind: ClassVar[str | None] = None
    d: Tensor

    def __init__(self, d: float = 0.0) -> None:
        super().__init__()
        value = _check_d(d)
        self.register_buffer("d", torch.tensor(value, dtype=torch.float32), persistent=True)
        self._d_host = value

    def current_d(self) -> float | Tensor:
        """The threshold as the forward pass uses it: the host number, or the buffer when compiling."""
        return self.d if torch.compiler.is_compiling() else self._d_host

    def right_inverse(self, w: Tensor) -> Tensor:
        """θ = sign(w)(|w| + d), so that f(θ, d) = w for the current d."""
        return torch.sign(w) * (w.abs() + self.d)

    def set_threshold(self, d: float) -> None:
        """Set the threshold in place (one ``fill_``, no host-device synchronisation)."""
        value = _check_d(d)
        self.d.fill_(value)
        self._d_host = value

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._d_host = float(self.d)

    def extra_repr(self) -> str:
        return f"method={self.method}"


class Identity(Reparam):
    """``identity``: w = θ; the threshold is kept for a uniform checkpoint layout but unused."""

    method = "identity"

    def forward(self, theta: Tensor) -> Tensor:
        """w = θ."""
        return theta

    def right_inverse(self, w: Tensor) -> Tensor:
        """θ = w."""
        return w


class SoftThreshold(Reparam):
    """``st``: w = sign(θ)·max(|θ| − d, 0) with the true gradient (0 where |θ| <= d)."""

    method = "st"

    def forward(self, theta: Tensor) -> Tensor:
        """w = sign(θ)·max(|θ| − d, 0); autograd's gradient is 1 where |θ| > d, else 0."""
        return _shrink(theta, self.current_d())


class SoftThresholdMod(Reparam):
    """``stmod`` (STDS): the ``st`` forward with dw/dθ = 1 for every θ ≠ 0."""

    method = "stmod"

    def forward(self, theta: Tensor) -> Tensor:
        """w = sign(θ)·max(|θ| − d, 0)."""
        return _SoftThresholdStraightThrough.apply(theta, self.current_d())


REPARAMS: Registry[type[Reparam]] = Registry("reparameterization")
"""Reparameterizations by name (``sparse.method``): the one list; `register_reparam` adds to it."""


def register_reparam(cls: type[Reparam]) -> type[Reparam]:
    """Class decorator: add a `Reparam` subclass under its ``method`` name. This one call makes it
    a choice of ``sparse=<name>`` / ``sparse.method=<name>`` (`stds.run.setup.config`), a method
    of the report (under its own name) and a reparameterization that export and resume undo."""
    REPARAMS.add(cls.method, cls)
    return cls


for _cls in (Identity, SoftThreshold, SoftThresholdMod):
    register_reparam(_cls)


def make_reparam(name: str, d: float = 0.0) -> nn.Module:
    """The reparameterization ``name`` (``identity``, ``st``, ``stmod``) with threshold d."""
    if name not in REPARAMS:
        raise ValueError(f"unknown reparameterization {name!r}; valid: {REPARAMS.choices()}")
    return REPARAMS[name](d)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _reparam_of(module: nn.Module) -> Reparam | None:
    """The `Reparam` on ``module.weight``, or None if it has none."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    first = module.parametrizations.weight[0]
    return first if isinstance(first, Reparam) else None


def pruned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer, for every layer whose weight carries a reparameterization."""
    core = unwrap_model(model)
    return {name: m for name, m in core.named_modules() if _reparam_of(m) is not None}


def reparams(model: nn.Module) -> list[Reparam]:
    """The `Reparam` of every pruned layer, in `pruned_layers` order (walk the model once, keep it)."""
    return [_reparam_of(m) for m in pruned_layers(model).values()]  # type: ignore[misc]


def pruned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified layer name -> its hidden parameter θ (``parametrizations.weight.original``)."""
    return {
        name: layer.parametrizations.weight.original
        for name, layer in pruned_layers(model).items()
    }


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def sparsify(
    model: nn.Module, name: str, d: float = 0.0, exclude: Iterable[str] = ()
) -> list[str]:
    """Register reparameterization ``name`` with threshold ``d`` on every prunable layer.

    θ starts at sign(w0)(|w0| + d), so the initial weights are kept: give d = D (``flat_width``)
    for a constant threshold, 0 for a schedule that starts at 0.

    Prunable layers are the `nn.Conv2d` and `nn.Linear` (subclasses included) whose qualified
    name matches none of the ``fnmatch`` patterns in ``exclude`` (a single string is one pattern).
    Returns their qualified names. A model that already carries reparameterizations is a
    ValueError. Register before wrapping the model in DDP.
    """
    make_reparam(name, d)  # validates name and d before touching the model
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    core = unwrap_model(model)
    if pruned_layers(core):
        raise ValueError("model is already sparsified; sparsify it once ")
    names = []
    for qualified, module in list(core.named_modules()):
        if isinstance(module, PRUNABLE_TYPES) and not _excluded(qualified, exclude):
            reparam = make_reparam(name, d).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", reparam)
            names.append(qualified)
    return names


def set_threshold(model: nn.Module, d: float) -> None:
    """Set the threshold d of every reparameterization in ``model``."""
    d = _check_d(d)
    for reparam in reparams(model):
        reparam.set_threshold(d)


@torch.no_grad()
def sparsity(model: nn.Module) -> dict[str, Any]:
    """Exactly-zero weights w over the pruned layers.

    Returns ``total`` (zeros / numel, 0.0 without pruned layers), ``zeros`` and ``numel`` (ints)
    and ``layers`` (qualified name -> fraction of zeros in that layer).
    """
    zeros, numel, layers = 0, 0, {}
    for name, layer in pruned_layers(model).items():
        w = layer.weight
        layer_zeros = int((w == 0).sum())
        layers[name] = layer_zeros / w.numel()
        zeros += layer_zeros
        numel += w.numel()
    total = zeros / numel if numel else 0.0
    return {"total": total, "zeros": zeros, "numel": numel, "layers": layers}


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as the plain architecture has it: weights w (zeros kept).

    Keys and their order are those of the un-parametrized model's ``state_dict()`` (no
    ``parametrizations`` entries, no thresholds), so it loads with ``strict=True`` into the same
    architecture built without `stds`. The model is not modified.
    """
    core = unwrap_model(model)
    weights = {}
    for name, layer in pruned_layers(core).items():
        w = layer.weight.detach()
        if w.data_ptr() == layer.parametrizations.weight.original.data_ptr():
            w = w.clone()  # identity: do not alias θ
        weights[f"{name}." if name else ""] = w
    out: dict[str, Tensor] = {}
    for key, value in core.state_dict().items():
        prefix = _owning_prefix(key, weights)
        if prefix is not None and f"{prefix}weight" not in out:
            out[f"{prefix}weight"] = weights[prefix]
        if prefix is None or not key.startswith(f"{prefix}parametrizations."):
            out[key] = value
    return out


def load_dense_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load a plain state dict (as `dense_state_dict` returns) into a sparsified model.

    Each pruned layer's w goes through its reparameterization's inverse at the current threshold
    (θ = sign(w)(|w| + d)), so the model computes exactly these weights; every other entry
    (biases, BatchNorm) is loaded as it is. Keys must match the architecture (``strict``).
    """
    core = unwrap_model(model)
    layers = pruned_layers(core)
    prefixes = {f"{name}." if name else "": layer for name, layer in layers.items()}
    pruned_keys = {f"{prefix}weight" for prefix in prefixes}
    for prefix, layer in prefixes.items():
        key = f"{prefix}weight"
        if key not in weights:
            raise KeyError(f"missing key {key!r}")
        w = weights[key]
        if w.shape != layer.weight.shape:
            raise ValueError(f"{key}: shape {tuple(w.shape)} is not {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight = w.to(layer.weight.device, layer.weight.dtype)
    rest = {k: v for k, v in weights.items() if k not in pruned_keys}
    result = core.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if "parametrizations." not in k]
    if missing or result.unexpected_keys:
        raise KeyError(f"key {(missing or result.unexpected_keys)[0]!r} does not match the model")


def _owning_prefix(key: str, prefixes: dict[str, Tensor]) -> str | None:
    """The longest pruned-layer prefix (``"layer."``) that ``key`` lies under, if any."""
    best = None
    for prefix in prefixes:
        if key.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best
