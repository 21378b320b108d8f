"""What a file may cost to decode: the checks that refuse, before Pillow allocates a pixel, an
image whose decoding would take more memory or time than its header's size says.

``--max-pixels`` is held against the header Pillow reads, and against what the decoders really
allocate where that is more: the frame inside an ICO or ICNS, a TIFF's tiles, a cursor's mask,
a JPEG 2000 codestream's own header (with its tiles, components and layers, which drive
OpenJPEG's costs); an IPTC file wrapping another image file and a BLP1 texture holding a JPEG are
refused. Costs that grow with the file rather than the pixels are capped too: a JPEG's scans
and segments and a PNG's chunks (counted before Pillow opens the file), and an EXIF block's
size. Two reviews that tried to slip costly decodes past the checks found each of these
(README, "How images are read", lists what is left).
"""

from __future__ import annotations

import io
import re
import struct

from PIL import BmpImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image, Jpeg2KImagePlugin, PngImagePlugin

from .errors import ImageDecodeError

# libjpeg decodes the whole image again for every scan of a progressive JPEG (encoders write about
# 10), so a small file of empty scans could take hours; libjpeg-turbo's tools offer such a limit.
MAX_JPEG_SCANS = 500
# Pillow keeps every segment before the image data (a 16 MB file of 4 M empty APP1 segments took
# 6 s and 521 MB to open); genuine JPEGs hold a few dozen (an ICC profile is split in at most 255).
MAX_JPEG_SEGMENTS = 10_000
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # entropy-coded data holds FF only as FF 00 or a restart


def jpeg_segments(data: bytes) -> tuple[int, int]:
    """(segments, scans) of a JPEG's first image, found by walking its segments to its EOI, as
    libjpeg reads them: bytes between segments are skipped to the next FF (libjpeg warns of them
    and goes on). What segments hold (an EXIF thumbnail, an ICC profile) and what follows the
    image (a motion photo's video) is not counted. The walk stops once either count passes its
    limit (``MAX_JPEG_SEGMENTS``, ``MAX_JPEG_SCANS``); a damaged file stops it too, and its
    decoder says the rest."""
    position, segments, scans = 2, 0, 0  # after SOI
    while position + 4 <= len(data) and segments <= MAX_JPEG_SEGMENTS and scans <= MAX_JPEG_SCANS:
        if data[position] != 0xFF:
            position = data.find(b"\xff", position)
            if position < 0:
                break
            continue
        marker = data[position + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in (0xFF, 0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # fill, stuffed zero or no length
            # libjpeg skips FF 00 between segments as data, not a marker: reading a length there
            # would jump over segments (and scans) that it then decodes.
            position += 1 if marker == 0xFF else 2
            continue
        segments += 1
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
    return segments, scans


# Pillow reads every chunk before the image data as it opens a PNG (a million empty ones: 2.6 s,
# 114 MB); a genuine PNG holds a handful besides its image data (IDAT, and an APNG's fdAT).
MAX_PNG_CHUNKS = 10_000


def png_chunks(data: bytes) -> int:
    """Chunks of a PNG other than its image data (IDAT, fdAT), up to its IEND; the walk stops
    once the count passes ``MAX_PNG_CHUNKS``, or at damage (the decoder says the rest)."""
    position, chunks = 8, 0
    while position + 8 <= len(data) and chunks <= MAX_PNG_CHUNKS:
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IEND":
            break
        chunks += kind not in (b"IDAT", b"fdAT")
        position += 12 + length
    return chunks


def _check_jpeg_segments(data: bytes) -> None:
    """Refuse a JPEG of too many scans or segments, before Pillow reads a segment of it."""
    segments, scans = jpeg_segments(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"refused: the JPEG holds {scans:,} scans, over the limit of {MAX_JPEG_SCANS} (a progressive "
            "JPEG has about 10; each scan decodes the whole image again)"
        )
    if segments > MAX_JPEG_SEGMENTS:
        raise ImageDecodeError(
            f"refused: the JPEG holds over {MAX_JPEG_SEGMENTS:,} segments before its end (a genuine one has "
            "a few dozen)"
        )


MAX_EXIF_BYTES = 4 * 2**20  # a PNG's or WebP's EXIF block is parsed in full for the orientation


def check_exif(image: Image.Image) -> None:
    """Refuse an EXIF block over ``MAX_EXIF_BYTES``: Pillow parses all of it for the orientation
    (a 40 MB one whose Orientation tag had 20 M values took 454 MB)."""
    exif = image.info.get("exif")
    if isinstance(exif, bytes | bytearray) and len(exif) > MAX_EXIF_BYTES:
        raise ImageDecodeError(f"refused: its EXIF block is {len(exif):,} bytes, over the limit of {MAX_EXIF_BYTES:,}")


def check_pixels(what: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse ``size`` (width, height) over ``max_pixels``, saying ``what`` declares it."""
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"refused: {what} {width}×{height} pixels, over the limit of "
            f"{max_pixels:,} (raise max_pixels, --max-pixels, if the image is genuine)"
        )


def _icon_frame_size(data: bytes) -> tuple[int, int] | None:
    """The size the frame Pillow would decode from an ICO or ICNS file declares in its own
    header; None for other files, and where the headers do not parse (Pillow then decides).

    Pillow sizes an icon from the container's directory but decodes the frame (a PNG, a DIB
    bitmap or a JPEG 2000 stream) at whatever size that frame's header declares, held only to
    its own 179-megapixel limit, and an ICO's frame is decoded inside ``Image.open`` already. So
    this reads the headers first, with Pillow's own parsers and from the same places, without
    decoding a pixel; only the frame Pillow picks is read, so an icon of thousands of entries
    costs one header.
    """

    def declared(handle, offset: int, length: int | None, bitmap: bool) -> tuple[int, int]:
        handle.seek(offset)
        is_png = handle.read(8) == PngImagePlugin._MAGIC
        handle.seek(offset)
        if is_png:
            return PngImagePlugin.PngImageFile(handle).size
        if bitmap:  # an ICO's bitmap declares its XOR image and AND mask stacked: twice the height
            width, height = BmpImagePlugin.DibImageFile(handle).size
            return width, int(height / 2)
        return Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(handle.read(length))).size

    try:
        if IcoImagePlugin._accept(data):
            handle = io.BytesIO(data)
            entry = IcoImagePlugin.IcoFile(handle).entry[0]  # the one IcoImageFile opens with
            offset = entry["offset"] if isinstance(entry, dict) else entry.offset  # dicts before Pillow 11
            return declared(handle, offset, None, bitmap=True)
        if IcnsImagePlugin._accept(data):
            handle = io.BytesIO(data)
            icns = IcnsImagePlugin.IcnsFile(handle)
            spans = [
                icns.dct[code]
                for code, reader in icns.SIZES[icns.bestsize()]
                if code in icns.dct and reader is IcnsImagePlugin.read_png_or_jpeg2000
            ]  # the other frames are raw pixels, at the small size their type fixes
            sizes = [declared(handle, start, length, bitmap=False) for start, length in spans]
            return max(sizes, key=lambda size: size[0] * size[1], default=None)
    except Exception:  # not a well-formed icon after all: Image.open decides, and fails as it fails
        return None
    return None


_TIFF_INTEGER_BYTES = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4, 13: 4, 16: 8, 17: 8, 18: 8}  # by TIFF field type


def tiff_tile_size(data: bytes) -> tuple[int, int] | None:
    """(TileWidth, TileLength) of a TIFF's first directory as libtiff reads them: stored as any
    integer type, also the 8-byte ones that Pillow drops from a classic TIFF (libtiff does not),
    and unsigned; None where either is absent or the directory does not parse."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return None
    version = struct.unpack(order + "H", data[2:4])[0]
    big = version == 43  # BigTIFF: 8-byte counts and offsets
    head, entry, inline = (order + "HHQQ", 20, 8) if big else (order + "HHII", 12, 4)
    first = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    count_format, count_bytes = (order + "Q", 8) if big else (order + "H", 2)
    if first + count_bytes > len(data):
        return None
    entries = min(struct.unpack(count_format, data[first : first + count_bytes])[0], 4096)  # libtiff's own limit
    found = {}
    for start in range(first + count_bytes, min(first + count_bytes + entries * entry, len(data) - entry + 1), entry):
        tag, kind, count, value = struct.unpack(head, data[start : start + entry])
        width = _TIFF_INTEGER_BYTES.get(kind)
        if tag not in (322, 323) or width is None or count < 1:
            continue
        at = start + (entry - inline) if width <= inline else value  # inline, or at an offset
        field = data[at : at + width]
        if len(field) == width:
            found[tag] = int.from_bytes(field, "little" if order == "<" else "big")  # libtiff's are unsigned
    return (found[322], found[323]) if len(found) == 2 else None


# OpenJPEG's memory and time grow with tiles, components and quality layers, not only pixels: a
# 91-byte codestream of 65,280 1×1 tiles took 820 MB, one of 10,000 layers 5 s and 1 GB.
MAX_JPEG2000_COMPONENTS = 4  # what Pillow's modes hold (L, LA, RGB, RGBA); more fail after decoding
MAX_JPEG2000_LAYERS = 64  # encoders write a few to a few dozen
MIN_JPEG2000_TILE_PIXELS = 4096  # several tiles of under 64×64 pixels each are refused


def jpeg2000_codestream(data: bytes) -> tuple[tuple[int, int], int, tuple[int, int], int, int] | None:
    """((width, height), components, (tile width, tile height), tiles, quality layers) from a
    JPEG 2000 codestream's SIZ and COD segments, the codestream found as OpenJPEG finds it (a
    bare J2K stream, or the ``jp2c`` box among a JP2 file's top-level boxes, whatever boxes come
    before it); None where it cannot be found or parsed."""
    start = 0
    if not data.startswith(b"\xff\x4f\xff\x51"):
        start = None
        position = 0
        while position + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[position : position + 8])
            header = 8
            if length == 1 and position + 16 <= len(data):
                length, header = struct.unpack(">Q", data[position + 8 : position + 16])[0], 16
            elif length == 0:
                length = len(data) - position
            if kind == b"jp2c":
                start = position + header
                break
            if length < header:
                return None
            position += length
    if start is None or not data.startswith(b"\xff\x4f\xff\x51", start) or start + 42 > len(data):
        return None
    x, y, x0, y0, tile_x, tile_y, tile_x0, tile_y0 = struct.unpack(">8I", data[start + 8 : start + 40])
    components = struct.unpack(">H", data[start + 40 : start + 42])[0]
    if not (x > x0 and y > y0 and tile_x and tile_y and x > tile_x0 and y > tile_y0):
        return None
    tiles = -(-(x - tile_x0) // tile_x) * -(-(y - tile_y0) // tile_y)
    position, layers = start + 4 + struct.unpack(">H", data[start + 4 : start + 6])[0], None
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] != 0x90:  # to SOT
        marker, length = data[position + 1], struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker == 0x52 and position + 9 <= len(data):  # COD: Scod, progression order, layers
            layers = struct.unpack(">H", data[position + 6 : position + 8])[0]
        position += 2 + length
    return ((x - x0, y - y0), components, (tile_x, tile_y), tiles, layers) if layers is not None else None


def _check_jpeg2000(data: bytes, max_pixels: int) -> None:
    """Refuse a JPEG 2000 file whose codestream is too costly for OpenJPEG, or cannot be read."""
    found = jpeg2000_codestream(data)
    if found is None:
        raise ImageDecodeError("refused: a JPEG 2000 file whose codestream header cannot be read")
    area, components, tile, tiles, layers = found
    check_pixels("its codestream declares", area, max_pixels)
    if components > MAX_JPEG2000_COMPONENTS:
        raise ImageDecodeError(f"refused: the JPEG 2000 codestream holds {components:,} components (at most 4)")
    if tiles > 1 and tile[0] * tile[1] < MIN_JPEG2000_TILE_PIXELS:
        raise ImageDecodeError(
            f"refused: the JPEG 2000 codestream holds {tiles:,} tiles of {tile[0]}×{tile[1]} pixels (under 64×64 each)"
        )
    if layers > MAX_JPEG2000_LAYERS:
        raise ImageDecodeError(
            f"refused: the JPEG 2000 codestream holds {layers:,} quality layers, over the limit of {MAX_JPEG2000_LAYERS}"
        )


def _check_nested_decodes(image: Image.Image, data: bytes, max_pixels: int) -> None:
    """Refuse what decoding ``image`` would allocate beyond its header's size and manifpt's limits.

    Two formats wrap a whole image file that Pillow opens and decodes at its own size, held only
    to Pillow's 179-megapixel limit: an IPTC/NAA record's embedded file (any format, unless its
    pixels are raw) and a BLP1 texture's JPEG; they are refused. libtiff decodes a tiled TIFF a
    whole tile at a time, so a tile larger than the image is allocated in full: the tile's size
    is held to ``max_pixels`` too, and so is a 1-bit or grey cursor's image with the mask that
    Pillow decodes below it; JPEG 2000: :func:`_check_jpeg2000`.
    """
    args = image.tile[0].args if image.tile else None
    compression = args[0] if isinstance(args, tuple) and args else None
    if image.format == "IPTC" and compression != "raw":
        raise ImageDecodeError(
            "refused: an IPTC/NAA file wrapping another image file, which would be decoded unchecked"
        )
    if image.format == "BLP" and getattr(image, "magic", None) == b"BLP1" and compression == 0:
        raise ImageDecodeError("refused: a BLP1 texture holding a JPEG, which would be decoded unchecked")
    if image.format == "CUR" and image.mode == "LA":  # a 1-bit or grey cursor decodes its mask below it
        check_pixels("with its mask, the cursor decodes", (image.width, 2 * image.height), max_pixels)
    if image.format == "JPEG2000":
        _check_jpeg2000(data, max_pixels)
    if image.format == "TIFF":
        tile = tiff_tile_size(data)
        if tile is not None:
            check_pixels("its tiles are", tile, max_pixels)


def check_before_open(data: bytes, max_pixels: int) -> None:
    """What can be refused from a file's bytes before Pillow reads them: a JPEG's scans and
    segments, a PNG's chunks, and the frame an ICO or ICNS would decode (Pillow decodes an ICO's
    inside ``Image.open``)."""
    if data.startswith(b"\xff\xd8\xff"):  # what Pillow's JPEG plugin accepts
        _check_jpeg_segments(data)
    if data.startswith(PngImagePlugin._MAGIC) and png_chunks(data) > MAX_PNG_CHUNKS:
        raise ImageDecodeError(
            f"refused: the PNG holds over {MAX_PNG_CHUNKS:,} chunks besides its image data (a genuine one has a handful)"
        )
    frame = _icon_frame_size(data)
    if frame is not None:
        check_pixels("the icon frame it would decode declares", frame, max_pixels)


def check_opened(image: Image.Image, data: bytes, max_pixels: int) -> None:
    """What can be refused once Pillow has read ``image``'s header, before it decodes a pixel."""
    check_pixels("header declares", image.size, max_pixels)
    _check_nested_decodes(image, data, max_pixels)
