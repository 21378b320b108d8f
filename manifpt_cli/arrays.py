"""Images stored as the rows of one NumPy file (``.npy``, or ``.npz`` with an ``images`` array).

A million loose 32×32 PNGs cost more to list, open and decode than to embed; one array file of
uint8 N×H×W×3 pixels (what ``../shared/data/real32.npz`` holds) is read in a single sequential
pass instead. This module knows the container only: it checks the header and streams rows in
blocks, so memory stays at one block however many rows the file holds (an ``.npz`` member is
decompressed as it is read, never loaded whole). What a row becomes (size policy, SHA-256,
path) is decided by :mod:`manifpt_cli.images`.

Recognised by content, not by name: a ``.npy`` file starts with ``\\x93NUMPY``, an ``.npz`` is a
ZIP archive (``PK\\x03\\x04``) whose member ``images.npy`` (or its only ``.npy`` member) is the
array. The array must be C-ordered uint8 of shape (N, H, W, 3); object arrays are never
unpickled.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .errors import ImageDecodeError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
NPZ_MEMBER = "images.npy"
# Format 3.0 differs from 2.0 only in allowing UTF-8 field names, which a uint8 array never has.
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def is_array_header(prefix: bytes) -> bool:
    """Whether a file's first bytes are those of a ``.npy`` file or a ZIP archive (``.npz``)."""
    return prefix.startswith(NPY_MAGIC) or prefix.startswith(ZIP_MAGIC)


@dataclass(frozen=True)
class ArrayShape:
    """The rows an array file declares: ``rows`` images of ``height``×``width`` RGB pixels."""

    rows: int
    height: int
    width: int

    @property
    def row_bytes(self) -> int:
        return self.height * self.width * 3


def _read_header(stream: BinaryIO) -> ArrayShape:
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _HEADER_READERS:
            raise ValueError(f"NumPy file format version {version} is not one of {sorted(_HEADER_READERS)}")
        shape, fortran_order, dtype = _HEADER_READERS[version](stream)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error) as exc:
        raise ImageDecodeError(f"not a readable NumPy array file: {exc}") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ImageDecodeError(
            f"the array is {dtype} of shape {tuple(shape)}; image arrays must be uint8 of shape (N, H, W, 3)"
        )
    if fortran_order:
        raise ImageDecodeError("the array is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    rows, height, width, _ = (int(n) for n in shape)
    if min(height, width) < 1:
        raise ImageDecodeError(f"the array's images are {height}×{width} pixels: empty")
    return ArrayShape(rows, height, width)


def _npz_member(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    if NPZ_MEMBER in names:
        return NPZ_MEMBER
    arrays = [name for name in names if name.endswith(".npy")]
    if len(arrays) == 1:
        return arrays[0]
    raise ImageDecodeError(
        f"the .npz file holds {len(arrays)} arrays and none is named 'images' ({', '.join(names[:5]) or 'none'})"
    )


def _check_crc(archive: zipfile.ZipFile, name: str) -> None:
    """Read a member through once: ZIP checks its CRC-32 only at the end, after every row."""
    with archive.open(name) as member:
        while member.read(1 << 22):
            pass


@contextmanager
def open_array(handle: BinaryIO, check_crc: bool = True) -> Iterator[tuple[ArrayShape, BinaryIO]]:
    """The declared shape and a stream positioned at the first row, for an open array file.

    An ``.npz`` member is first read through once to check its CRC-32 (``check_crc``), so that no
    row of a damaged archive is ever handed out. It must be stored or deflated (as ``np.savez`` and
    ``np.savez_compressed`` write it) and hold exactly the bytes its header declares: the reads
    then never give more than the declared rows, however well the data compresses (a 1 KB bzip2
    member can hold gigabytes of zeros, which ``zipfile`` would decompress in one read).

    Raises:
        ImageDecodeError: not a NumPy file or ZIP, no image array in it, not uint8 (N, H, W, 3),
            a member compressed otherwise or of another size than declared, or a damaged archive.
    """
    if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
        handle.seek(0)
        yield _read_header(handle), handle
        return
    handle.seek(0)
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:  # names not UTF-8
        raise ImageDecodeError(f"not a readable .npz archive: {exc}") from None
    try:
        name = _npz_member(archive)
        info = archive.getinfo(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ImageDecodeError(
                f"the .npz member {name} is compressed with method {info.compress_type}; manifpt reads members "
                "stored or deflated, as np.savez and np.savez_compressed write them"
            )
        with archive.open(name) as probe:
            shape = _read_header(probe)
            declared = probe.tell() + shape.rows * shape.row_bytes
        if info.file_size != declared:
            raise ImageDecodeError(
                f"the .npz member {name} holds {info.file_size:,} bytes, but its header declares {declared:,}"
            )
        if check_crc:
            _check_crc(archive, name)
        member = archive.open(name)
    # RuntimeError: zipfile's word for an encrypted member.
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        OSError,
        EOFError,
        zlib.error,
        RuntimeError,
    ) as exc:
        archive.close()
        raise ImageDecodeError(f"not a readable .npz archive: {exc}") from None
    except BaseException:
        archive.close()
        raise
    with archive, member:
        yield _read_header(member), member


def read_rows(stream: BinaryIO, shape: ArrayShape, block: int) -> Iterator[np.ndarray]:
    """The rows as (n, H, W, 3) uint8 blocks of at most ``block`` rows, in order.

    Raises:
        ImageDecodeError: the data ends before the declared rows, or the archive is damaged (after
            every complete block before the damage has been yielded).
    """
    done = 0
    while done < shape.rows:
        count = min(block, shape.rows - done)
        want = count * shape.row_bytes
        try:
            data = stream.read(want)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise ImageDecodeError(f"damaged array data after row {done}: {exc}") from None
        complete = len(data) // shape.row_bytes
        if complete:
            rows = np.frombuffer(data, np.uint8, complete * shape.row_bytes)
            yield rows.reshape(complete, shape.height, shape.width, 3)
        done += complete
        if len(data) < want:
            raise ImageDecodeError(f"truncated: the header declares {shape.rows:,} rows, the data ends at row {done:,}")
