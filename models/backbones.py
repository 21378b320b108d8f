"""Embedding backbones for the ``sl`` and ``ssl`` spaces.

Both are a torchvision ResNet50 with the classifier removed (He et al., 2016), taking images in
[0, 1] at any size, brought to 224×224 by one of three input policies, normalised with ImageNet
statistics, and mapped to the 2048-d global-average-pooled features:

- ``resize`` (default): bilinear resize of the whole image to 224×224, antialiased (which only
  matters when shrinking: a 32-pixel image is enlarged);
- ``crop``: the authors' and torchvision's ImageNet evaluation transform: resize (bilinear,
  antialiased) so the shorter side is 256, then the centre 224×224. It drops the outer 12.5 % of
  the image, where generator artifacts are as present as anywhere;
- ``resize-legacy``: bilinear resize without antialiasing, what indexes made before manifpt 0.3
  used (read from them; never chosen for a new index). ``sl`` loads torchvision's ImageNet weights; ``ssl``
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
CROP_RESIZE = 256
INPUT_POLICIES = ("resize", "crop", "resize-legacy")


class ResNet50Embedding(nn.Module):
    """(N, 3, H, W) float in [0, 1] → (N, 2048) features."""

    def __init__(self, input_policy: str = "resize") -> None:
        super().__init__()
        if input_policy not in INPUT_POLICIES:
            raise ValueError(
                f"unknown backbone input policy {input_policy!r}; choose one of: {', '.join(INPUT_POLICIES)}"
            )
        self.input_policy = input_policy
        self.trunk = resnet50(weights=None)
        self.trunk.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _to_input_size(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if self.input_policy == "crop":
            scale = CROP_RESIZE / min(height, width)
            size = (round(height * scale), round(width * scale))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
            top, left = (size[0] - BACKBONE_INPUT_SIZE) // 2, (size[1] - BACKBONE_INPUT_SIZE) // 2
            return images[..., top : top + BACKBONE_INPUT_SIZE, left : left + BACKBONE_INPUT_SIZE]
        if (height, width) == (BACKBONE_INPUT_SIZE, BACKBONE_INPUT_SIZE):
            return images
        antialias = self.input_policy == "resize"
        size = (BACKBONE_INPUT_SIZE, BACKBONE_INPUT_SIZE)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk((self._to_input_size(images) - self.mean) / self.std)

    def load_trunk_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet50 state dict; ``fc.*`` keys are ignored, anything else must match."""
        state = {key.removeprefix("module."): value for key, value in state.items() if not key.startswith("fc.")}
        missing, unexpected = self.trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"not a ResNet50 state dict: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
