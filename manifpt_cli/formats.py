"""File-format names, versions and attribute keys (README, "File formats"), and atomic writes.

Every file manifpt writes names itself with a ``format`` and a ``format_version`` attribute;
readers check both and raise :class:`FormatError` on anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FormatError

FORMAT_VERSION = 1
INDEX_FORMAT = "manifpt-real-index"
ARTIFACTS_FORMAT = "manifpt-artifacts"
CHECKPOINT_FORMAT = "manifpt-attributor"
ONNX_METADATA_KEY = "manifpt"  # ONNX metadata_props key holding the JSON model card

RESIZE_POLICY = "centre-crop to square, then Lanczos (shrink) / bicubic (enlarge) to size×size; untouched if already size×size"
METRIC = "squared_l2"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, str]:
    """Attributes every output carries: who wrote it and when."""
    return {"manifpt_version": __version__, "created_utc": utc_now()}


def check_format(attrs: Mapping, expected: str, path: str | os.PathLike) -> None:
    """Raise FormatError unless ``attrs`` says ``expected`` at a version this reader understands."""
    found = attrs.get("format")
    if isinstance(found, bytes):
        found = found.decode()
    if found != expected:
        raise FormatError(f"{path} is not a {expected} file (format attribute: {found!r})")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path} is {expected} format version {version}; this manifpt ({__version__}) reads version "
            f"{FORMAT_VERSION}. Rebuild the file with this version."
        )


def json_attr(attrs: Mapping, key: str):
    """Decode a JSON-valued HDF5/ONNX attribute."""
    value = attrs[key]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    An interrupted or failed run (Ctrl-C included) leaves nothing under the final name, and an
    earlier complete file there stays intact until the new one is whole.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


# --- HDF5 helpers shared by the index and artifacts writers -------------------------------------


def h5_string_dtype():
    """h5py's variable-length UTF-8 string type (paths are stored display-safe, so always UTF-8)."""
    import h5py

    return h5py.string_dtype("utf-8")


def create_growing(group, name: str, row_shape: tuple[int, ...] = (), dtype="f4"):
    """An empty dataset that grows along axis 0, chunked at about 1 MiB."""
    row_bytes = 4 * int(np.prod(row_shape)) if row_shape else 64
    rows = max(1, min(1024, 2**20 // row_bytes))
    return group.create_dataset(name, (0, *row_shape), maxshape=(None, *row_shape), dtype=dtype, chunks=(rows, *row_shape))


def append_rows(dataset, rows) -> None:
    """Append ``rows`` to a dataset made by :func:`create_growing`."""
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows


def write_string_columns(group, **columns: list[str]) -> None:
    """Write equal-length lists of strings as UTF-8 string datasets of ``group``."""
    for name, values in columns.items():
        group.create_dataset(name, data=values, dtype=h5_string_dtype())
