"""Attributor networks: artifact → logits over source models.

- ``resnet50`` / ``resnet18``: torchvision ResNets adapted to small inputs the CIFAR way
  (3×3 stride-1 stem, no max-pool), as in the ManiFPT paper (ResNet50-based attributor).
- ``small``: a four-block CNN for tests and quick CPU runs.
- ``mlp``: two hidden layers for the 2048-d ``sl``/``ssl`` artifacts.

Every network starts with a fixed :class:`Standardize` layer holding the training-set mean and
standard deviation, so the exported ONNX graph takes raw artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import resnet18, resnet50


class Standardize(nn.Module):
    """(x − mean) / std with statistics fixed at training time (buffers, saved in the state dict)."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        stat_shape = (1, input_shape[0], 1, 1) if len(input_shape) == 3 else (1, input_shape[0])
        self.register_buffer("mean", torch.zeros(stat_shape))
        self.register_buffer("std", torch.ones(stat_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Attributor(nn.Module):
    """Standardize, then the body network; ``features`` gives the penultimate representation."""

    def __init__(self, input_shape: Sequence[int], body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.standardize = Standardize(input_shape)
        self.body = body
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _small_input_resnet(builder, input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    net = builder(weights=None)
    net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def _require_image(name: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"{name} takes image-shaped artifacts (C, H, W), got shape {tuple(input_shape)}; use mlp")


def _build_resnet50(input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    _require_image("resnet50", input_shape)
    return _small_input_resnet(resnet50, input_shape)


def _build_resnet18(input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    _require_image("resnet18", input_shape)
    return _small_input_resnet(resnet18, input_shape)


def _build_small(input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    _require_image("small", input_shape)
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for width in (32, 64, 128, 128):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


def _build_mlp(input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    hidden = 512
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
    )
    return body, hidden


ATTRIBUTOR_BUILDERS = {
    "resnet50": _build_resnet50,
    "resnet18": _build_resnet18,
    "small": _build_small,
    "mlp": _build_mlp,
}


def build_attributor(arch: str, input_shape: Sequence[int], num_classes: int) -> Attributor:
    body, width = ATTRIBUTOR_BUILDERS[arch](input_shape)
    return Attributor(input_shape, body, nn.Linear(width, num_classes))
