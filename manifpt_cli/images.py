"""Stage 1: find image files and decode them into uint8 RGB arrays of one fixed size.

One bad file is always one row (a :class:`FailedImage` or a :class:`SkippedFile`), whatever it is;
the other files go on.

Policy (README, "How images are read"):
- Discovery walks each folder root without recursion (any depth), in a sorted, deterministic order:
  a folder's files, then its subfolders, depth-first. It follows folder symlinks but never enters
  the same folder (device, inode) twice, so symlink loops end. A folder that cannot be listed is
  one error row.
- Which files are candidates: by default, files whose extension (case-insensitive) is one Pillow
  can read (:func:`image_extensions`: ``.jpg``, ``.png``, ``.gif``, ``.jfif``, ``.ico``, ``.ppm``,
  ``.tga``, ...). Every other file under a root is reported as skipped ("not an image file
  name"), never silently ignored. With ``sniff`` every file is a candidate, recognised by its
  content. A file given directly as a root is always a candidate.
- Only regular files are opened. The path is ``stat``-ed first (following symlinks): a FIFO,
  socket, device or folder is refused without being opened (so a FIFO never hangs the run), and
  the file is opened non-blocking and checked again with ``fstat``, against a swap in between.
- A file larger than ``max_file_bytes`` is refused from its size, without being read; reading
  never takes more than ``max_file_bytes`` + 1 bytes, even from a file that grows meanwhile.
- Decoding reads the file once (its SHA-256 comes from those bytes), refuses images whose header
  declares more than ``max_pixels`` pixels before any pixel is allocated, and files whose decode
  would cost more than their header says (:mod:`manifpt_cli.decode_limits`), applies the EXIF
  orientation (only when the tag is present and not 1), and converts every mode to 8-bit RGB:
  alpha is composited on white, 16-bit and 32-bit integer images are scaled to 8 bits (the scale
  is chosen from the whole image), CMYK/YCbCr/LAB/palette go through Pillow.
- Size: centre-crop to a square on the shorter side, then resize to ``size``×``size``
  (Lanczos when shrinking, bicubic when enlarging). An image already ``size``×``size`` is left
  untouched, so a generator's own pixels reach the embedding unchanged; so is one whose square
  crop is already ``size``×``size``.
- Array files: a file named directly whose content is a NumPy ``.npy`` or ``.npz`` file
  (:mod:`manifpt_cli.arrays`) is read as uint8 N×H×W×3 images, one row per image, in one
  sequential pass. Row ``i`` of ``images.npz`` is the image ``images.npz#row=i``; its SHA-256 is
  that of the row's H·W·3 pixel bytes (C order), and it follows the size policy above (a
  ``size``×``size`` row is left untouched). ``max_pixels`` applies to each row; the file is
  streamed a batch of rows at a time, at most ``ARRAY_BLOCK_BYTES``, so ``max_file_bytes`` does
  not limit it. A bad header or a damaged ``.npz`` (its CRC-32 is checked before the first row)
  is one error row for the file; a truncated ``.npy`` ends with one error row after the rows
  before the cut.
- Decoding runs ahead of the caller, in ``workers`` background threads, at most
  ``READ_AHEAD_BATCHES`` batches ahead, so that it overlaps the caller's compute (NumPy, FAISS and
  ONNX Runtime release the GIL while they work).
- Memory stays near one decoded copy of the image: the centre crop is the ``box`` of the resize
  (the filter near the square's edges may see the pixels just outside it, as in a resize of the
  whole picture), and RGB, RGBA, L, LA and the 16/32-bit and float modes are resized in their own
  mode and converted afterwards.
- Reduced JPEG decoding: a JPEG whose shorter side is at least 4 × ``size`` is decoded at a
  reduced scale by libjpeg's DCT scaling (1/2, 1/4 or 1/8, :meth:`PIL.Image.Image.draft`), always
  keeping at least 2 × ``size`` pixels on the shorter side, before the exact Lanczos resize. The
  result differs slightly from a full decode of such a large JPEG; smaller JPEGs (and every
  ``size``×``size`` image) are decoded in full.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import os
import queue
import stat
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from . import decode_limits
from .arrays import ArrayShape, is_array_header, open_array, read_rows
from .errors import ImageDecodeError, UsageError
from .settings import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, RunSettings
from .shared_work import SharedParts

T = TypeVar("T")
R = TypeVar("R")

READ_AHEAD_BATCHES = 2  # decoded batches waiting for the caller, at most
DECODE_CHUNK = 16  # files one decoding thread takes at a time (fewer hand-overs between threads)
ARRAY_BLOCK_BYTES = 64 * 2**20  # an array file's rows are read a batch at a time, but at most this much


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format this Pillow can read.

    Formats Pillow can only write (``.pdf``, ``.palm``) are left out, and so are its "stub"
    formats (HDF5, GRIB, BUFR, WMF) unless a handler has been registered to load them. Computed
    once, on first use: it loads every Pillow plugin.
    """
    Image.init()
    readable = set()
    for name, (factory, _accept) in Image.OPEN.items():
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            if getattr(sys.modules.get(factory.__module__), "_handler", None) is None:
                continue
        readable.add(name)
    if "JPEG" in readable:
        readable.add("MPO")  # multi-picture JPEGs are opened by the JPEG plugin
    return frozenset(ext.lower() for ext, name in Image.registered_extensions().items() if name in readable)


def __getattr__(name: str) -> frozenset[str]:
    if name == "IMAGE_EXTENSIONS":  # kept for callers of the former constant, computed lazily
        return image_extensions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def display_path(path: str | bytes | os.PathLike) -> str:
    """A printable, reversible form of any path (:func:`path_from_display` is its inverse).

    The path's bytes are read as UTF-8; a byte that is not valid UTF-8 is written ``\\xNN`` and a
    literal backslash is written ``\\\\``, so no two paths share a display form. Everything else
    (control characters, quotes, commas) is kept as it is: writers quote it as their format needs.
    """
    raw = os.fsencode(path)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def path_from_display(text: str) -> bytes:
    """The path (as bytes, ready for ``open`` or :func:`os.fsdecode`) that :func:`display_path` showed as ``text``.

    Raises:
        ValueError: ``text`` has a backslash that starts neither ``\\\\`` nor ``\\xNN``.
    """
    out = bytearray()
    position = 0
    while True:
        backslash = text.find("\\", position)
        if backslash < 0:
            out += text[position:].encode("utf-8")
            return bytes(out)
        out += text[position:backslash].encode("utf-8")
        escape = text[backslash + 1 : backslash + 4]
        if escape[:1] == "\\":
            out.append(0x5C)
            position = backslash + 2
        elif len(escape) == 3 and escape[0] == "x" and all(c in "0123456789abcdefABCDEF" for c in escape[1:]):
            out.append(int(escape[1:], 16))
            position = backslash + 4
        else:
            raise ValueError(f"not a displayed path: stray backslash at character {backslash} of {text!r}")


@dataclass(frozen=True)
class FoundFile:
    """One discovered entry.

    ``error`` is set when its folder could not be listed; ``skipped`` says why a file under a root
    is not a candidate (its name is not an image file name and ``sniff`` is off); ``array`` marks
    a NumPy array file of images, named directly, whose rows are the images.
    """

    path: str
    error: str | None = None
    skipped: str | None = None
    array: bool = False


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image. ``pixels`` is (size, size, 3) uint8; ``original_size`` is (width, height)."""

    path: str
    pixels: np.ndarray
    original_size: tuple[int, int]
    sha256: str
    jpeg_quality: int | None = None  # estimated from a JPEG's quantisation tables (None: not a JPEG)


@dataclass(frozen=True)
class FailedImage:
    """A file that could not be decoded, with the reason as a sentence."""

    path: str
    error: str
    sha256: str = ""


@dataclass(frozen=True)
class SkippedFile:
    """A file under a root that was not read, with the reason as a sentence."""

    path: str
    reason: str


DecodeResult = DecodedImage | FailedImage | SkippedFile


def _skip_reason(name: str) -> str:
    extension = os.path.splitext(name)[1]
    shown = f"extension '{display_path(extension)}'" if extension else "no extension"
    return f"not an image file name ({shown}); use sniff/--sniff to check contents"


def _walk(root: str, sniff: bool, visited: set[tuple[int, int]]) -> Iterator[FoundFile]:
    """Every entry under the folder ``root``, depth-first with an explicit stack (no recursion).

    The order is the one ``os.walk(topdown=True)`` gives with sorted names: a folder's files in
    sorted order when the folder is visited, then its subfolders in sorted order.
    """
    extensions = image_extensions()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as exc:
            yield FoundFile(folder, f"cannot read folder: {exc.strerror or exc}")
            continue
        key = (info.st_dev, info.st_ino)
        if key in visited:  # a symlink back into a folder already walked, or a root given twice
            continue
        visited.add(key)
        files: list[str] = []
        folders: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_folder = entry.is_dir()  # follows symlinks
                    except OSError:  # e.g. a symlink loop: a file candidate, reported when read
                        is_folder = False
                    (folders if is_folder else files).append(entry.name)
        except OSError as exc:
            yield FoundFile(folder, f"cannot list folder: {exc.strerror or exc}")
            continue
        for name in sorted(files):
            path = os.path.join(folder, name)
            if sniff or os.path.splitext(name)[1].lower() in extensions:
                yield FoundFile(path)
            else:
                yield FoundFile(path, skipped=_skip_reason(name))
        stack.extend(os.path.join(folder, name) for name in sorted(folders, reverse=True))


def discover_images(roots: Iterable[str | os.PathLike], sniff: bool = False) -> Iterator[FoundFile]:
    """Yield every entry under ``roots``: candidates, unlistable folders and skipped files.

    A file given directly as a root is always a candidate, and an array file when its content is
    a NumPy file (image-named files are not looked into here). Under a folder, a file is a candidate
    when its extension is an image extension (:func:`image_extensions`), or whatever its name
    with ``sniff``; any other file is yielded with ``skipped`` set.

    Raises:
        UsageError: a root does not exist.
    """
    roots = [os.fsdecode(root) for root in roots]
    visited: set[tuple[int, int]] = set()
    # A path reached from two roots (a file given with its folder, or twice) is one entry; kept
    # only for several roots, as one root cannot reach a path twice (folders are walked once).
    listed: set[str] | None = set() if len(roots) > 1 else None
    for root in roots:
        if not os.path.lexists(root):
            raise UsageError(f"no such file or folder: {display_path(root)}")
        found = _walk(root, sniff, visited) if os.path.isdir(root) else [FoundFile(root, array=_is_array_file(root))]
        for entry in found:
            if listed is not None:
                path = os.path.abspath(entry.path)
                if path in listed:
                    continue
                listed.add(path)
            yield entry


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)

# Non-blocking: should the path become a FIFO between stat and open, open must not wait for a writer.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def _check_regular(info: os.stat_result, max_file_bytes: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
        raise ImageDecodeError(f"not a regular file ({kind}); it was not opened")
    if max_file_bytes is not None and info.st_size > max_file_bytes:
        raise ImageDecodeError(
            f"file is {info.st_size:,} bytes, over the limit of {max_file_bytes:,} "
            "(raise max_file_bytes, --max-file-bytes, if it is genuine)"
        )


def _read_error(exc: OSError) -> ImageDecodeError:
    if isinstance(exc, PermissionError):
        return ImageDecodeError("permission denied: the file cannot be read")
    if isinstance(exc, FileNotFoundError):
        return ImageDecodeError("file not found (removed, or a dangling symbolic link)")
    if exc.errno == errno.ELOOP:
        return ImageDecodeError("symbolic link loop: the link never reaches a file")
    return ImageDecodeError(f"cannot read the file: {exc.strerror or exc}")


def _read_bounded(fd: int, expected: int, max_file_bytes: int) -> bytes:
    """At most ``max_file_bytes`` bytes from ``fd``; more means the file grew past the limit."""
    chunks: list[bytes] = []
    total = 0
    want = min(expected, max_file_bytes) + 1  # one byte past the stat size tells whether it grew
    while total <= max_file_bytes:
        chunk = os.read(fd, min(max(want - total, 1 << 20), max_file_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_file_bytes:
        raise ImageDecodeError(
            f"file grew past the limit of {max_file_bytes:,} bytes while being read "
            "(raise max_file_bytes, --max-file-bytes, if it is genuine)"
        )
    return b"".join(chunks)  # one chunk (the usual case) is returned without a copy


def _open_regular(path: str, max_file_bytes: int | None) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` and its ``fstat``, if it is a regular file of at most ``max_file_bytes``
    bytes (None: any size). The caller closes the descriptor."""
    try:
        _check_regular(os.stat(path), max_file_bytes)  # nothing that is not a regular file is opened
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _read_error(exc) from None
    try:
        info = os.fstat(fd)
        _check_regular(info, max_file_bytes)  # the path may have been swapped since the stat
    except OSError as exc:
        os.close(fd)
        raise _read_error(exc) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _read_regular_file(path: str, max_file_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_file_bytes`` bytes."""
    fd, info = _open_regular(path, max_file_bytes)
    try:
        return _read_bounded(fd, info.st_size, max_file_bytes)
    except OSError as exc:
        raise _read_error(exc) from None
    finally:
        os.close(fd)


def _is_array_file(path: str) -> bool:
    """Whether a file named directly starts like a NumPy array file (a file it cannot open is not:
    it becomes an error row when it is decoded)."""
    if os.path.splitext(path)[1].lower() in image_extensions():
        return False
    try:
        fd, _ = _open_regular(path, None)
    except ImageDecodeError:
        return False
    try:
        return is_array_header(os.read(fd, 8))
    except OSError:
        return False
    finally:
        os.close(fd)


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes resized as they are, then converted to RGB (alpha is composited on white before resizing).
_RESIZED_AS_IS = ("RGB", "L", *_DEEP_MODES)


def _oriented(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation; the same object when the tag is absent or 1."""
    decode_limits.check_exif(image)
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _depth_scale(image: Image.Image) -> float | None:
    """The factor that brings a 16-bit, 32-bit integer or float image to 0–255, from the whole image.

    16-bit: 65535 → 255. 32-bit integer: the same when any value is above 255, else unchanged.
    Float: values up to 1.0 are taken as 0–1 (× 255), else unchanged. None for 8-bit modes.
    """
    if image.mode.startswith("I;16"):
        return 255.0 / 65535.0
    if image.mode == "I":
        return 255.0 / 65535.0 if max(image.getextrema()[1], 0) > 255 else 1.0
    if image.mode == "F":
        return 255.0 if max(image.getextrema()[1], 0) <= 1.0 else 1.0
    return None


def _on_white(image: Image.Image) -> Image.Image:
    """An image with alpha (or a transparent palette) composited on white, as RGB.

    Done in bands of rows, so the only full-size allocation is the RGB result; the compositing is
    the same pixel for pixel as on the whole image at once.
    """
    width, height = image.size
    result = Image.new("RGB", (width, height))
    rows = max(1, (1 << 20) // max(width, 1))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height))).convert("RGBA")
        background = Image.new("RGBA", band.size, (255, 255, 255, 255))
        result.paste(Image.alpha_composite(background, band).convert("RGB"), (0, top))
    return result


def _has_alpha(image: Image.Image) -> bool:
    """Alpha in the mode, a palette's transparency, or a palette of RGBA colours (a TGA's 32-bit map)."""
    if image.mode in _ALPHA_MODES:
        return True
    return image.mode == "P" and ("transparency" in image.info or getattr(image.palette, "mode", "") == "RGBA")


def _resizable(image: Image.Image) -> Image.Image:
    """``image`` in a mode that Lanczos/bicubic resize correctly, alpha already composited on white."""
    if _has_alpha(image):
        return _on_white(image)
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # palette, CMYK, YCbCr, LAB, HSV, ...: Pillow's own conversion


def _rgb_pixels(image: Image.Image, depth_scale: float | None) -> np.ndarray:
    """(height, width, 3) uint8 of any mode (alpha composited on white, deep modes scaled)."""
    if depth_scale is not None:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values * depth_scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if _has_alpha(image):
        image = _on_white(image)
    if image.mode != "RGB":  # an RGB image is read as it is: convert("RGB") would copy it first
        image = image.convert("RGB")
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3).copy()


def fit_square(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop ``image`` to a square, resize it to ``size``×``size`` and make it uint8 RGB."""
    depth_scale = _depth_scale(image)  # chosen from the whole image, before any crop
    width, height = image.size
    if (width, height) == (size, size):
        return _rgb_pixels(image, depth_scale)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == size:
        return _rgb_pixels(image.crop(box), depth_scale)
    if image.mode not in _RESIZED_AS_IS:
        image = _resizable(image)
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    # Crop first: resize(box=...) would read pixels beyond the square into the edge of the output.
    square = image.crop(box) if (width, height) != (side, side) else image
    return _rgb_pixels(square.resize((size, size), resample=resample), depth_scale)


def decode_image(
    path: str,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> DecodedImage:
    """Read and decode one file into a (size, size, 3) uint8 array.

    Raises:
        ImageDecodeError: the file is missing, unreadable, not a regular file, over
            ``max_file_bytes``, not an image, truncated, or over ``max_pixels``.
    """
    data = _read_regular_file(path, max_file_bytes)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        pixels, original_size, quality = _decode_bytes(data, size, max_pixels)
        return DecodedImage(path, pixels, original_size, sha256, quality)
    except ImageDecodeError as exc:
        exc.sha256 = sha256  # the hash of an undecodable file is still evidence
        raise


# The IJG (libjpeg) luminance quantisation table at quality 50, row-major (ITU-T T.81, Annex K).
_IJG_LUMINANCE = np.array(
    (
        "16 11 10 16 24 40 51 61 12 12 14 19 26 58 60 55 14 13 16 24 40 57 69 56 14 17 22 29 51 87 80 62 "
        "18 22 37 56 68 109 103 77 24 35 55 64 81 104 113 92 49 64 78 87 103 121 120 101 72 92 95 98 112 100 103 99"
    ).split(),
    dtype=np.float64,
)


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_IJG_LUMINANCE * scale + 50) / 100), 1, 255)


_IJG_TABLES = np.stack([_ijg_table(q) for q in range(1, 101)])


def estimate_jpeg_quality(image: Image.Image) -> int | None:
    """The IJG quality (1–100) whose luminance table is closest to the file's (None if not a JPEG).

    Exact for files written by libjpeg-based encoders (Pillow, most cameras' software); for other
    tables it is the nearest IJG quality.
    """
    tables = getattr(image, "quantization", None)
    if image.format not in ("JPEG", "MPO") or not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    observed = np.asarray(tables[0], dtype=np.float64)
    return int(np.argmin(np.abs(_IJG_TABLES - observed).sum(axis=1))) + 1


def _decode_bytes(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int], int | None]:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own header check below decides (it honours --max-pixels); Pillow's hard error
            # at 2 × Image.MAX_IMAGE_PIXELS (about 179 MP) still applies above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            decode_limits.check_before_open(data, max_pixels)
            image = Image.open(io.BytesIO(data))
            if image.format == "EPS":
                raise ImageDecodeError(
                    "PostScript (EPS) is a program, not pixels: decoding it would run Ghostscript on it, "
                    "without a time limit, so it is not decoded"
                )
            width, height = image.size  # read from the header; no pixel is decoded yet
            decode_limits.check_opened(image, data, max_pixels)
            if image.format in ("JPEG", "MPO") and min(width, height) >= 4 * size:
                # DCT scaling by 1/2, 1/4 or 1/8, keeping at least 2 × size on the shorter side.
                image.draft("RGB", (2 * size, 2 * size))
            image.load()
            quality = estimate_jpeg_quality(image)
            image = _oriented(image)  # rebinding frees the unturned copy before the resize
            pixels = fit_square(image, size)
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
    return pixels, (width, height), quality


def try_decode(
    found: FoundFile,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> DecodeResult:
    """Decode one discovered entry: a :class:`SkippedFile` for a skipped one, any failure a :class:`FailedImage`."""
    if found.error:
        return FailedImage(found.path, found.error)
    if found.skipped:
        return SkippedFile(found.path, found.skipped)
    try:
        return decode_image(found.path, size, max_pixels, max_file_bytes)
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
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items``, produced by a background thread at most ``depth`` items ahead of the consumer.

    An exception from ``items`` is raised in the consumer, in its place. Closing this iterator
    (or dropping it) stops the thread after the item it is producing, cancels the items handed
    over but not taken that can be (``cancel()``: :class:`SharedParts`), and closes ``items``.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not hand_over((True, item)):
                    return
            hand_over((False, None))
        except BaseException as exc:  # re-raised in the consumer's thread
            hand_over((False, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="manifpt-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            more, value = ready.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        while not ready.empty():  # work handed over but never taken is not wanted any more
            _, value = ready.get_nowait()
            cancel = getattr(value, "cancel", None)
            if cancel is not None:
                cancel()
        thread.join()


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


ARRAY_ROW_MARK = "#row="


def array_row_path(path: str, row: int) -> str:
    """How row ``row`` of the array file ``path`` is named in indexes and reports."""
    return f"{path}{ARRAY_ROW_MARK}{row}"


def split_array_row(path: str) -> tuple[str, int] | None:
    """(array file, row) of a name :func:`array_row_path` made, when ``path`` is no file itself."""
    head, mark, row = path.rpartition(ARRAY_ROW_MARK)
    if not mark or not (row.isascii() and row.isdigit()) or os.path.lexists(path) or not os.path.isfile(head):
        return None
    return head, int(row)


def _array_image(path: str, pixels: np.ndarray, size: int) -> DecodedImage:
    """One row of an array file as a decoded image (the size policy of a decoded file)."""
    sha256 = hashlib.sha256(pixels).hexdigest()
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        fitted = pixels.copy()
    else:
        fitted = fit_square(Image.fromarray(pixels), size)
    return DecodedImage(path, fitted, (width, height), sha256)


def _block_rows(shape: ArrayShape, batch_size: int) -> int:
    """Rows of an array file read at a time: a batch, but at most ``ARRAY_BLOCK_BYTES`` (one row at least)."""
    return max(1, min(batch_size, ARRAY_BLOCK_BYTES // shape.row_bytes))


def _array_rows(path: str, size: int, settings: RunSettings, batch_size: int) -> Iterator[DecodeResult]:
    """Every row of the array file ``path`` as ``PATH#row=I``; a bad file, or a damaged tail after
    the rows before it, is one :class:`FailedImage` named ``path``."""
    row = 0
    try:
        fd, _ = _open_regular(path, None)
        with os.fdopen(fd, "rb") as handle, open_array(handle) as (shape, stream):
            if shape.height * shape.width > settings.max_pixels:
                raise ImageDecodeError(
                    f"refused: the array's images are {shape.width}×{shape.height} pixels, over the limit of "
                    f"{settings.max_pixels:,} (raise max_pixels, --max-pixels, if they are genuine)"
                )
            for block in read_rows(stream, shape, _block_rows(shape, batch_size)):
                for pixels in block:
                    yield _array_image(array_row_path(path, row), pixels, size)
                    row += 1
    except ImageDecodeError as exc:
        yield FailedImage(path, str(exc) if row == 0 else f"{exc} (rows 0 to {row - 1} were read)")


def array_rows_declared(path: str) -> int:
    """How many rows an array file's header declares (1, its error row, when it cannot be read)."""
    try:
        fd, _ = _open_regular(path, None)
        with os.fdopen(fd, "rb") as handle, open_array(handle, check_crc=False) as (shape, _stream):
            return shape.rows
    except ImageDecodeError:
        return 1


def array_row_sha256(path: str, rows: Iterable[int]) -> dict[int, str]:
    """The SHA-256 of each of ``rows`` of the array file ``path`` now, read in one pass (rows past
    the end are left out).

    Raises:
        ImageDecodeError: the file cannot be read as an array of images.
    """
    wanted = set(rows)
    hashes: dict[int, str] = {}
    fd, _ = _open_regular(path, None)
    with os.fdopen(fd, "rb") as handle, open_array(handle) as (shape, stream):
        start = 0
        for block in read_rows(stream, shape, _block_rows(shape, 256)):
            for row in wanted.intersection(range(start, start + len(block))):
                hashes[row] = hashlib.sha256(block[row - start]).hexdigest()
            start += len(block)
            if len(hashes) == len(wanted):
                break
    return hashes


def _decoded_items(
    roots: Iterable[str | os.PathLike], size: int, settings: RunSettings, batch_size: int
) -> Iterator[DecodeResult]:
    """Every discovered entry, decoded, in discovery order (files in ``settings.workers`` threads)."""

    def decode_chunk(chunk: list[FoundFile]) -> list[DecodeResult]:
        return [try_decode(found, size, settings.max_pixels, settings.max_file_bytes) for found in chunk]

    found = discover_images(roots, sniff=settings.sniff)
    for is_array, group in itertools.groupby(found, key=lambda entry: entry.array):
        if is_array:
            for entry in group:
                yield from _array_rows(entry.path, size, settings, batch_size)
            continue
        chunks = iter_batches(group, DECODE_CHUNK)
        for decoded in ordered_map(decode_chunk, chunks, settings.workers, window=4 * settings.workers):
            yield from decoded


def decode_folder(
    roots: Iterable[str | os.PathLike],
    size: int,
    settings: RunSettings,
    then: Callable[[list[DecodeResult]], T] | None = None,
    backbone: bool = False,
) -> Iterator[list[DecodeResult]] | Iterator[T]:
    """Discover and decode everything under ``roots``, in batches, in discovery order.

    Discovery honours ``settings.sniff``; decoding ``settings.max_pixels`` and ``settings.max_file_bytes``;
    batches hold :meth:`RunSettings.batch_for` images (``backbone``: a backbone will embed them).
    Every discovered entry is one item: decoded, failed or skipped (an array file: one per row).
    Decoding runs in background threads, up to ``READ_AHEAD_BATCHES`` batches ahead of the caller.
    ``then`` runs on each batch in the read-ahead thread too, so that it overlaps the caller's
    work on the batch before (attribution: the search, while the caller runs the attributor).
    Where it returns :class:`~manifpt_cli.shared_work.SharedParts`, the read-ahead thread hands
    them over first and runs them from the front after, so the caller can take the ones left.
    """
    batch_size = settings.batch_for(size, backbone)
    batches = iter_batches(_decoded_items(roots, size, settings, batch_size), batch_size)
    return read_ahead(batches if then is None else _each(then, batches), READ_AHEAD_BATCHES)


def _each(then: Callable[[T], R], items: Iterator[T]) -> Iterator[R]:
    """``map``, but closing ``items`` when closed itself (read_ahead closes its source), and running
    the parts of a :class:`SharedParts` result once it is handed over."""
    with contextlib.closing(items):
        for item in items:
            result = then(item)
            yield result
            if isinstance(result, SharedParts):
                result.run_from_front()


def split_batch(batch: list[DecodeResult]) -> tuple[list[DecodedImage], list[FailedImage], list[SkippedFile]]:
    """(decoded images, failed files, skipped files) of one batch, each in discovery order."""
    decoded = [item for item in batch if isinstance(item, DecodedImage)]
    failed = [item for item in batch if isinstance(item, FailedImage)]
    return decoded, failed, [item for item in batch if isinstance(item, SkippedFile)]


def count_images(roots: Iterable[str | os.PathLike], sniff: bool = False) -> int:
    """How many entries ``discover_images`` will yield, skipped ones included (for progress totals).

    Every discovered entry is one item of a batch from :func:`decode_folder`, every row of an array file too.
    """
    return sum(array_rows_declared(found.path) if found.array else 1 for found in discover_images(roots, sniff=sniff))
