"""The one forward pass every spiking classifier of `stds` shares.

``images [N, C, H, W]`` -> `forward_static` (static layers, run once per batch) -> repeated over
the ``T`` time steps to ``[T, N, ...]`` -> `forward_steps` (SpikingJelly multi-step layers and
neurons) -> ``[T, N, F]`` -> mean over T (the only place time is averaged) -> `forward_head`
-> ``[N, K]``.
Neuron state lives in the body; the training loop calls
``spikingjelly.activation_based.functional.reset_net`` after every batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from stds.errors import ConfigError
from stds.models.neurons import make_neuron

NeuronFactory = Callable[[], nn.Module]
"""A zero-argument callable that returns a new multi-step neuron layer."""


def as_patterns(prune_exclude: str | Sequence[str]) -> tuple[str, ...]:
    """``prune_exclude`` as a tuple of fnmatch patterns (a single string is one pattern)."""
    if isinstance(prune_exclude, str):
        return (prune_exclude,)
    return tuple(str(pattern) for pattern in prune_exclude)


def neuron_factory(neuron: NeuronFactory | None, **default: object) -> NeuronFactory:
    """``neuron`` itself, or a factory of `make_neuron` with the model's ``default`` settings."""
    if neuron is not None:
        return neuron
    return lambda: make_neuron(**default)


def pooled_side(image_size: int, model: str) -> int:
    """The side of the feature map after two 2x2 max pools, ``image_size / 4``; a ConfigError
    naming ``dataset.image_size`` unless it is a multiple of 4."""
    if image_size % 4 != 0:
        raise ConfigError(f"dataset.image_size={image_size} is not valid; {model} needs a multiple of 4")
    return image_size // 4


def conv_bn_stem(in_channels: int, channels: int) -> nn.Sequential:
    """conv3x3(in_channels -> channels, no bias) + BN: the layers that see the static image once."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))


class SpikingClassifier(nn.Module, ABC):
    """Base class: subclasses define `forward_steps` and, if they have them, a static stem
    (`forward_static`) and a head on the time-averaged features (`forward_head`).

    ``T``: time steps the static input is repeated over. ``prune_exclude``: fnmatch patterns of
    qualified module names the pruning leaves dense (read by the training loop).
    """

    def __init__(self, T: int, prune_exclude: str | Sequence[str] = ()) -> None:
        super().__init__()
        if int(T) < 1:
            raise ConfigError(f"T={T} is not valid; use T >= 1 time steps")
        self.T = int(T)
        self.prune_exclude: tuple[str, ...] = as_patterns(prune_exclude)

    def repeat_over_time(self, x: Tensor) -> Tensor:
        """``[N, ...]`` -> ``[T, N, ...]``: the same tensor at every time step.

        A channels_last ``[N, C, H, W]`` stays channels_last at every step (the convolutions
        after it then need no layout conversion); the values are the same either way.
        """
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last
        ):
            nhwc = x.permute(0, 2, 3, 1).unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
            return nhwc.permute(0, 1, 4, 2, 3)
        return x.unsqueeze(0).repeat(self.T, *([1] * x.dim()))

    def forward_static(self, images: Tensor) -> Tensor:
        """Layers that see the static image once per batch (none by default)."""
        return images

    @abstractmethod
    def forward_steps(self, x_seq: Tensor) -> Tensor:
        """``[T, N, ...]`` -> ``[T, N, F]`` in SpikingJelly multi-step mode."""

    def forward_head(self, features: Tensor) -> Tensor:
        """Layers on the time-averaged features ``[N, F]`` (none by default)."""
        return features

    def forward(self, images: Tensor) -> Tensor:
        """Class scores ``[N, K]`` of a static batch ``[N, C, H, W]``, averaged over T."""
        if images.dim() != 4:
            raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(images.shape)}")
        features_seq = self.forward_steps(self.repeat_over_time(self.forward_static(images)))
        return self.forward_head(features_seq.mean(dim=0))


class StemAndFeatures(SpikingClassifier):
    """A `SpikingClassifier` made of two modules its subclass builds: ``stem`` on the static
    image once per batch, and ``features`` in multi-step mode over the T steps, whose output the
    mean over T turns into the class scores (no head)."""

    stem: nn.Module
    features: nn.Module

    def forward_static(self, images: Tensor) -> Tensor:
        return self.stem(images)

    def forward_steps(self, x_seq: Tensor) -> Tensor:
        return self.features(x_seq)
