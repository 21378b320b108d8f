"""Stage 1: discovery and decoding, with every kind of bad input the issue lists."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifpt_cli import decode_limits
from manifpt_cli import images as images_module
from manifpt_cli.errors import ImageDecodeError, UsageError
from manifpt_cli.images import (
    DecodedImage,
    FailedImage,
    FoundFile,
    SkippedFile,
    count_images,
    decode_folder,
    decode_image,
    discover_images,
    display_path,
    image_extensions,
    path_from_display,
    split_batch,
    try_decode,
)
from manifpt_cli.settings import RunSettings

from .conftest import finishes, writer_for

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


def test_a_palette_of_rgba_colours_is_composited_on_white(tmp_path):
    """A colour-mapped TGA with a 32-bit map opens as P with an RGBA palette and no
    ``transparency``: its alpha used to be dropped (black where it is transparent)."""
    colour_map = bytes([0, 0, 0, 0, 0, 0, 255, 255])  # BGRA: 0 transparent black, 1 opaque red
    header = struct.pack("<BBBHHBHHHHBB", 0, 1, 1, 0, 2, 32, 0, 0, SIZE, SIZE, 8, 0x28)
    pixels = bytes([0] * (SIZE * SIZE // 2) + [1] * (SIZE * SIZE // 2))
    (tmp_path / "map.tga").write_bytes(header + colour_map + pixels)
    assert Image.open(tmp_path / "map.tga").palette.mode == "RGBA"
    decoded = decode_image(str(tmp_path / "map.tga"), SIZE)
    assert tuple(decoded.pixels[0, 0]) == (255, 255, 255) and tuple(decoded.pixels[-1, 0]) == (255, 0, 0)


def test_postscript_is_never_run(tmp_path):
    (tmp_path / "a.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n")
    with pytest.raises(ImageDecodeError, match="PostScript .* not decoded"):
        decode_image(str(tmp_path / "a.eps"), SIZE)


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


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def icon_hiding(frame: bytes, fmt: str) -> bytes:
    """An ICO whose directory lists a 16×16 icon, or an ICNS whose one block is the 128×128 PNG
    type, holding ``frame``: a PNG that declares its own, larger size."""
    if fmt == "ICO":
        entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(frame), 6 + 16)
        return struct.pack("<HHH", 0, 1, 1) + entry + frame
    block = b"ic07" + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


@pytest.mark.parametrize("fmt", ["ICO", "ICNS"])
def test_an_icon_frame_is_held_to_max_pixels_not_its_directory(tmp_path, fmt):
    """Pillow sizes an icon from its directory but decodes the frame at the size the frame's own
    header declares, held only to Pillow's 179 MP limit (an ICO's inside ``Image.open``): here
    600×600 behind a 16×16 or 128×128 entry, over a limit of 100,000 that the directory's size
    is not."""
    path = tmp_path / f"hidden.{fmt.lower()}"
    path.write_bytes(icon_hiding(_png_bytes(gradient(600, 600)), fmt))
    with pytest.raises(ImageDecodeError, match="the icon frame it would decode declares 600×600 pixels"):
        decode_image(str(path), SIZE, max_pixels=100_000)
    if fmt == "ICO":  # Pillow decodes it, at 600×600, when the limit allows
        with pytest.warns(UserWarning, match="not the expected size"):
            assert decode_image(str(path), SIZE, max_pixels=600 * 600).original_size == (600, 600)


def test_a_bitmap_icon_is_held_to_its_image_not_its_stacked_mask(tmp_path):
    """An ICO bitmap declares its image and 1-bit mask stacked (twice the height): the limit is on the image."""
    path = save(tmp_path / "bitmap.ico", gradient(48, 48), format="ICO", sizes=[(48, 48)], bitmap_format="bmp")
    assert decode_image(str(path), SIZE, max_pixels=48 * 48).original_size == (48, 48)
    with pytest.raises(ImageDecodeError, match="declares 48×48 pixels, over the limit of 2,303"):
        decode_image(str(path), SIZE, max_pixels=48 * 48 - 1)


def _iptc_record(record: int, dataset: int, data: bytes) -> bytes:
    return bytes([0x1C, record, dataset]) + struct.pack(">H", len(data)) + data


def iptc_wrapping(inner: bytes) -> bytes:
    """An IPTC/NAA file declaring a 16×16 image, "compressed": its pixels are the file ``inner``."""
    header = _iptc_record(3, 60, b"\1\0") + _iptc_record(3, 20, b"\0\x10") + _iptc_record(3, 30, b"\0\x10")
    return header + _iptc_record(3, 120, b"\5") + _iptc_record(8, 10, inner)


def blp1_holding(jpeg: bytes) -> bytes:
    """A BLP1 texture declaring 16×16, JPEG-compressed: its one mipmap is the JPEG ``jpeg``."""
    header = b"BLP1" + struct.pack("<iIIIii", 0, 0, 16, 16, 5, 0)
    start = len(header) + 128 + 4  # after the 16 mipmap offsets, 16 lengths and the JPEG header's size
    offsets = struct.pack("<16I", start, *[0] * 15) + struct.pack("<16I", len(jpeg), *[0] * 15)
    return header + offsets + struct.pack("<I", 0) + jpeg


def tiled_tiff(tile: int, tile_type: int = 4) -> bytes:
    """A 16×16 8-bit grey TIFF stored as one ``tile``×``tile`` deflated tile of zeros, its tile
    size stored as TIFF type ``tile_type``: 4 (LONG), or 18 (IFD8, 8 bytes: only BigTIFF has it,
    so Pillow drops it from a classic TIFF, but libtiff reads it)."""
    data = zlib.compress(b"\0" * tile * tile)
    short, long, ifd8 = 3, 4, 18
    wide = 8 + 2 + 12 * 11 + 4  # where 8-byte values go, after the directory; then the tile
    tags = [(256, short, 16), (257, short, 16), (258, short, 8), (259, short, 8), (262, short, 1)]
    tags += [(277, short, 1), (284, short, 1), (322, tile_type, tile), (323, tile_type, tile)]
    tags += [(324, long, wide + 16), (325, long, len(data))]

    def field(kind: int, value: int, slot: int) -> bytes:
        if kind == short:
            return struct.pack("<HH", value, 0)
        return struct.pack("<I", wide + 8 * slot if kind == ifd8 else value)

    entries = b"".join(struct.pack("<HHI", tag, kind, 1) + field(kind, value, tag - 322) for tag, kind, value in tags)
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0\0\0\0" + struct.pack("<QQ", tile, tile) + data


def grey_cursor(side: int) -> bytes:
    """A ``side``² 8-bit grey CUR: its bitmap stacks the image and an equal mask (twice the height)."""
    bitmap = struct.pack("<IiiHHIIiiII", 40, side, 2 * side, 1, 8, 0, 0, 0, 0, 256, 0)
    bitmap += b"".join(bytes((i, i, i, 0)) for i in range(256)) + bytes(side * 2 * side)
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 0, 0, len(bitmap), 6 + 16)
    return struct.pack("<HHH", 0, 2, 1) + entry + bitmap


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("wrapped.iim", lambda: iptc_wrapping(_png_bytes(gradient(600, 600))), "IPTC/NAA file wrapping another"),
        ("texture.blp", lambda: blp1_holding(_jpeg_bytes(gradient(600, 600))), "BLP1 texture holding a JPEG"),
        ("tiled.tif", lambda: tiled_tiff(1024), "its tiles are 1024×1024 pixels"),
        ("eight-byte.tif", lambda: tiled_tiff(1024, tile_type=18), "its tiles are 1024×1024 pixels"),
        ("cursor.cur", lambda: grey_cursor(250), "with its mask, the cursor decodes 250×500 pixels"),
    ],
)
def test_an_image_decoded_at_a_size_its_header_does_not_say_is_refused(tmp_path, name, content, message):
    """A 16×16 header over a 600×600 image file inside (IPTC, BLP1), or over a 1024×1024 tile
    that libtiff allocates whole (TIFF), and a 250×250 cursor decoded with its mask below it:
    each would be decoded past a limit of 100,000 pixels."""
    path = tmp_path / name
    path.write_bytes(content())
    with Image.open(path) as opened:
        assert opened.size[0] * opened.size[1] <= 100_000, "the header alone passes the limit"
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(str(path), SIZE, max_pixels=100_000)


@pytest.mark.parametrize("fmt, kwargs", [("BLP", {}), ("BLP", {"blp_version": "BLP1"}), ("TIFF", {})])
def test_textures_and_tiffs_that_hide_nothing_still_decode(tmp_path, fmt, kwargs):
    path = save(tmp_path / f"plain.{fmt.lower()}", gradient(48, 40).convert("P"), format=fmt, **kwargs)
    assert decode_image(str(path), SIZE, max_pixels=48 * 40).original_size == (48, 40)
    tiled = tmp_path / "tiled.tif"  # one tile the image's own size
    tiled.write_bytes(tiled_tiff(16))
    assert decode_image(str(tiled), SIZE, max_pixels=16 * 16).original_size == (16, 16)
    cursor = tmp_path / "cursor.cur"
    cursor.write_bytes(grey_cursor(100))
    assert decode_image(str(cursor), SIZE, max_pixels=2 * 100 * 100).original_size == (100, 100)


def j2k_codestream(side: int, tile: int, components: int = 1, layers: int = 1) -> bytes:
    """A tiny JPEG 2000 codestream (SIZ, COD, QCD, one empty tile part) of a ``side``² image in
    ``tile``² tiles, with ``layers`` quality layers."""
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * components, 0, side, side, 0, 0, tile, tile, 0, 0, components)
    cod = struct.pack(">HBBHBBBBBB", 12, 0, 0, layers, 0, 1, 4, 4, 0, 1)
    qcd = b"\xff\x5c\x00\x04\x40\x40"
    tile_part = b"\xff\x90\x00\x0a\x00\x00\x00\x00\x00\x0f\x00\x01\xff\x93\x00"
    return b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" * components + b"\xff\x52" + cod + qcd + tile_part + b"\xff\xd9"


def _box(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I", 8 + len(content)) + kind + content


def jp2_hiding(codestream: bytes) -> bytes:
    """A JP2 file whose header says 100×100 RGB, a ``free`` box between it and the codestream (so
    that Pillow does not read the codestream's own header; OpenJPEG does)."""
    header = _box(b"ihdr", struct.pack(">IIHBBBB", 100, 100, 3, 7, 7, 0, 0)) + _box(b"colr", b"\x01\0\0\0\0\0\x10")
    signature = _box(b"jP  ", b"\r\n\x87\n") + _box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
    return signature + _box(b"jp2h", header) + _box(b"free", b"") + _box(b"jp2c", codestream)


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda: j2k_codestream(100, 1), "10,000 tiles of 1×1 pixels"),  # 94 MB in OpenJPEG
        (lambda: j2k_codestream(100, 100, components=4, layers=10_000), "10,000 quality layers"),  # 5 s, 1 GB
        (lambda: jp2_hiding(j2k_codestream(100, 100, components=256)), "256 components"),  # 2.7 GB
        (lambda: jp2_hiding(j2k_codestream(4000, 4000)), "codestream declares 4000×4000 pixels"),
        (lambda: jp2_hiding(b"\xff\x4f\xff\x51" + b"\0" * 30), "codestream header cannot be read"),
    ],
)
def test_a_jpeg2000_file_costly_for_openjpeg_is_refused(tmp_path, content, message):
    """OpenJPEG's memory and time grow with tiles, components and layers, not only pixels; and a
    JP2 file's codestream is what OpenJPEG decodes, whatever the header Pillow reads says."""
    path = tmp_path / "costly.jp2"
    path.write_bytes(content())
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(str(path), SIZE, max_pixels=1_000_000)


@pytest.mark.parametrize("kwargs", [{}, {"no_jp2": True}, {"tile_size": (64, 64)}, {"quality_layers": [40, 20, 10]}])
def test_ordinary_jpeg2000_files_decode(tmp_path, kwargs):
    path = save(tmp_path / "plain.jp2", gradient(300, 200), format="JPEG2000", **kwargs)
    assert decode_image(str(path), SIZE, max_pixels=300 * 200).original_size == (300, 200)


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
    # Only regular files are opened: the folder is refused from its stat (the message changed
    # from "is a folder" when the open() error used to tell).
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(a folder\)"):
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


def _as_nobody(task) -> str:
    """Run ``task()`` in a forked child running as uid 65534; return the text it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, try, report, exit without running pytest's teardown
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, task().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        message = reader.read()
    os.waitpid(pid, 0)
    return message


def _decode_as_nobody(path: str) -> str:
    """Decode ``path`` in a forked child running as uid 65534; return the error text it got."""
    return _as_nobody(lambda: getattr(try_decode(FoundFile(path), SIZE), "error", "decoded"))


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
    found = list(discover_images([tmp_path]))
    # readme.txt is no longer dropped silently: it comes in its place, marked as skipped.
    assert [os.path.relpath(f.path, tmp_path) for f in found] == [
        "d.jpeg",
        "a/x.webp",
        "a/y.Png",
        "b/Z.JPG",
        "c/readme.txt",
        "c/v.bmp",
        "c/w.TIFF",
    ]
    assert [f.skipped is not None for f in found] == [False] * 4 + [True] + [False] * 2


def test_a_file_reached_from_two_roots_is_listed_once(tmp_path):
    for name in ("s/a.png", "s/blur/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    folder, file = tmp_path / "s", tmp_path / "s" / "blur" / "x.png"
    both = sorted([str(folder / "a.png"), str(file)])
    for roots, expected in (
        ([folder, file], both),
        ([file, folder], both),
        ([folder, folder], both),
        ([file, folder / "." / "blur" / "x.png"], [str(file)]),
    ):
        assert sorted(os.path.abspath(f.path) for f in discover_images(roots)) == expected, roots


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


def test_split_batch_returns_decoded_failed_and_skipped(tmp_path):
    save(tmp_path / "a.png", gradient())
    (tmp_path / "b.png").write_bytes(b"broken")
    (tmp_path / "c.txt").write_text("notes")
    (batch,) = decode_folder([tmp_path], SIZE, RunSettings(batch_size=10))
    decoded, failed, skipped = split_batch(batch)  # a 3-tuple since skipped files became rows
    assert [Path(item.path).name for item in decoded] == ["a.png"]
    assert [Path(item.path).name for item in failed] == ["b.png"]
    assert [Path(item.path).name for item in skipped] == ["c.txt"]
    assert count_images([tmp_path]) == len(batch) == 3, "every discovered entry is one item"


# --- only regular files are opened ---------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_like_an_image_is_one_row_and_never_opened(tmp_path):
    save(tmp_path / "a.png", gradient())
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    for settings in (RunSettings(batch_size=4), RunSettings(batch_size=4, sniff=True, workers=2)):
        results = finishes(
            lambda settings=settings: [i for b in decode_folder([tmp_path], SIZE, settings) for i in b],
            writer_for(fifo),
        )
        assert [type(item) for item in results] == [DecodedImage, FailedImage]
        assert results[1].error.startswith("not a regular file (a FIFO)")
    # Given directly as a root file it is a candidate too, and refused the same way.
    (result,) = finishes(lambda: next(decode_folder([fifo], SIZE, RunSettings())), writer_for(fifo))
    assert isinstance(result, FailedImage) and "not a regular file (a FIFO)" in result.error


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets on this platform")
def test_socket_named_like_an_image_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative name keeps the socket path under the 108-byte limit
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("s.png")
        result = try_decode(next(discover_images([tmp_path])), SIZE)
    assert isinstance(result, FailedImage) and result.error.startswith("not a regular file (a socket)")


@pytest.mark.skipif(
    not os.path.exists("/dev/zero") or not stat.S_ISCHR(os.stat("/dev/zero").st_mode), reason="no /dev/zero"
)
def test_device_symlinked_as_an_image_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.png")
    (found,) = discover_images([tmp_path])
    result = try_decode(found, SIZE)
    assert isinstance(result, FailedImage)
    assert result.error.startswith("not a regular file (a character device)") and result.sha256 == ""


# --- the file-size limit ---------------------------------------------------------------------------


def test_huge_sparse_file_is_refused_from_its_size_without_being_read(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(20 * 2**30)  # 20 GiB declared, no block written
    started = time.perf_counter()
    (result,) = next(decode_folder([tmp_path], SIZE, RunSettings()))
    assert time.perf_counter() - started < 5
    assert isinstance(result, FailedImage) and result.sha256 == "", "refused before a byte was read"
    assert result.error == (
        "file is 21,474,836,480 bytes, over the limit of 268,435,456 "
        "(raise max_file_bytes, --max-file-bytes, if it is genuine)"
    )


def test_max_file_bytes_is_ours_to_set(tmp_path):
    path = save(tmp_path / "g.png", gradient())
    length = path.stat().st_size
    assert decode_image(str(path), SIZE, max_file_bytes=length).pixels.shape == (SIZE, SIZE, 3)
    with pytest.raises(ImageDecodeError, match=f"over the limit of {length - 1:,}"):
        decode_image(str(path), SIZE, max_file_bytes=length - 1)
    (batch,) = decode_folder([tmp_path], SIZE, RunSettings(max_file_bytes=length - 1))
    assert isinstance(batch[0], FailedImage) and "over the limit" in batch[0].error


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc")
def test_reading_is_bounded_even_when_the_file_is_bigger_than_its_stat_size(tmp_path):
    # /proc files are regular files whose stat size is 0 but which read as hundreds of bytes: the
    # same situation as a file growing between stat and read. Reading stops at the limit + 1.
    assert os.stat("/proc/self/status").st_size == 0
    os.symlink("/proc/self/status", tmp_path / "status.png")
    with pytest.raises(ImageDecodeError, match="grew past the limit of 64 bytes"):
        decode_image(str(tmp_path / "status.png"), SIZE, max_file_bytes=64)


# --- discovery: any depth, every readable format, nothing silently ignored -----------------------


def _nested(root: Path, depth: int) -> str:
    """Make ``depth`` nested folders (iteratively: os.makedirs recurses); return the deepest."""
    path = str(root)
    for _ in range(depth):
        path = os.path.join(path, "d")
        os.mkdir(path)
    return path


def _remove_nested(root: Path, depth: int) -> None:
    """Remove what :func:`_nested` made (shutil.rmtree recurses on Python 3.11)."""
    deepest = os.path.join(str(root), *["d"] * depth)
    for name in os.listdir(deepest):
        os.remove(os.path.join(deepest, name))
    for level in range(depth, 0, -1):
        os.rmdir(os.path.join(str(root), *["d"] * level))


def test_deeply_nested_folders_are_walked_without_recursion(tmp_path):
    depth = 1500  # os.walk on Python 3.11 raises RecursionError near 1000
    deepest = _nested(tmp_path, depth)
    try:
        save(Path(deepest) / "bottom.png", gradient())
        (result,) = [item for batch in decode_folder([tmp_path], SIZE, RunSettings()) for item in batch]
        assert isinstance(result, DecodedImage) and result.path == os.path.join(deepest, "bottom.png")
    finally:
        _remove_nested(tmp_path, depth)


def test_walk_order_is_the_one_os_walk_gives(tmp_path):
    for name in ("b/2.png", "b/1.png", "b/c/x.png", "a.png", "A/z.png", "a/b/y.png", "a/k.png", "e/f/g/h.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    os.symlink(tmp_path / "e", tmp_path / "b" / "link")  # a folder symlink, followed (before e itself)
    expected, visited = [], set()  # the former os.walk-based discovery, as it was
    for folder, subfolders, files in os.walk(tmp_path, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in visited:
            subfolders[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        subfolders.sort()
        expected += [os.path.join(folder, name) for name in sorted(files)]
    found = [f.path for f in discover_images([tmp_path])]
    assert found == expected
    assert [Path(path).name for path in found].count("h.png") == 1, "e is entered once, through b/link"
    assert str(tmp_path / "b" / "link" / "f" / "g" / "h.png") in found


def test_unlistable_folder_is_one_error_row():
    folder = Path(tempfile.mkdtemp(prefix="manifpt-perm-"))  # outside pytest's root-only tmp tree
    try:
        os.chmod(folder, 0o755)
        save(folder / "a.png", gradient())
        (folder / "locked").mkdir()
        save(folder / "locked" / "hidden.png", gradient())
        os.chmod(folder / "locked", 0)

        def listing() -> str:
            return "\n".join(f"{Path(f.path).name}|{f.error}" for f in discover_images([folder]))

        rows = (_as_nobody(listing) if os.geteuid() == 0 else listing()).splitlines()
        assert rows == ["a.png|None", "locked|cannot list folder: Permission denied"]
    finally:
        os.chmod(folder / "locked", 0o755)
        shutil.rmtree(folder)


def test_image_extensions_are_every_format_pillow_reads():
    extensions = image_extensions()
    for extension in (".gif", ".jfif", ".ico", ".ppm", ".tga", ".jpg", ".png", ".webp", ".tif", ".bmp", ".mpo"):
        assert extension in extensions
    assert ".pdf" not in extensions, "Pillow writes PDF but cannot read it"
    assert ".h5" not in extensions, "a stub format without a handler cannot be decoded"
    assert images_module.IMAGE_EXTENSIONS == extensions


@pytest.mark.parametrize(
    "name, fmt, kwargs",
    [
        ("anim.gif", "GIF", {}),
        ("upper.GIF", "GIF", {}),
        ("photo.jfif", "JPEG", {}),
        ("icon.ico", "ICO", {"sizes": [(48, 40)]}),
        ("pixmap.ppm", "PPM", {}),
        ("targa.TGA", "TGA", {}),
    ],
)
def test_every_readable_format_is_found_and_decoded(tmp_path, name, fmt, kwargs):
    save(tmp_path / name, gradient(), format=fmt, **kwargs)
    (batch,) = decode_folder([tmp_path], SIZE, RunSettings())
    assert [type(item) for item in batch] == [DecodedImage]
    assert batch[0].pixels.shape == (SIZE, SIZE, 3)


def test_extensionless_image_is_skipped_unless_sniffing(tmp_path):
    save(tmp_path / "noext", gradient(), format="PNG")
    (tmp_path / "notes.txt").write_text("not a picture")
    plain = [item for batch in decode_folder([tmp_path], SIZE, RunSettings()) for item in batch]
    assert plain == [
        SkippedFile(
            str(tmp_path / "noext"), "not an image file name (no extension); use sniff/--sniff to check contents"
        ),
        SkippedFile(
            str(tmp_path / "notes.txt"),
            "not an image file name (extension '.txt'); use sniff/--sniff to check contents",
        ),
    ]
    assert count_images([tmp_path]) == 2
    sniffed = [item for batch in decode_folder([tmp_path], SIZE, RunSettings(sniff=True)) for item in batch]
    assert [type(item) for item in sniffed] == [DecodedImage, FailedImage]
    assert "not an image" in sniffed[1].error
    assert count_images([tmp_path], sniff=True) == 2
    # A file given directly is a candidate whatever its name.
    (direct,) = next(decode_folder([tmp_path / "noext"], SIZE, RunSettings()))
    assert isinstance(direct, DecodedImage)


def test_skipped_reason_is_printable_for_any_extension(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"odd.t\xffxt")
    with open(raw, "wb") as handle:
        handle.write(b"x")
    (found,) = discover_images([tmp_path])
    assert found.skipped.startswith("not an image file name (extension '.t\\xffxt')")
    found.skipped.encode("utf-8")
    assert isinstance(try_decode(found, SIZE), SkippedFile)


# --- display_path: reversible and collision-free -------------------------------------------------

AWKWARD_NAMES = [
    b"plain.png",
    b"carriage\rreturn.png",
    b"line\nbreak.png",
    b"tab\there.png",
    b"quote\"s'.png",
    b"comma,name.png",
    b"caf\xe9_\xff.png",
    b"back\\slash.png",
    b"\\xff.png",
    b"\xff.png",
    b"\\\\x41\\",
    "ünï日本.png".encode(),
    b"\xed\xa0\x80surrogate.png",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_display_path_round_trips(name):
    shown = display_path(b"/suspects/" + name)
    shown.encode("utf-8")  # always writable to a report
    assert path_from_display(shown) == b"/suspects/" + name
    assert path_from_display(display_path(os.fsdecode(name))) == name


def test_display_path_has_no_collisions(tmp_path):
    assert display_path(b"\\xff.png") == "\\\\xff.png"  # a file literally named \xff.png
    assert display_path(b"\xff.png") == "\\xff.png"  # a file whose name is the byte 0xff
    assert len({display_path(name) for name in AWKWARD_NAMES}) == len(AWKWARD_NAMES)
    folder = os.fsencode(tmp_path)
    for content, name in ((b"literal", b"\\xff.png"), (b"byte", b"\xff.png")):
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(content)
    shown = [display_path(f.path) for f in discover_images([tmp_path])]
    assert len(set(shown)) == 2
    with open(path_from_display(shown[0]), "rb") as first, open(path_from_display(shown[1]), "rb") as second:
        assert {first.read(), second.read()} == {b"literal", b"byte"}


@pytest.mark.parametrize("text", ["a\\qb", "trailing\\", "short\\x4", "bad\\xzz"])
def test_path_from_display_refuses_a_stray_backslash(text):
    with pytest.raises(ValueError, match="stray backslash"):
        path_from_display(text)


# --- resizing in the source mode gives the old results ----------------------------------------------


def _reference(image: Image.Image, size: int) -> np.ndarray:
    """The policy on a square image: alpha on white, RGB, then one Lanczos resize of it all."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "Ptransparent", "1", "RGBA", "LA"])
def test_resizing_before_converting_changes_no_pixel(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (96, 96, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    kwargs = {}
    if mode == "Ptransparent":
        image, kwargs = image.convert("RGB").convert("P"), {"transparency": 7}
    elif mode != "RGBA":
        image = image.convert(mode)
    path = save(tmp_path / "img.png", image, **kwargs)
    assert np.array_equal(decode_image(str(path), SIZE).pixels, _reference(Image.open(path), SIZE))


def test_deep_image_scale_comes_from_the_whole_image(tmp_path):
    # 96×32 32-bit integer image: the bright (> 255) column is cropped away, but it still says
    # the image spans 0–65535, so the kept value 200 becomes round(200 × 255 / 65535) = 1.
    values = np.full((32, 96), 200, np.int32)
    values[:, 0] = 60_000
    path = save(tmp_path / "deep.tif", Image.fromarray(values, "I"))
    assert Image.open(path).mode == "I"
    assert (decode_image(str(path), SIZE).pixels == 1).all()
    sixteen = save(tmp_path / "deep16.png", Image.fromarray(np.full((64, 64), 65535, np.uint16)))
    assert (decode_image(str(sixteen), SIZE).pixels == 255).all()


def test_jpeg_reduced_decoding(tmp_path):
    big = save(tmp_path / "big.jpg", gradient(512, 400), quality=95)  # 400 ≥ 4 × 32: decoded at 1/4 scale
    small = save(tmp_path / "small.jpg", gradient(100, 100), quality=95)  # 100 < 4 × 32: decoded in full

    def full_decode(path: Path) -> np.ndarray:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return np.asarray(image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS))

    assert np.array_equal(decode_image(str(small), SIZE).pixels, full_decode(small))
    reduced = decode_image(str(big), SIZE)
    assert reduced.original_size == (512, 400), "the header size is reported, not the reduced one"
    difference = np.abs(reduced.pixels.astype(int) - full_decode(big).astype(int))
    assert difference.mean() < 2 and difference.max() < 40, "slightly different from a full decode"


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path):
    """libjpeg decodes the whole image again for every scan: a small file of empty scans at the
    pixel limit ran for an hour. A genuine progressive JPEG (about 10 scans) decodes, also with
    data after its end that holds the SOS bytes (a motion photo's video), which are not scans."""
    progressive = save(tmp_path / "progressive.jpg", gradient(64, 64), quality=90, progressive=True)
    data = progressive.read_bytes()
    assert 1 < decode_limits.jpeg_segments(data)[1] == data.count(b"\xff\xda") <= decode_limits.MAX_JPEG_SCANS
    (tmp_path / "trailer.jpg").write_bytes(data + b"\xff\xda" * 2 * decode_limits.MAX_JPEG_SCANS)
    for path in (progressive, tmp_path / "trailer.jpg"):
        assert decode_image(str(path), SIZE).pixels.shape == (SIZE, SIZE, 3)
    sos = data.index(b"\xff\xda")
    scan_header = data[sos : sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]]
    extra = decode_limits.MAX_JPEG_SCANS + 1 - data.count(b"\xff\xda")
    (tmp_path / "scans.jpg").write_bytes(data[:-2] + scan_header * extra + data[-2:])
    # libjpeg skips stray bytes before a segment (with a warning): they must not end the count.
    (tmp_path / "stray.jpg").write_bytes(data[:sos] + b"\x00" + data[sos:-2] + scan_header * extra + data[-2:])
    # A stuffed zero (FF 00) there is data to libjpeg too: read as a marker's length it jumped
    # over the scans after it, which libjpeg then decoded.
    (tmp_path / "stuffed.jpg").write_bytes(data[:sos] + b"\xff\x00" + data[sos:-2] + scan_header * extra + data[-2:])
    for name in ("scans.jpg", "stray.jpg", "stuffed.jpg"):
        with pytest.raises(ImageDecodeError, match=f"holds {decode_limits.MAX_JPEG_SCANS + 1} scans, over the limit"):
            decode_image(str(tmp_path / name), SIZE)


def test_a_jpeg_of_too_many_segments_is_refused_before_pillow_reads_them(tmp_path):
    """Pillow keeps every segment before the image data: millions of empty ones took seconds and
    gigabytes. A genuine JPEG with a few hundred (an ICC profile split in chunks) decodes."""
    data = save(tmp_path / "plain.jpg", gradient(64, 64), quality=90).read_bytes()
    empty_app1 = b"\xff\xe1\x00\x02"
    (tmp_path / "few.jpg").write_bytes(data[:2] + empty_app1 * 300 + data[2:])
    assert decode_image(str(tmp_path / "few.jpg"), SIZE).pixels.shape == (SIZE, SIZE, 3)
    (tmp_path / "many.jpg").write_bytes(data[:2] + empty_app1 * decode_limits.MAX_JPEG_SEGMENTS + data[2:])
    with pytest.raises(ImageDecodeError, match="holds over 10,000 segments"):
        decode_image(str(tmp_path / "many.jpg"), SIZE)


def test_a_png_of_too_many_chunks_or_too_big_an_exif_block_is_refused(tmp_path):
    """Pillow reads every chunk before the image data as it opens a PNG, and parses a whole EXIF
    block for its orientation: both grow with the file, not the pixels. Genuine amounts decode."""
    data = save(tmp_path / "plain.png", gradient(16, 16)).read_bytes()
    after_header = 8 + 25  # the signature and IHDR
    private = _chunk(b"prVt", b"")
    for count, refused in ((100, False), (decode_limits.MAX_PNG_CHUNKS, True)):
        (tmp_path / "chunks.png").write_bytes(data[:after_header] + private * count + data[after_header:])
        if refused:
            with pytest.raises(ImageDecodeError, match="holds over 10,000 chunks"):
                decode_image(str(tmp_path / "chunks.png"), SIZE)
        else:
            assert decode_image(str(tmp_path / "chunks.png"), SIZE).original_size == (16, 16)
    empty_tiff = b"MM\0*\0\0\0\x08\0\0\0\0\0\0"  # a big-endian TIFF header and an empty directory
    for padding, refused in ((1000, False), (decode_limits.MAX_EXIF_BYTES, True)):
        exif = _chunk(b"eXIf", empty_tiff + b"\0" * padding)
        (tmp_path / "exif.png").write_bytes(data[:after_header] + exif + data[after_header:])
        if refused:
            with pytest.raises(ImageDecodeError, match="its EXIF block is [0-9,]+ bytes, over the limit of 4,194,304"):
                decode_image(str(tmp_path / "exif.png"), SIZE)
        else:
            assert decode_image(str(tmp_path / "exif.png"), SIZE).original_size == (16, 16)


def _psd(pixels: np.ndarray) -> bytes:
    """A minimal Photoshop file: an RGB image of no layers, its channels stored raw."""
    height, width, _ = pixels.shape
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + pixels.transpose(2, 0, 1).tobytes()


def test_formats_that_cannot_seek_to_their_first_frame_decode(tmp_path):
    """PSD and single-image SPIDER files open on their image but refuse ``seek(0)``: they used
    to be reported as corrupt."""
    pixels = np.asarray(gradient(48, 40))
    (tmp_path / "image.psd").write_bytes(_psd(pixels))
    save(tmp_path / "image.spi", gradient(48, 40).convert("F"), format="SPIDER")
    for name in ("image.psd", "image.spi"):
        with Image.open(tmp_path / name) as opened, pytest.raises(EOFError):
            opened.seek(0)
        assert decode_image(str(tmp_path / name), SIZE).original_size == (48, 40)
    assert np.array_equal(decode_image(str(tmp_path / "image.psd"), 40).pixels, pixels[:, 4:44]), "its own pixels"


def test_orientation_one_is_the_same_as_none(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 1
    plain = save(tmp_path / "plain.png", gradient(64, 48))
    tagged = save(tmp_path / "tagged.png", gradient(64, 48), exif=exif.tobytes())
    assert np.array_equal(decode_image(str(plain), SIZE).pixels, decode_image(str(tagged), SIZE).pixels)


# --- bounded memory ------------------------------------------------------------------------------


def zero_png(path: Path, width: int, height: int) -> Path:
    """A zero-filled RGB PNG of width×height, written row by row (a few hundred KB on disk)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


_PEAK_RSS_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from manifpt_cli.images import decode_image
decode_image(sys.argv[3], 32)  # warm up: imports and Pillow plugins
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_image(sys.argv[2], 224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert decoded.pixels.shape == (224, 224, 3) and decoded.original_size == (6000, 6000)
print((after - before) * (1 if sys.platform == "darwin" else 1024))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_decoding_a_huge_png_keeps_one_copy_in_memory(tmp_path):
    # Measured on Linux (Pillow 13): the peak RSS grows by about 143 MiB (one 4-byte-per-pixel
    # RGB image: Pillow stores RGB as RGBX) where the former pipeline, with its EXIF-transpose copy,
    # RGB conversion and crop, grew by about 418 MiB. The bound is that one copy plus 150 MB.
    width = height = 6000
    big = zero_png(tmp_path / "big.png", width, height)
    small = save(tmp_path / "small.png", gradient())
    repository = str(Path(images_module.__file__).resolve().parents[1])
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, repository, str(big), str(small)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.split()[-1])
    bound = 4 * width * height + 150_000_000
    assert growth <= bound, f"peak RSS grew by {growth / 2**20:.0f} MiB, over {bound / 2**20:.0f} MiB"
