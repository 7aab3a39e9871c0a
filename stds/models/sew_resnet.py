"""SEW ResNet (spike-element-wise residual networks, Fang et al., NeurIPS 2021) with IF neurons.

Each residual block ends in a spiking neuron whose spikes ``out`` meet the shortcut spikes
``identity`` in a connect function:

- ``ADD``:  ``identity + out``
- ``AND``:  ``identity * out``
- ``IAND``: ``identity * (1 - out)``  (in `BasicBlock` and `Bottleneck` alike)

The shortcut is the block input, or conv1x1 + BN + neuron where the shape changes. The 7x7/2
stem conv + BN run once on the static image; the result is repeated over T, then a neuron and a
3x3/2 max pool, four stages of blocks, global average pool, mean over T, and the classifier fc.
"""

from __future__ import annotations

from typing import Callable, Sequence

from spikingjelly.activation_based import layer
from torch import Tensor, nn

from stds.errors import ConfigError
from stds.models.base import NeuronFactory, SpikingClassifier, neuron_factory

CONNECT_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ADD": lambda identity, out: identity + out,
    "AND": lambda identity, out: identity * out,
    "IAND": lambda identity, out: identity * (1.0 - out),
}
"""``connect_f`` name -> f(identity, out)."""


def check_connect_f(connect_f: str) -> str:
    """``connect_f`` if it is one of `CONNECT_FUNCTIONS`, else `ConfigError` naming the key."""
    if connect_f not in CONNECT_FUNCTIONS:
        valid = ", ".join(CONNECT_FUNCTIONS)
        raise ConfigError(f"model.connect_f={connect_f!r} is not valid; use one of {valid}")
    return connect_f


def connect(identity: Tensor, out: Tensor, connect_f: str) -> Tensor:
    """The element-wise junction of shortcut spikes ``identity`` and block spikes ``out``."""
    return CONNECT_FUNCTIONS[check_connect_f(connect_f)](identity, out)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Module:
    return layer.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False,
        step_mode="m",
    )


def _conv_bn_neuron(
    in_channels: int, out_channels: int, kernel: int, stride: int, spiking: NeuronFactory
) -> list[nn.Module]:
    return [_conv(in_channels, out_channels, kernel, stride),
            layer.BatchNorm2d(out_channels, step_mode="m"), spiking()]


class SEWBlock(nn.Module):
    """A residual block: units ``conv<i>`` + ``bn<i>`` + ``sn<i>``, then `connect`.

    ``units`` lists ``(in_channels, out_channels, kernel, stride)`` of each unit; ``downsample``
    is the shortcut (None: the block input itself).
    """

    expansion = 1

    def __init__(self, units: list[tuple[int, int, int, int]], downsample: nn.Module | None,
                 connect_f: str, spiking: NeuronFactory) -> None:
        super().__init__()
        check_connect_f(connect_f)
        self.n_units = len(units)
        for i, (c_in, c_out, kernel, stride) in enumerate(units, start=1):
            conv, bn, sn = _conv_bn_neuron(c_in, c_out, kernel, stride, spiking)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", bn)
            self.add_module(f"sn{i}", sn)
        self.downsample = downsample
        self.connect_f = connect_f

    @property
    def last_bn(self) -> nn.Module:
        """The BN before the block's last neuron (set by ``zero_init_residual``)."""
        return getattr(self, f"bn{self.n_units}")

    def forward(self, x_seq: Tensor) -> Tensor:
        out = x_seq
        for i in range(1, self.n_units + 1):
            out = getattr(self, f"sn{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out)))
        identity = x_seq if self.downsample is None else self.downsample(x_seq)
        return connect(identity, out, self.connect_f)

    def extra_repr(self) -> str:
        return f"connect_f={self.connect_f}"


class BasicBlock(SEWBlock):
    """conv3x3(stride) + BN + neuron, conv3x3 + BN + neuron; output width ``planes``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None,
                 connect_f: str, spiking: NeuronFactory) -> None:
        units = [(in_channels, planes, 3, stride), (planes, planes, 3, 1)]
        super().__init__(units, downsample, connect_f, spiking)


class Bottleneck(SEWBlock):
    """conv1x1 + BN + neuron, conv3x3(stride) + BN + neuron, conv1x1 (-> ``4 * planes``) + BN
    + neuron."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None,
                 connect_f: str, spiking: NeuronFactory) -> None:
        units = [(in_channels, planes, 1, 1), (planes, planes, 3, stride),
                 (planes, planes * self.expansion, 1, 1)]
        super().__init__(units, downsample, connect_f, spiking)


def _stage(block: type[SEWBlock], in_channels: int, planes: int, n_blocks: int, stride: int,
           connect_f: str, spiking: NeuronFactory) -> tuple[nn.Sequential, int]:
    """``n_blocks`` blocks, the first with ``stride`` (and a conv shortcut if the shape changes)."""
    out_channels = planes * block.expansion
    blocks = []
    for index in range(n_blocks):
        block_stride = stride if index == 0 else 1
        shortcut = None
        if block_stride != 1 or in_channels != out_channels:
            shortcut = nn.Sequential(
                *_conv_bn_neuron(in_channels, out_channels, 1, block_stride, spiking)
            )
        blocks.append(block(in_channels, planes, block_stride, shortcut, connect_f, spiking))
        in_channels = out_channels
    return nn.Sequential(*blocks), out_channels


ARCHITECTURES: dict[int, tuple[type[SEWBlock], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
"""Depth -> (block type, blocks per stage), as in ResNet."""


class SEWResNet(SpikingClassifier):
    """SEW ResNet-``depth`` (18, 34, 50, 101 or 152) for ``[N, in_channels, H, W]`` images.

    Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` ... ``layer4``,
    ``fc``). ``conv1`` + ``bn1`` run once on the static image, the rest up to the pooled features
    runs at every step, and ``fc`` acts on the features averaged over T. Default neuron:
    IF, ATan surrogate, detached reset. ``zero_init_residual`` zeroes the weight of each block's
    last BN (and, for ``AND``, sets its bias to 1), so every block starts as its shortcut.
    Every conv is pruned; the fc is left dense by default (``prune_exclude=("fc",)``).
    """

    def __init__(
        self,
        depth: int = 18,
        T: int = 4,
        in_channels: int = 3,
        num_classes: int = 1000,
        connect_f: str = "ADD",
        zero_init_residual: bool = False,
        width: int = 64,
        neuron: NeuronFactory | None = None,
        prune_exclude: str | Sequence[str] = ("fc",),
    ) -> None:
        super().__init__(T, prune_exclude)
        if depth not in ARCHITECTURES:
            valid = ", ".join(map(str, ARCHITECTURES))
            raise ConfigError(f"model.depth={depth} is not valid; use one of {valid}")
        check_connect_f(connect_f)
        block, stage_sizes = ARCHITECTURES[depth]
        self.depth, self.connect_f = depth, connect_f
        spiking = neuron_factory(neuron, kind="if")
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.sn1 = spiking()
        self.maxpool = layer.MaxPool2d(3, stride=2, padding=1, step_mode="m")
        channels = width
        stages = []
        for index, n_blocks in enumerate(stage_sizes):
            stage, channels = _stage(block, channels, width * 2**index, n_blocks,
                                     1 if index == 0 else 2, connect_f, spiking)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = layer.AdaptiveAvgPool2d((1, 1), step_mode="m")
        self.flatten = layer.Flatten(step_mode="m")
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def forward_static(self, images: Tensor) -> Tensor:
        return self.bn1(self.conv1(images))

    def forward_steps(self, x_seq: Tensor) -> Tensor:
        x_seq = self.maxpool(self.sn1(x_seq))
        x_seq = self.layer4(self.layer3(self.layer2(self.layer1(x_seq))))
        return self.flatten(self.avgpool(x_seq))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if not zero_init_residual:
            return
        for module in self.modules():
            if isinstance(module, SEWBlock):
                nn.init.zeros_(module.last_bn.weight)
                if self.connect_f == "AND":
                    nn.init.ones_(module.last_bn.bias)


def sew_nir_parts(model: SEWResNet) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """NIR parts: the stem (conv1, bn1) and the per-step layers. The fc, applied by the model to the
    features averaged over T, is a per-step layer here: it is affine, so averaging before or
    after it is the same."""
    stem = [("conv1", model.conv1), ("bn1", model.bn1)]
    names = ("sn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc")
    return stem, [(name, getattr(model, name)) for name in names]
