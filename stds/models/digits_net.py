"""`DigitsNet`: a small LIF convolutional network for the 8x8 digits (the default model)."""

from __future__ import annotations

from typing import Sequence

from spikingjelly.activation_based import layer
from torch import nn

from stds.errors import ConfigError
from stds.models.base import NeuronFactory, StemAndFeatures, conv_bn_stem, neuron_factory, pooled_side


class DigitsNet(StemAndFeatures):
    """Three conv + BN + LIF layers, two 2x2 max pools, one fc to the class scores.

    ``stem``: conv3x3(in_channels -> c1) + BN, run once on the static image. ``features``
    (multi-step, per time step): LIF, conv3x3(c1 -> c2) + BN + LIF, max pool, conv3x3(c2 -> c3)
    + BN + LIF, max pool, flatten, fc(c3 * (image_size / 4)^2 -> num_classes, no bias). The
    output is the fc's value averaged over T (real-valued scores for cross-entropy). Every conv
    and fc is pruned by default.
    Default neuron: LIF, tau 2, ATan surrogate, detached reset.
    """

    def __init__(
        self,
        T: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        channels: Sequence[int] = (32, 64, 64),
        neuron: NeuronFactory | None = None,
        prune_exclude: str | Sequence[str] = (),
    ) -> None:
        super().__init__(T, prune_exclude)
        side = pooled_side(image_size, "DigitsNet")
        if len(channels) != 3:
            raise ConfigError(
                f"model.channels={list(channels)} is not valid; give three conv widths"
            )
        c1, c2, c3 = (int(c) for c in channels)
        spiking = neuron_factory(neuron, kind="lif", tau=2.0)
        self.stem = conv_bn_stem(in_channels, c1)
        self.features = nn.Sequential(
            spiking(),
            layer.Conv2d(c1, c2, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(c2, step_mode="m"),
            spiking(),
            layer.MaxPool2d(2, step_mode="m"),
            layer.Conv2d(c2, c3, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(c3, step_mode="m"),
            spiking(),
            layer.MaxPool2d(2, step_mode="m"),
            layer.Flatten(step_mode="m"),
            layer.Linear(c3 * side**2, num_classes, bias=False, step_mode="m"),
        )
