"""The pictures a case report shows beside each verdict: what the model saw, and why.

For one suspect: the image as attributed (at the index size), its nearest real image, the artifact
φ(x) − φ(x*) drawn as an image, and the suspect's spectrum. Each is a small lossless PNG, made
with NumPy and Pillow only (attribution needs no PyTorch or matplotlib), so engines can render
them where the pixels are and send back a few kilobytes.

Signed maps use one fixed diverging scale per picture: white is 0, red positive, blue negative,
and the colour saturates at the 99th percentile of |value| (the caption says where), so a single
outlier cannot hide the structure. The numbers behind each picture are recomputable from the
suspect file, the index and the formulas in the README ("Case reports").
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from .spaces import Space, log_spectrum, pixels_to_float

SATURATION_PERCENTILE = 99.0


@dataclass
class Evidence:
    """PNG pictures for one suspect (None where one cannot be made; ``missing`` says why)."""

    suspect: bytes | None = None
    nearest: bytes | None = None
    artifact: bytes | None = None
    spectrum: bytes | None = None
    artifact_caption: str = ""
    missing: dict[str, str] = field(default_factory=dict)


def png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (h, w, 3) or (h, w) uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def diverging(values: np.ndarray) -> tuple[np.ndarray, float]:
    """(h, w) signed values → ((h, w, 3) uint8 white-centred red/blue picture, the saturating |value|)."""
    finite = np.abs(values[np.isfinite(values)])
    scale = float(np.percentile(finite, SATURATION_PERCENTILE)) if finite.size else 0.0
    if scale <= 0:
        scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    t = np.clip(np.nan_to_num(values / scale), -1.0, 1.0)
    fade = 1.0 - np.abs(t)  # white at 0, full colour at ±scale
    red = np.where(t > 0, 1.0, fade)
    blue = np.where(t < 0, 1.0, fade)
    picture = np.stack([red, fade, blue], axis=-1)
    return np.rint(picture * 255).astype(np.uint8), scale


def grey(values: np.ndarray) -> np.ndarray:
    """(h, w) values → (h, w) uint8, stretched between the 1st and 99th percentiles."""
    low, high = np.percentile(values, [100 - SATURATION_PERCENTILE, SATURATION_PERCENTILE])
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def spectrum_picture(pixels: np.ndarray) -> np.ndarray:
    """The suspect's centred log-magnitude spectrum (the freq space's φ), averaged over channels."""
    return grey(log_spectrum(pixels_to_float(pixels[None]))[0].mean(axis=0))


def artifact_picture(space: Space, artifact: np.ndarray) -> tuple[np.ndarray, str]:
    """The artifact as a picture, and a caption that says how to read it."""
    if space is Space.RGB:
        values = artifact.mean(axis=0)  # (3, S, S) pixel difference in [−1, 1], averaged over RGB
        picture, scale = diverging(values)
        caption = f"pixel difference x − x*, mean over RGB (red > 0, blue < 0, saturating at ±{scale * 255:.3g}/255)"
    elif space is Space.FREQ:
        values = artifact.mean(axis=0)  # (3, S, S) log-spectrum difference, centred
        picture, scale = diverging(values)
        caption = f"log-spectrum difference φ(x) − φ(x*), centred, mean over RGB (saturating at ±{scale:.3g})"
    else:
        values = artifact.reshape(32, -1)  # 2048 backbone features as a 32 × 64 grid
        picture, scale = diverging(values)
        caption = f"{space.value} feature difference, 2048 values row by row as 32 × 64 (saturating at ±{scale:.3g})"
    return picture, caption


def render_evidence(
    space: Space,
    suspect: np.ndarray,
    nearest: np.ndarray | str,
    artifact: np.ndarray | str,
) -> Evidence:
    """Pictures for one suspect: ``suspect`` and ``nearest`` are (S, S, 3) uint8 arrays, ``artifact``
    the space's artifact; a string in place of an array says why it is not available."""
    evidence = Evidence(suspect=png(suspect), spectrum=png(spectrum_picture(suspect)))
    if isinstance(nearest, str):
        evidence.missing["nearest"] = nearest
    else:
        evidence.nearest = png(nearest)
    if isinstance(artifact, str):
        evidence.missing["artifact"] = artifact
    else:
        picture, evidence.artifact_caption = artifact_picture(space, artifact)
        evidence.artifact = png(picture)
    return evidence
