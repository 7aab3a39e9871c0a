"""Spiking models built on SpikingJelly (multi-step mode): static images in, class scores out.

`DigitsNet` (the small default, 8x8 digits), `CIFAR10Net` (the paper's CIFAR-10 network) and
SEW ResNet-18/34/50/101/152 (`SEWResNet(depth=...)`), with neurons from `make_neuron`.
See `stds.models.base` for the forward pass they share. Every model is one `register_model` call
(`stds.models.zoo`): the allowlist, the config groups and the NIR export read `MODELS`.
"""

from stds.models.base import SpikingClassifier
from stds.models.cifar10net import CIFAR10Net
from stds.models.digits_net import DigitsNet
from stds.models.neurons import make_neuron, neuron_implementation
from stds.models.sew_resnet import SEWResNet, sew_nir_parts
from stds.models.zoo import MODELS, ModelEntry, register_model, stem_and_features

register_model("digits_net", DigitsNet, nir_parts=stem_and_features)
register_model("cifar10net", CIFAR10Net, nir_parts=stem_and_features)
register_model("sew_resnet", SEWResNet, nir_parts=sew_nir_parts)

__all__ = [
    "CIFAR10Net",
    "DigitsNet",
    "MODELS",
    "ModelEntry",
    "SEWResNet",
    "SpikingClassifier",
    "make_neuron",
    "neuron_implementation",
    "register_model",
]
