"""Stage 1: find image files and decode them into uint8 RGB arrays of one fixed size.

Policy (README, "How images are read"):
- Discovery is recursive, sorted, case-insensitive on the extension, follows directory symlinks
  but never enters the same directory twice (symlink loops end there).
- Decoding reads the file once (its SHA-256 comes from those bytes), refuses images whose header
  declares more than ``max_pixels`` pixels before any pixel is allocated, applies the EXIF
  orientation, and converts every mode to 8-bit RGB: alpha is composited on white, 16-bit and
  32-bit integer images are scaled to 8 bits, CMYK/YCbCr/LAB/palette go through Pillow.
- Size: centre-crop to a square on the shorter side, then resize to ``size``×``size``
  (Lanczos when shrinking, bicubic when enlarging). An image already ``size``×``size`` is left
  untouched, so a generator's own pixels reach the embedding unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, UsageError
from .settings import DEFAULT_MAX_PIXELS, RunSettings

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

T = TypeVar("T")
R = TypeVar("R")


def display_path(path: str | os.PathLike) -> str:
    """A printable form of any path: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True)
class FoundFile:
    """One discovered candidate; ``error`` is set when its directory could not be listed."""

    path: str
    error: str | None = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image. ``pixels`` is (size, size, 3) uint8; ``original_size`` is (width, height)."""

    path: str
    pixels: np.ndarray
    original_size: tuple[int, int]
    sha256: str


@dataclass(frozen=True)
class FailedImage:
    """A file that could not be decoded, with the reason as a sentence."""

    path: str
    error: str
    sha256: str = ""


def discover_images(roots: Iterable[str | os.PathLike]) -> Iterator[FoundFile]:
    """Yield image files under ``roots`` (files given directly are yielded as they are).

    Raises:
        UsageError: a root does not exist.
    """
    visited: set[tuple[int, int]] = set()
    for root in roots:
        root = os.fspath(root)
        if not os.path.lexists(root):
            raise UsageError(f"no such file or folder: {display_path(root)}")
        if not os.path.isdir(root):
            yield FoundFile(root)
            continue
        walk_errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=walk_errors.append):
            while walk_errors:
                failure = walk_errors.pop()
                yield FoundFile(failure.filename or dirpath, f"cannot list folder: {failure.strerror}")
            try:
                stat = os.stat(dirpath)
            except OSError as exc:
                yield FoundFile(dirpath, f"cannot read folder: {exc.strerror}")
                dirnames[:] = []
                continue
            key = (stat.st_dev, stat.st_ino)
            if key in visited:  # a symlink back into a folder already walked
                dirnames[:] = []
                continue
            visited.add(key)
            dirnames.sort()
            for name in sorted(filenames):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    yield FoundFile(os.path.join(dirpath, name))
        for failure in walk_errors:
            yield FoundFile(failure.filename or root, f"cannot list folder: {failure.strerror}")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except IsADirectoryError:
        raise ImageDecodeError("is a folder, not an image file") from None
    except PermissionError:
        raise ImageDecodeError("permission denied: the file cannot be read") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found (removed, or a dangling symbolic link)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageDecodeError("symbolic link loop: the link never reaches a file") from None
        raise ImageDecodeError(f"cannot read the file: {exc.strerror or exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        scaled = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _square_resize(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return square.resize((size, size), resample=resample)


def decode_image(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one file into a (size, size, 3) uint8 array.

    Raises:
        ImageDecodeError: the file is missing, unreadable, not an image, truncated, or too large.
    """
    data = _read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return DecodedImage(path, *_decode_bytes(data, size, max_pixels), sha256)
    except ImageDecodeError as exc:
        exc.sha256 = sha256  # the hash of an undecodable file is still evidence
        raise


def _decode_bytes(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own header check below decides (it honours --max-pixels); Pillow's hard error
            # at 2 × Image.MAX_IMAGE_PIXELS (about 179 MP) still applies above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header; no pixel is decoded yet
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"refused: header declares {width}×{height} pixels, over the limit of "
                    f"{max_pixels:,} (raise max_pixels, --max-pixels, if the image is genuine)"
                )
            image.seek(0)  # first frame of animated/multi-page files
            image = ImageOps.exif_transpose(image)
            rgb = _square_resize(_to_rgb(image), size)
            pixels = np.asarray(rgb, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: the content matches no supported image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data: {exc}") from None
    except Exception as exc:  # a decoder bug must cost one row, never the whole run
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return pixels, (width, height)


def try_decode(found: FoundFile, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | FailedImage:
    """Decode one discovered file, turning any failure into a :class:`FailedImage`."""
    if found.error:
        return FailedImage(found.path, found.error)
    try:
        return decode_image(found.path, size, max_pixels)
    except ImageDecodeError as exc:
        return FailedImage(found.path, str(exc), getattr(exc, "sha256", ""))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 256) -> Iterator[R]:
    """``map`` over a thread pool, in input order, with at most ``window`` items in flight.

    Memory stays bounded however long ``items`` is, which is what lets a folder of a million
    suspects stream through.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def iter_batches(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Group an iterable into lists of ``batch_size`` (the last one may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def decode_folder(
    roots: Iterable[str | os.PathLike], size: int, settings: RunSettings
) -> Iterator[list[DecodedImage | FailedImage]]:
    """Discover and decode everything under ``roots``, in batches, in discovery order."""
    decode = lambda found: try_decode(found, size, settings.max_pixels)  # noqa: E731
    yield from iter_batches(ordered_map(decode, discover_images(roots), settings.workers), settings.batch_size)


def split_batch(batch: list[DecodedImage | FailedImage]) -> tuple[list[DecodedImage], list[FailedImage]]:
    """(decoded images, failed files) of one batch, each in discovery order."""
    decoded = [item for item in batch if isinstance(item, DecodedImage)]
    return decoded, [item for item in batch if isinstance(item, FailedImage)]


def count_images(roots: Iterable[str | os.PathLike]) -> int:
    """How many candidates ``discover_images`` will yield (for progress bars)."""
    return sum(1 for _ in discover_images(roots))
