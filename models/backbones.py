"""Embedding backbones for the ``sl`` and ``ssl`` spaces.

Both are a torchvision ResNet50 with the classifier removed (He et al., 2016), taking images in
[0, 1] at any size: resized to 224×224 (bilinear), normalised with ImageNet statistics, and mapped
to the 2048-d global-average-pooled features. ``sl`` loads torchvision's ImageNet weights; ``ssl``
loads the Barlow Twins state dict (Zbontar et al., 2021), which is the same ResNet50 without ``fc``.
The same module runs at index time (PyTorch) and is exported to ONNX for attribution, so both
sides compute one function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_INPUT_SIZE = 224


class ResNet50Embedding(nn.Module):
    """(N, 3, H, W) float in [0, 1] → (N, 2048) features."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = resnet50(weights=None)
        self.trunk.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (BACKBONE_INPUT_SIZE, BACKBONE_INPUT_SIZE):
            images = F.interpolate(
                images, size=(BACKBONE_INPUT_SIZE, BACKBONE_INPUT_SIZE), mode="bilinear", align_corners=False
            )
        return self.trunk((images - self.mean) / self.std)

    def load_trunk_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet50 state dict; ``fc.*`` keys are ignored, anything else must match."""
        state = {key.removeprefix("module."): value for key, value in state.items() if not key.startswith("fc.")}
        missing, unexpected = self.trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"not a ResNet50 state dict: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
