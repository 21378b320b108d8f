"""Stage 1: discovery and decoding, with every kind of bad input the issue lists."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifpt_cli.errors import ImageDecodeError, UsageError
from manifpt_cli.images import (
    DecodedImage,
    FailedImage,
    FoundFile,
    decode_folder,
    decode_image,
    discover_images,
    display_path,
    try_decode,
)
from manifpt_cli.settings import RunSettings

SIZE = 32


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def gradient(width: int = 48, height: int = 40) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width×height pixels, in about a hundred bytes."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")


# --- good images of every mode -----------------------------------------------------------------


def test_rgb_image_already_at_size_is_untouched(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = save(tmp_path / "exact.png", Image.fromarray(pixels))
    decoded = decode_image(str(path), SIZE)
    assert np.array_equal(decoded.pixels, pixels)
    assert decoded.original_size == (SIZE, SIZE)
    assert len(decoded.sha256) == 64


def test_centre_crop_then_resize(tmp_path):
    # 96×32: only the middle 32×32 square survives, so the left and right thirds must vanish.
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, 32:64] = (0, 200, 0)
    decoded = decode_image(str(save(tmp_path / "wide.png", Image.fromarray(pixels))), SIZE)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)
    assert (decoded.pixels[..., 1] == 200).all() and (decoded.pixels[..., 0] == 0).all()


@pytest.mark.parametrize("mode", ["L", "P", "1", "LA", "I;16", "CMYK", "RGBA"])
def test_every_mode_becomes_uint8_rgb(tmp_path, mode):
    image = gradient().convert(mode) if mode != "I;16" else Image.fromarray(np.full((40, 48), 1000, np.uint16))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("LA", "1") else "PNG")
    path = save(tmp_path / f"img.{fmt.lower()}", image, format=fmt)
    decoded = decode_image(str(path), SIZE)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (SIZE, SIZE, 3)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[:, : SIZE // 2] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    decoded = decode_image(str(save(tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA"))), SIZE)
    assert tuple(decoded.pixels[0, 0]) == (255, 0, 0)
    assert tuple(decoded.pixels[0, -1]) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (SIZE, SIZE), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 1
    decoded = decode_image(str(save(tmp_path / "pal.png", image, transparency=1)), SIZE)
    assert tuple(decoded.pixels[5, 5]) == (255, 255, 255)


@pytest.mark.parametrize("value, expected", [(65535, 255), (32896, 128), (0, 0)])
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, value, expected):
    image = Image.fromarray(np.full((SIZE, SIZE), value, np.uint16))
    path = save(tmp_path / "deep.png", image)
    assert Image.open(path).mode.startswith("I")
    assert (decode_image(str(path), SIZE).pixels == expected).all()


def test_cmyk_jpeg_keeps_its_colour(tmp_path):
    path = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)), quality=95)
    red, green, blue = decode_image(str(path), SIZE).pixels[16, 16].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape 40×20: left half red, right half blue. Orientation 6 means "rotate 90° clockwise
    # to display", which puts the red half on top of a 20×40 portrait.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "rotated.jpg", Image.fromarray(pixels), exif=exif.tobytes(), quality=95)
    decoded = decode_image(str(path), 20)
    assert decoded.original_size == (40, 20)
    top, bottom = decoded.pixels[2, 10].astype(int), decoded.pixels[17, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, "the red half should be on top after EXIF rotation"
    assert bottom[2] > 200 and bottom[0] < 60


def test_small_image_is_enlarged_and_its_size_recorded(tmp_path):
    decoded = decode_image(str(save(tmp_path / "tiny.png", gradient(10, 10))), SIZE)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)
    assert decoded.original_size == (10, 10)


# --- bad input: a clear error each, never a crash ------------------------------------------------


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    gradient().save(good, "PNG")
    jpeg = io.BytesIO()
    gradient().save(jpeg, "JPEG")
    files = {
        "empty": folder / "empty.png",
        "truncated_png": folder / "truncated.png",
        "truncated_jpeg": folder / "truncated.jpg",
        "text": folder / "notes.png",
        "bomb": folder / "bomb.png",
    }
    files["empty"].write_bytes(b"")
    files["truncated_png"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["truncated_jpeg"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    files["text"].write_text("this is a text file, not a picture\n")
    files["bomb"].write_bytes(png_bomb(60_000, 60_000))
    return files


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty file"),
        ("truncated_png", "truncated or corrupt"),
        ("truncated_jpeg", "truncated or corrupt"),
        ("text", "not an image"),
        ("bomb", "refused"),
    ],
)
def test_bad_file_gives_a_clear_error(tmp_path, case, message):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(ImageDecodeError, match=message) as caught:
        decode_image(str(path), SIZE)
    assert len(caught.value.sha256) == 64, "an undecodable file's hash is still recorded"


@pytest.mark.parametrize("side, message", [(12_000, "12000×12000"), (60_000, "decompression bomb")])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, side, message):
    # 144 MP and 3.6 GP declared in ~100 bytes: refused before a single pixel is allocated
    # (the first by our --max-pixels check, the second already by Pillow's hard limit).
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(side, side))
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(str(path), SIZE, max_pixels=100_000_000)


def test_max_pixels_limit_is_ours_to_set(tmp_path):
    path = save(tmp_path / "big.png", gradient(64, 64))
    with pytest.raises(ImageDecodeError, match="over the limit of 1,000"):
        decode_image(str(path), SIZE, max_pixels=1000)
    assert decode_image(str(path), SIZE, max_pixels=64 * 64).pixels.shape == (SIZE, SIZE, 3)


def test_one_bad_file_is_one_error_row_the_rest_decode(tmp_path):
    bad = _bad_files(tmp_path / "mixed")
    for i in range(5):
        save(tmp_path / "mixed" / f"good_{i}.png", gradient())
    results = [item for batch in decode_folder([tmp_path / "mixed"], SIZE, RunSettings(batch_size=3)) for item in batch]
    failed = {Path(item.path).name for item in results if isinstance(item, FailedImage)}
    decoded = [item for item in results if isinstance(item, DecodedImage)]
    assert failed == {path.name for path in bad.values()}
    assert len(decoded) == 5


def test_folder_named_like_an_image_is_searched_not_decoded(tmp_path):
    save(tmp_path / "photo.png" / "inside.png", gradient())
    found = list(discover_images([tmp_path]))
    assert [Path(f.path).name for f in found] == ["inside.png"]
    with pytest.raises(ImageDecodeError, match="is a folder"):
        decode_image(str(tmp_path / "photo.png"), SIZE)


def test_symlink_loops_end(tmp_path):
    save(tmp_path / "a" / "one.png", gradient())
    os.symlink("..", tmp_path / "a" / "up")  # a folder loop
    os.symlink("self.png", tmp_path / "a" / "self.png")  # a file link to itself
    found = list(discover_images([tmp_path]))
    names = sorted(Path(f.path).name for f in found)
    assert names == ["one.png", "self.png"], "each real file once, and the loop link once"
    result = try_decode(next(f for f in found if f.path.endswith("self.png")), SIZE)
    assert isinstance(result, FailedImage) and "symbolic link loop" in result.error


def test_non_utf8_file_name_is_decoded_and_printable(tmp_path):
    raw_name = os.path.join(os.fsencode(tmp_path), b"caf\xe9_\xff.png")
    buffer = io.BytesIO()
    gradient().save(buffer, "PNG")
    with open(raw_name, "wb") as handle:
        handle.write(buffer.getvalue())
    (found,) = discover_images([tmp_path])
    decoded = try_decode(found, SIZE)
    assert isinstance(decoded, DecodedImage)
    shown = display_path(found.path)
    assert shown.endswith("caf\\xe9_\\xff.png")
    shown.encode("utf-8")  # safe to write to any report


def _decode_as_nobody(path: str) -> str:
    """Decode ``path`` in a forked child running as uid 65534; return the error text it got."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, try, report, exit without running pytest's teardown
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = try_decode(FoundFile(path), SIZE)
            os.write(write_end, getattr(result, "error", "decoded").encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        message = reader.read()
    os.waitpid(pid, 0)
    return message


def test_unreadable_file_is_a_permission_error(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="manifpt-perm-"))  # outside pytest's root-only tmp tree
    try:
        os.chmod(folder, 0o755)
        path = save(folder / "locked.png", gradient())
        os.chmod(path, 0)
        if os.geteuid() == 0:  # root reads anything: check as an unprivileged user instead
            message = _decode_as_nobody(str(path))
        else:
            message = try_decode(FoundFile(str(path)), SIZE).error
        assert "permission denied" in message
    finally:
        shutil.rmtree(folder)


def test_missing_root_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        list(discover_images([tmp_path / "nope"]))


def test_discovery_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ("b/Z.JPG", "a/y.Png", "a/x.webp", "c/readme.txt", "c/w.TIFF", "c/v.bmp", "d.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [os.path.relpath(f.path, tmp_path) for f in discover_images([tmp_path])]
    assert found == ["d.jpeg", "a/x.webp", "a/y.Png", "b/Z.JPG", "c/v.bmp", "c/w.TIFF"]


def test_worker_threads_keep_order_and_results(tmp_path):
    folder = tmp_path / "many"
    for i in range(23):
        save(folder / f"img_{i:02d}.png", gradient(40 + i, 36))
    (folder / "img_07.png").write_bytes(b"broken")
    serial = [item for batch in decode_folder([folder], SIZE, RunSettings(batch_size=5, workers=1)) for item in batch]
    threaded = [item for batch in decode_folder([folder], SIZE, RunSettings(batch_size=5, workers=3)) for item in batch]
    assert [item.path for item in serial] == [item.path for item in threaded]
    for one, other in zip(serial, threaded):
        assert type(one) is type(other)
        if isinstance(one, DecodedImage):
            assert np.array_equal(one.pixels, other.pixels) and one.sha256 == other.sha256
