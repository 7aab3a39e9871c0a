"""Spiking models built on SpikingJelly (multi-step mode): static images in, class scores out.

`DigitsNet` (the small default, 8x8 digits), `CIFAR10Net` (the paper's CIFAR-10 network) and
SEW ResNet-18/34/50/101/152 (`SEWResNet(depth=...)`), with neurons from `make_neuron`.
See `stds.models.base` for the forward pass they share.
"""

from stds.models.base import SpikingClassifier
from stds.models.cifar10net import CIFAR10Net
from stds.models.digits_net import DigitsNet
from stds.models.neurons import make_neuron, neuron_implementation
from stds.models.sew_resnet import SEWResNet

__all__ = [
    "CIFAR10Net",
    "DigitsNet",
    "SEWResNet",
    "SpikingClassifier",
    "make_neuron",
    "neuron_implementation",
]
