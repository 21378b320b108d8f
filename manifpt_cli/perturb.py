"""What happens to a suspect on its way to an investigator: re-compression, resizing, blur, crops.

Used to measure robustness (``manifpt evaluate --perturb``) and to train for it (``manifpt train
--augment``). A perturbation maps a (S, S, 3) uint8 image to another of the same size, and the
image then goes through the same resize policy a suspect of that size would (README, "Decoding"):

- ``jpeg:Q``: re-saved as JPEG at quality Q (Pillow/libjpeg, 4:2:0 chroma subsampling);
- ``resize:F``: scaled by F (Lanczos shrinking, bicubic enlarging), then back to S;
- ``blur:SIGMA``: Gaussian blur with standard deviation SIGMA pixels;
- ``crop:F``: the centre F × F of the image, then back to S.

A perturbed image's artifact is computed afresh against the index: its nearest real image may
change, exactly as it would for a perturbed suspect.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .errors import UsageError
from .images import fit_square

KINDS = {
    "jpeg": "quality, an integer from 1 to 100",
    "resize": "scale factor, above 0 and at most 4",
    "blur": "Gaussian standard deviation in pixels, above 0 and at most 10",
    "crop": "share of the side kept, above 0 and below 1",
}


@dataclass(frozen=True)
class Perturbation:
    kind: str
    value: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """A perturbed copy of one (S, S, 3) uint8 image, still (S, S, 3) uint8."""
        size = pixels.shape[0]
        image = Image.fromarray(pixels)
        if self.kind == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(self.value))
            return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8).copy()
        if self.kind == "blur":
            return np.asarray(image.filter(ImageFilter.GaussianBlur(self.value)), dtype=np.uint8).copy()
        side = max(1, round(size * self.value))
        if self.kind == "resize":
            resample = Image.Resampling.LANCZOS if side < size else Image.Resampling.BICUBIC
            return fit_square(image.resize((side, side), resample=resample), size)
        offset = (size - side) // 2
        return fit_square(image.crop((offset, offset, offset + side, offset + side)), size)

    def apply_batch(self, pixels: np.ndarray) -> np.ndarray:
        return np.stack([self.apply(image) for image in pixels])


def _check(kind: str, value: float) -> bool:
    if not np.isfinite(value):
        return False
    if kind == "jpeg":
        return value == int(value) and 1 <= value <= 100
    if kind == "resize":
        return 0 < value <= 4 and value != 1
    if kind == "blur":
        return 0 < value <= 10
    return 0 < value < 1


def parse_perturbations(text: str) -> list[Perturbation]:
    """``"jpeg:90,resize:0.5,blur:1.0"`` → perturbations (a clear error for anything else)."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, _, value = part.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise UsageError(f"unknown perturbation {part!r}; use {', '.join(f'{k}:VALUE' for k in KINDS)}")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not _check(kind, number):
            raise UsageError(f"bad value in {part!r}: {kind} takes a {KINDS[kind]}")
        found.append(Perturbation(kind, number))
    if not found:
        raise UsageError("no perturbation given (e.g. jpeg:90,resize:0.5,blur:1.0,crop:0.9)")
    return list(dict.fromkeys(found))


def perturbed_set(data, pixels: np.ndarray, choices: list[Perturbation], index, embedder, batch_size: int = 256):
    """``data`` (a TrainingSet) rebuilt from perturbed copies of its images (one perturbation each).

    Returns (the perturbed set, the rows of ``data`` it kept): a copy whose only real neighbours are
    copies of its own original (leave-one-out goes by the original file's SHA-256) is dropped.
    """
    from .artifacts import compute_artifacts
    from .inputs import attributor_inputs

    space = data.space
    inputs, distances, kept = [], [], []
    for start in range(0, len(pixels), batch_size):
        rows = np.arange(start, min(start + batch_size, len(pixels)))
        changed = np.stack([choices[i].apply(pixels[i]) for i in rows])
        found = compute_artifacts(index, {space: embedder}, changed, [data.samples.sha256[i] for i in rows])[space]
        ok = found.neighbours.ids >= 0
        inputs.append(attributor_inputs(data.kind, changed[ok], found.artifacts[ok]))
        distances.append(found.neighbours.distances[ok].astype(np.float64))
        kept.append(rows[ok])
    rows = np.concatenate(kept)
    copy = data.subset(rows)
    copy.inputs = np.concatenate(inputs).astype(np.float32, copy=False)
    copy.distances = np.concatenate(distances)
    return copy, rows
