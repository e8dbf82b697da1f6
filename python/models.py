"""Models of the training examples. ``width`` multiplies every hidden size / channel count.

- ``mlp``: two hidden ReLU layers of ``128 · width`` units (vector inputs).
- ``cnn1d``: three stride-2 1-D convolutions of ``32 · width`` channels and a linear head (MNIST-1D).
- ``resnet18``: the CIFAR ResNet-18 (He et al., 2016): a 3x3 stem without max-pooling, four stages of
  two basic blocks with ``(64, 128, 256, 512) · width`` channels, strides (1, 2, 2, 2).
- ``wrn28-10``: WideResNet-28-10 (Zagoruyko & Komodakis, 2016): pre-activation basic blocks, depth 28
  (``(28 − 4) / 6 = 4`` blocks per group), groups of ``(16, 32, 64) · 10 · width`` channels.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("mlp", "cnn1d", "resnet18", "wrn28-10")


def _channels(n: int, width: float) -> int:
    return max(1, round(n * width))


def mlp(in_features: int, classes: int, width: float = 1.0) -> nn.Module:
    hidden = _channels(128, width)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes))


def cnn1d(length: int, classes: int, width: float = 1.0) -> nn.Module:
    c = _channels(32, width)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    for c_in in (1, c, c):
        layers += [nn.Conv1d(c_in, c, kernel_size=5, stride=2, padding=2), nn.ReLU()]
        length = (length - 1) // 2 + 1  # output length of a stride-2 convolution with "same" padding
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * length, classes))


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation wide block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x)``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        same = stride == 1 and c_in == c_out
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        # A projection shortcut sees the pre-activated input, as in the paper's wide blocks.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _stages(block: type[nn.Module], c_in: int, widths: tuple[int, ...], strides: tuple[int, ...],
            blocks: int) -> tuple[nn.Module, int]:
    layers = []
    for c_out, stride in zip(widths, strides, strict=True):
        for i in range(blocks):
            layers.append(block(c_in, c_out, stride if i == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers), c_in


def resnet18(classes: int, width: float = 1.0) -> nn.Module:
    stem = _channels(64, width)
    body, c = _stages(BasicBlock, stem, tuple(_channels(n, width) for n in (64, 128, 256, 512)),
                      (1, 2, 2, 2), blocks=2)
    return nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(), body,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def wide_resnet(classes: int, depth: int = 28, widen: int = 10, width: float = 1.0) -> nn.Module:
    if (depth - 4) % 6:
        raise ValueError(f"depth: a WideResNet has depth 6n + 4, got {depth}")
    stem = _channels(16, width)
    body, c = _stages(PreActBlock, stem, tuple(_channels(n * widen, width) for n in (16, 32, 64)),
                      (1, 2, 2), blocks=(depth - 4) // 6)
    return nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), body, nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def build_model(name: str, input_shape: tuple[int, ...], classes: int, width: float = 1.0) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for inputs of ``input_shape`` (without the batch)."""
    if name == "mlp":
        return mlp(int(torch.Size(input_shape).numel()), classes, width)
    if name == "cnn1d":
        if len(input_shape) != 1:
            raise ValueError(f"model: cnn1d takes 1-D signals, got inputs of shape {input_shape}")
        return cnn1d(input_shape[0], classes, width)
    if len(input_shape) != 3:
        raise ValueError(f"model: {name} takes images (C, H, W), got inputs of shape {input_shape}")
    if name == "resnet18":
        return resnet18(classes, width)
    if name == "wrn28-10":
        return wide_resnet(classes, 28, 10, width)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
