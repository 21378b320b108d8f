"""Baselines of the paper's Table 2, re-implemented from their papers' descriptions, run in the same
harness (same samples, same seeded splits, same training loop) as the ManiFPT spaces.

- ``yu19`` (Yu, Davis & Fritz, ICCV 2019, "Attributing fake images to GANs"): a CNN trained on
  the raw pixels to name the source. Here it is the same CNN as the ManiFPT image spaces
  (``small`` by default), so the comparison isolates the input: raw image vs artifact.
- ``durall20`` (Durall, Keuper & Keuper, CVPR 2020, "Watch your up-convolution"): the azimuthally
  averaged log power spectrum of the grayscale image (a 1-D curve over spatial frequency,
  min-max normalised per image) fed to a classifier (here the ``mlp``).
- ``wang20`` (Wang et al., CVPR 2020, "CNN-generated images are surprisingly easy to spot… for
  now"): a ResNet50 on raw pixels, initialised from ImageNet weights when they are on disk (the
  ``sl`` weights: hub cache or ``--sl-weights``), trained with Gaussian blur (σ ~ U[0, 3], kernel
  to 4σ like SciPy's ``gaussian_filter``) and JPEG (quality ~ U[30, 100]) augmentation, each with
  probability 0.5, then a random crop and a horizontal flip. What differs from their recipe, and
  why: small inputs keep the CIFAR stem (3×3 convolution, stride 1, no max-pool), so ``conv1``
  starts from scratch and every other layer from ImageNet; the random crop is a 4-pixel
  reflect-padded crop at the input size (their 224 crop of 256 would mean resampling a 32-pixel
  image, which erases the traces being classified); without ImageNet weights it trains from
  scratch and the benchmark table says so.
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


CROP_PADDING = 4


def blur_kernel_size(sigma: float) -> int:
    """An odd kernel reaching 4σ each side, as SciPy's ``gaussian_filter`` (truncate=4.0)."""
    return 2 * int(np.ceil(4 * sigma)) + 1


def blur_jpeg_augment(seed: int = 0) -> Callable:
    """Wang20's training augmentation on (N, 3, S, S) float batches in [0, 1]: blur, JPEG, crop, flip."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, encode_jpeg
    from torchvision.transforms.functional import gaussian_blur

    generator = torch.Generator().manual_seed(seed)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        out = []
        size = batch.shape[-1]
        for image in batch:
            if torch.rand((), generator=generator) < 0.5:
                sigma = float(torch.rand((), generator=generator)) * 3 + 1e-3
                image = gaussian_blur(image[None], kernel_size=blur_kernel_size(sigma), sigma=sigma)[0]
            if torch.rand((), generator=generator) < 0.5:
                quality = int(torch.randint(30, 101, (), generator=generator))
                encoded = encode_jpeg((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu(), quality=quality)
                image = decode_jpeg(encoded).to(batch.device, torch.float32) / 255
            padded = F.pad(image[None], [CROP_PADDING] * 4, mode="reflect")[0]
            top, left = (int(v) for v in torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator))
            image = padded[:, top : top + size, left : left + size]
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
            out.append(image)
        return torch.stack(out)

    return augment


def imagenet_initialiser(weights: str | None) -> tuple[Callable | None, str]:
    """(a function that loads ImageNet ResNet50 weights into a ``resnet50`` attributor, or None, and
    a note for the table). ``conv1`` (a 3×3 stem here) and ``fc`` keep their fresh weights."""
    from ..errors import WeightsNotFoundError
    from ..spaces import Space, load_backbone

    try:
        module, found = load_backbone(Space.SL, weights)
    except WeightsNotFoundError:
        return None, "from scratch (no ImageNet weights on disk)"
    state = {k: v for k, v in module.trunk.state_dict().items() if not k.startswith(("conv1.", "fc."))}

    def initialise(model) -> None:
        own = model.body.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.body.load_state_dict(usable, strict=False)

    return initialise, f"ImageNet init ({found.source})"


@dataclass(frozen=True)
class Baseline:
    name: str
    reference: str
    arch: str
    input_kind: InputKind  # what the network reads: the image, or a spectrum
    inputs: Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 → network inputs
    augment: Callable[[int], Callable] | None = None
    imagenet_init: bool = False  # start from ImageNet ResNet50 weights when they are on disk


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
            imagenet_init=True,
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
