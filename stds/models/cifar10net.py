"""`CIFAR10Net`: the CIFAR-10 network of the STDS paper (6 conv + 2 fc, LIF, voting output)."""

from __future__ import annotations

from typing import Sequence

from spikingjelly.activation_based import layer
from torch import nn

from stds.models.base import NeuronFactory, StemAndFeatures, conv_bn_stem, neuron_factory, pooled_side


class CIFAR10Net(StemAndFeatures):
    """Conv3x3(C)+BN+LIF x3, max pool, conv3x3(C)+BN+LIF x3, max pool, then the classifier.

    Classifier: flatten, dropout, fc(C * (image_size / 4)^2 -> ``hidden``) + LIF, dropout,
    fc(``hidden`` -> ``num_classes * voting``) + LIF, and a voting layer that averages each
    group of ``voting`` output neurons into one class score. The first conv + BN (``stem``) run
    once on the static image (the same result as running them at every step, at 1/T of the
    cost); everything after it is ``features``, in multi-step mode.

    Output: voted firing rates in [0, 1] averaged over T, suited to MSE against one-hot labels.
    Dropout (SpikingJelly's) draws one mask per sample at the first step and keeps it over all
    T steps. Defaults are the paper's: C = 256, hidden = 2048, voting = 10, LIF with tau 2, ATan
    surrogate and detached reset; on 3x32x32 input the conv + fc weights total 36,715,264, all
    pruned (``prune_exclude=()``).
    """

    def __init__(
        self,
        T: int = 8,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 256,
        hidden: int = 2048,
        voting: int = 10,
        dropout: float = 0.5,
        neuron: NeuronFactory | None = None,
        prune_exclude: str | Sequence[str] = (),
    ) -> None:
        super().__init__(T, prune_exclude)
        side = pooled_side(image_size, "CIFAR10Net")
        spiking = neuron_factory(neuron, kind="lif", tau=2.0)
        self.stem = conv_bn_stem(in_channels, channels)
        convs: list[nn.Module] = [spiking()]
        for conv_index in range(1, 6):
            convs += [
                layer.Conv2d(channels, channels, 3, padding=1, bias=False, step_mode="m"),
                layer.BatchNorm2d(channels, step_mode="m"),
                spiking(),
            ]
            if conv_index in (2, 5):
                convs.append(layer.MaxPool2d(2, step_mode="m"))
        self.features = nn.Sequential(
            *convs,
            layer.Flatten(step_mode="m"),
            layer.Dropout(dropout, step_mode="m"),
            layer.Linear(channels * side**2, hidden, bias=False, step_mode="m"),
            spiking(),
            layer.Dropout(dropout, step_mode="m"),
            layer.Linear(hidden, num_classes * voting, bias=False, step_mode="m"),
            spiking(),
            layer.VotingLayer(voting, step_mode="m"),
        )
