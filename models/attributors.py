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


class ScoredAttributor(nn.Module):
    """An attributor with its calibration and open-set statistics, exported as one graph.

    Outputs ``logits``; ``probabilities`` = softmax(logits / temperature) (calibrated); and
    ``scores`` (batch, 4), in this order (``manifpt_cli.openset.GRAPH_SCORES``), higher meaning "more like the
    known sources":

    - ``msp``: the largest calibrated probability (Hendrycks & Gimpel, 2017);
    - ``energy``: T·logsumexp(logits / T) (Liu et al., 2020);
    - ``mahalanobis``: minus the smallest Mahalanobis distance of the penultimate features to a
      class mean, with one shared covariance (Lee et al., 2018);
    - ``knn``: minus the squared distance of the L2-normalised features to their k-th nearest
      training feature (Sun et al., 2022).

    The buffers also keep the validation features and a per-class bank of training features, so a
    source can be enrolled later without retraining the network (see ``manifpt enroll``).
    """

    def __init__(self, attributor: Attributor, n_classes: int, bank_size: int, val_size: int, knn_k: int) -> None:
        super().__init__()
        width = attributor.head.in_features
        self.attributor = attributor
        self.knn_k = knn_k
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("class_means", torch.zeros(n_classes, width))
        self.register_buffer("precision", torch.eye(width))
        self.register_buffer("bank", torch.zeros(bank_size, width))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.int64))
        self.register_buffer("val_features", torch.zeros(val_size, width))
        self.register_buffer("val_labels", torch.zeros(val_size, dtype=torch.int64))
        self.register_buffer("val_distances", torch.zeros(val_size))

    @property
    def standardize(self) -> Standardize:
        return self.attributor.standardize

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.attributor.features(x)

    def scores_from(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(batch, 4) open-set scores from penultimate features and their logits."""
        scaled = logits / self.temperature
        msp = torch.softmax(scaled, dim=1).amax(dim=1)
        energy = self.temperature * torch.logsumexp(scaled, dim=1)
        centred = features.unsqueeze(1) - self.class_means.unsqueeze(0)  # (batch, classes, width)
        mahalanobis = -((centred @ self.precision) * centred).sum(dim=-1).amin(dim=1)
        unit = nn.functional.normalize(features, dim=1)
        bank = nn.functional.normalize(self.bank, dim=1)
        squared = (2 - 2 * unit @ bank.T).clamp_min(0)
        knn = -torch.topk(squared, self.knn_k, dim=1, largest=False).values[:, -1]
        return torch.stack([msp, energy, mahalanobis, knn], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.attributor.features(x)
        logits = self.attributor.head(features)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        return logits, probabilities, self.scores_from(features, logits)
