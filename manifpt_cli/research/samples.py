"""Real photographs that ship inside installed packages, cropped on demand.

The tests and the demo must run on a fresh, offline install, so they take their real images from
the sample photographs bundled in scikit-image (public domain / CC0, see skimage/data/README.txt)
and scikit-learn (``sklearn/datasets/images``). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs only (no synthetic test patterns); grayscale photos are converted to RGB.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "moon.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "brick.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def bundled_photo_paths() -> list[Path]:
    """Paths of the bundled photographs that exist in this installation, in a fixed order."""
    import skimage.data

    found = [Path(os.path.dirname(skimage.data.__file__)) / name for name in SKIMAGE_PHOTOS]
    try:
        import sklearn.datasets

        sklearn_dir = Path(os.path.dirname(sklearn.datasets.__file__)) / "images"
        found += [sklearn_dir / name for name in SKLEARN_PHOTOS]
    except ImportError:  # scikit-learn is optional
        pass
    return [path for path in found if path.is_file()]


def random_crops(photo: Path, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random square crops of ``photo`` (side 2×–8× ``size``), resized to size×size uint8 RGB."""
    with Image.open(photo) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    crops = []
    for _ in range(n):
        side = int(rng.integers(min(2 * size, width, height), min(8 * size, width, height) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        crops.append(np.asarray(crop, dtype=np.uint8))
    return crops


def write_photo_crops(
    out_dir: str | os.PathLike, n: int, size: int = 32, seed: int = 0, photos: list[Path] | None = None
) -> list[Path]:
    """Write ``n`` PNG crops spread evenly over ``photos`` (default: all bundled) into ``out_dir``."""
    photos = photos if photos is not None else bundled_photo_paths()
    if not photos:
        raise RuntimeError("no bundled photographs found: is scikit-image installed?")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    per_photo = [n // len(photos) + (i < n % len(photos)) for i in range(len(photos))]
    for photo, count in zip(photos, per_photo):
        for j, crop in enumerate(random_crops(photo, count, size, rng)):
            path = out / f"{photo.stem}_{j:04d}.png"
            Image.fromarray(crop).save(path)
            written.append(path)
    return written
