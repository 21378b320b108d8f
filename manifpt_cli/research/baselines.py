"""Baselines of the paper's Table 2, re-implemented from their papers' descriptions, run in the same
harness (same samples, same seeded splits, same training loop) as the ManiFPT spaces.

- ``yu19`` (Yu, Davis & Fritz, ICCV 2019, "Attributing fake images to GANs"): a CNN trained on
  the raw pixels to name the source. Here it is the same CNN as the ManiFPT image spaces
  (``small`` by default), so the comparison isolates the input: raw image vs artifact.
- ``durall20`` (Durall, Keuper & Keuper, CVPR 2020, "Watch your up-convolution"): the azimuthally
  averaged log power spectrum of the grayscale image (a 1-D curve over spatial frequency,
  min-max normalised per image) fed to a classifier (here the ``mlp``).
- ``wang20`` (Wang et al., CVPR 2020, "CNN-generated images are surprisingly easy to spot… for
  now"): a ResNet50 on raw pixels trained with Gaussian blur (σ ~ U[0, 3]) and JPEG (quality ~
  U[30, 100]) augmentation, each with probability 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..artifacts import PixelSet
from ..errors import UsageError
from ..inputs import InputKind, TrainingSet, pixel_training_set
from ..spaces import pixels_to_float


def azimuthal_spectrum(pixels: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, R) azimuthal average of the log power spectrum, min-max per image."""
    gray = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(-2, -1))) ** 2
    log_power = np.log(power + 1e-8)
    size = gray.shape[-1]
    y, x = np.indices((size, size)) - size // 2
    radius = np.hypot(x, y).round().astype(int).ravel()
    counts = np.bincount(radius)
    profile = np.stack([np.bincount(radius, weights=image.ravel()) / counts for image in log_power])
    low, high = profile.min(axis=1, keepdims=True), profile.max(axis=1, keepdims=True)
    return ((profile - low) / np.maximum(high - low, 1e-12)).astype(np.float32)


def blur_jpeg_augment(seed: int = 0) -> Callable:
    """Wang20's training augmentation on (N, 3, S, S) float batches in [0, 1]."""
    import torch
    from torchvision.io import decode_jpeg, encode_jpeg
    from torchvision.transforms.functional import gaussian_blur

    generator = torch.Generator().manual_seed(seed)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        out = []
        for image in batch:
            if torch.rand((), generator=generator) < 0.5:
                sigma = float(torch.rand((), generator=generator)) * 3 + 1e-3
                image = gaussian_blur(image[None], kernel_size=7, sigma=sigma)[0]
            if torch.rand((), generator=generator) < 0.5:
                quality = int(torch.randint(30, 101, (), generator=generator))
                encoded = encode_jpeg((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu(), quality=quality)
                image = decode_jpeg(encoded).to(batch.device, torch.float32) / 255
            out.append(image)
        return torch.stack(out)

    return augment


@dataclass(frozen=True)
class Baseline:
    name: str
    reference: str
    arch: str
    input_kind: InputKind  # what the network reads: the image, or a spectrum
    inputs: Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 → network inputs
    augment: Callable[[int], Callable] | None = None


BASELINES = {
    baseline.name: baseline
    for baseline in (
        Baseline("yu19", "Yu et al. 2019: CNN on raw pixels", "small", InputKind.IMAGE, pixels_to_float),
        Baseline(
            "durall20", "Durall et al. 2020: azimuthal power spectrum", "mlp", InputKind.SPECTRUM, azimuthal_spectrum
        ),
        Baseline(
            "wang20",
            "Wang et al. 2020: ResNet50, blur + JPEG augmentation",
            "resnet50",
            InputKind.IMAGE,
            pixels_to_float,
            blur_jpeg_augment,
        ),
    )
}


def parse_baselines(text: str) -> list[Baseline]:
    """``"all"``, ``"none"`` or a comma-separated list of baseline names."""
    text = text.strip().lower()
    if text == "none":
        return []
    if text == "all":
        return list(BASELINES.values())
    chosen = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name not in BASELINES:
            raise UsageError(f"unknown baseline {name!r}; choose all, none, or some of: {', '.join(BASELINES)}")
        chosen.append(BASELINES[name])
    return chosen


def baseline_inputs(pixels: PixelSet, baseline: Baseline) -> TrainingSet:
    """The baseline's inputs for the decoded samples (same rows and labels, so the same splits)."""
    return pixel_training_set(pixels, baseline.input_kind, baseline.name, baseline.inputs(pixels.pixels))
