"""File-format names, versions and attribute keys (README, "File formats"), and atomic writes.

Every file manifpt writes names itself with a ``format`` and a ``format_version`` attribute;
readers check both and raise :class:`FormatError` on anything else.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FormatError, UsageError
from .integrity import checkpoint_digest, verify_checkpoint
from .outputs import NoSpaceError, atomic_output

INDEX_FORMAT = "manifpt-real-index"
ARTIFACTS_FORMAT = "manifpt-artifacts"
CHECKPOINT_FORMAT = "manifpt-attributor"
ZOO_FORMAT = "manifpt-zoo-generator"
# The version each reader understands. 2: digests everywhere (manifpt 0.2). Attributors 3: calibration,
# open-set statistics and thresholds in the checkpoint and the ONNX graph (manifpt 0.3). Indexes 3: rgb
# embeddings as uint8 pixels with the exact-search tables instead of a flat FAISS index. Indexes 4:
# freq embeddings and FAISS index over the unique half of each point-symmetric spectrum. Indexes 5:
# no FAISS index for freq with a flat factory (its exact search codes the stored rows when opened).
# Indexes 6: a provenance_digest over the manifpt version, time of writing and failures list.
FORMAT_VERSIONS = {INDEX_FORMAT: 6, ARTIFACTS_FORMAT: 2, CHECKPOINT_FORMAT: 3, ZOO_FORMAT: 2}
# Older versions a reader still reads as they are: an index of version 4 differs from 5 only by a
# flat FAISS index of freq that version 5 does not write (and does not need); 5 from 6 only by the
# provenance digest it lacks (`index info` says so).
ALSO_READ = {INDEX_FORMAT: (4, 5)}
REMAKE_COMMANDS = {
    INDEX_FORMAT: "Versions 4 to 6 store freq as the unique half of each spectrum (and rgb as uint8 pixels with "
    "exact-search tables): run `manifpt index build` again."
}
ONNX_METADATA_KEY = "manifpt"  # ONNX metadata_props key holding the JSON model card

RESIZE_POLICY = (
    "centre-crop to square, then Lanczos (shrink) / bicubic (enlarge) to size×size; untouched if already size×size"
)
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
        if found in FORMAT_VERSIONS:  # another of manifpt's own files: given in the wrong place
            raise UsageError(f"{path} is a {found} file, not a {expected} file")
        raise FormatError(f"{path} is not a {expected} file (format attribute: {found!r})")
    version = int(attrs.get("format_version", -1))
    readable = (*ALSO_READ.get(expected, ()), FORMAT_VERSIONS[expected])
    if version not in readable:
        remedy = REMAKE_COMMANDS.get(expected, "Make the file again with this version.")
        raise FormatError(
            f"{path} is {expected} format version {version}; this manifpt ({__version__}) reads "
            f"version{'s' if len(readable) > 1 else ''} {' and '.join(map(str, readable))}. {remedy}"
        )


def open_regular(path: str | os.PathLike, mode: str = "rb", **text):
    """``open`` for regular files only: a folder, FIFO, device or socket (or a link to one) is refused with
    an OSError without waiting on it (opened non-blocking first; a FIFO with no writer, or
    ``/dev/zero``, would otherwise block or read for ever). ``text``: ``encoding``, ``newline``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(
                errno.EINVAL, "not a regular file (a folder, FIFO, device or socket); it was not read", os.fspath(path)
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a regular file's bytes (:func:`open_regular`), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# First bytes of the files people point manifpt at by mistake, to say what a file is instead.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SIGNATURES = (
    (HDF5_SIGNATURE, "an HDF5 file (a manifpt index or artifacts file?)"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint?)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> None:
    """Refuse ``path`` unless it is a regular file, saying what it is instead: missing (with
    ``hint``: how to make one), or a folder, a FIFO or a device (never opened: a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"no such {what} file: {path}{hint}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device"
        raise UsageError(f"{path} is {kind}, not {_article(what)} {what} file{hint}")


def not_of_kind(path: str | os.PathLike, signature: bytes, what: str) -> FormatError | UsageError:
    """The error for a file that did not open as ``what``: a file of the wrong kind (another
    known signature than ``signature``, exit 2), or a damaged one (exit 1)."""
    kind = describe_file(path)
    known = [k for s, k in _SIGNATURES if s != signature] + ["an ONNX model, judging by its name"]
    if kind in known:
        return UsageError(f"{path} is {kind}, not {_article(what)} {what}")
    return FormatError(f"{path} is not a readable {what}: it is {kind}, or truncated")


def describe_file(path: str | os.PathLike) -> str:
    """A few words on what ``path`` holds, judged by its first bytes and name, for error messages."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not start:
        return "an empty file"
    for signature, kind in _SIGNATURES:
        if start.startswith(signature):
            return kind
    if os.fspath(path).lower().endswith(".onnx"):
        return "an ONNX model, judging by its name"
    return "not a file manifpt recognises"


def backbone_path_for(model_path: str | os.PathLike) -> Path:
    """``dir/NAME.onnx`` → ``dir/NAME.backbone.onnx``."""
    path = Path(model_path)
    return path.with_name(f"{path.name.removesuffix('.onnx')}.backbone.onnx")


def json_attr(attrs: Mapping, key: str):
    """Decode a JSON-valued HDF5/ONNX attribute."""
    value = attrs[key]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


# --- PyTorch checkpoints (attributors and zoo generators) ---------------------------------------


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping, metadata: dict, *, overwrite: bool = False) -> None:
    """Write ``{"state_dict", "metadata": "<JSON>"}`` atomically; loads with ``weights_only=True``."""
    import torch

    sealed = {**metadata, "digest": checkpoint_digest(state_dict, metadata)}
    with atomic_output(path, overwrite=overwrite) as partial:
        torch.save({"state_dict": dict(state_dict), "metadata": json.dumps(sealed)}, partial)


def _check_stored_archive(path: str | os.PathLike, expected: str) -> None:
    """Refuse a checkpoint archive whose members are compressed, or together larger than the file:
    ``torch.save`` stores them as they are, and ``torch.load`` would unpack a deflated member
    whole (a 3.6 MB file holding 2 GiB of zeros took 2.8 GB before any check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):  # ValueError: a member name not UTF-8
        raise not_of_kind(path, b"PK\x03\x04", f"{expected} checkpoint") from None
    compressed = any(member.compress_type != zipfile.ZIP_STORED for member in members)
    if compressed or sum(member.file_size for member in members) > os.path.getsize(path):
        raise FormatError(
            f"{path} is not a {expected} checkpoint: its archive holds compressed members, or more than the "
            "file's size, which torch.save never writes (it was altered)"
        )


def load_checkpoint_payload(path: str | os.PathLike, expected: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a checkpoint of format ``expected``, read once and safely.

    Raises:
        UsageError: there is no such file.
        FormatError: the file is not a manifpt checkpoint of that format and version.
    """
    import torch

    require_file(path, "checkpoint")
    _check_stored_archive(path, expected)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        metadata = json.loads(payload["metadata"])
        state = payload["state_dict"]
    except Exception:
        raise FormatError(
            f"{path} is not a {expected} checkpoint: it is {describe_file(path)}, or a damaged one"
        ) from None
    check_format(metadata, expected, path)
    verify_checkpoint(state, metadata, os.fspath(path))
    return state, metadata


# --- HDF5 files of decoded samples (the index and the artifacts file) ---------------------------


def h5_string_dtype():
    """h5py's variable-length UTF-8 string type (paths are stored display-safe, so always UTF-8)."""
    import h5py

    return h5py.string_dtype("utf-8")


def _create_growing(group, name: str, row_shape: Sequence[int] = (), dtype="f4"):
    """An empty dataset that grows along axis 0, chunked at about 1 MiB."""
    row_bytes = 4 * int(np.prod(row_shape)) if row_shape else 64
    rows = max(1, min(1024, 2**20 // row_bytes))
    return group.create_dataset(
        name, (0, *row_shape), maxshape=(None, *row_shape), dtype=dtype, chunks=(rows, *row_shape)
    )


def _append_rows(dataset, rows) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows


DISK_RESERVE_BYTES = 4 * 2**20  # room HDF5 needs to close a file cleanly
BLOB_CHUNK = 2**20  # bytes per HDF5 chunk of a streamed blob (a serialised FAISS index)

# A per-sample column: (shape of one row, HDF5 dtype).
Column = tuple[tuple[int, ...], object]


class SampleFile:
    """Streams decoded samples, their per-space data and their failures into one HDF5 file.

    It owns the layout both sample files share: ``/<rows>/path`` (absolute, display-safe UTF-8),
    ``/<rows>/sha256`` and any further per-sample columns, ``/spaces/<space>/<dataset>``,
    ``/failures/path`` and ``/failures/error`` (plus extra failure columns), and the root
    attributes with ``format``, ``format_version`` and provenance. Open it with :func:`sample_file`.
    """

    def __init__(self, handle, rows: str, columns: Mapping[str, Column], failure_columns: Sequence[str]) -> None:
        self.handle = handle
        self.folder = os.path.dirname(os.path.abspath(handle.filename))
        group = handle.create_group(rows)
        self._rows = {"path": _create_growing(group, "path", dtype=h5_string_dtype())}
        self._rows["sha256"] = _create_growing(group, "sha256", dtype="S64")
        for name, (shape, dtype) in columns.items():
            self._rows[name] = _create_growing(group, name, shape, dtype)
        self._spaces: dict[str, dict] = {}
        self._failures: dict[str, list[str]] = {name: [] for name in ("path", "error", *failure_columns)}
        self.n_rows = 0

    def add_space(self, space: str, datasets: Mapping[str, Column], **attrs) -> None:
        """Create ``/spaces/<space>`` with growing ``datasets`` and the group's attributes."""
        group = self.handle.create_group(f"spaces/{space}")
        group.attrs.update(attrs)
        self._spaces[space] = {
            name: _create_growing(group, name, shape, dtype) for name, (shape, dtype) in datasets.items()
        }

    def space_group(self, space: str):
        return self.handle[f"spaces/{space}"]

    def ensure_space(self, nbytes: int) -> None:
        """Refuse to write ``nbytes`` more unless the disk has them plus a reserve for HDF5's metadata.

        HDF5 cannot recover from a full disk (h5py can crash the process when it closes such a
        file), so manifpt stops before the disk is full, with a clear error and nothing kept.
        """
        free = shutil.disk_usage(self.folder).free
        if free < nbytes + DISK_RESERVE_BYTES:
            raise NoSpaceError(
                f"no space left on the device holding {self.folder}: {free:,} bytes free, the output needs "
                f"{nbytes:,} more (plus {DISK_RESERVE_BYTES:,} in reserve); nothing was written under the final name"
            )

    def add_blob(self, space: str, name: str, data: np.ndarray) -> None:
        """Store one whole array (a search table) in ``space``'s group."""
        self.ensure_space(data.nbytes)
        self.space_group(space).create_dataset(name, data=data)

    def add_stream(self, space: str, name: str) -> Callable[[bytes], int]:
        """A (bytes,) uint8 dataset in ``space``'s group, and a function that appends to it (what
        ``faiss.PyCallbackIOWriter`` calls): a serialised FAISS index is written as it is made,
        without a second copy of it in memory."""
        dataset = self.space_group(space).create_dataset(name, (0,), maxshape=(None,), dtype="u1", chunks=(BLOB_CHUNK,))

        def append(data: bytes) -> int:
            self.ensure_space(len(data))
            _append_rows(dataset, np.frombuffer(data, dtype=np.uint8))
            return len(data)

        return append

    def append(self, paths: Sequence[str], sha256: Sequence[str], **columns) -> None:
        """Append one batch of samples: their paths, SHA-256s and every other per-sample column."""
        from .images import display_path

        shown = [display_path(os.path.abspath(p)) for p in paths]
        self.ensure_space(sum(len(p) + 64 for p in shown) + sum(np.asarray(v).nbytes for v in columns.values()))
        _append_rows(self._rows["path"], np.array(shown, dtype=object))
        _append_rows(self._rows["sha256"], np.array([s.encode() for s in sha256], dtype="S64"))
        for name, values in columns.items():
            _append_rows(self._rows[name], values)
        self.n_rows += len(paths)

    def append_space(self, space: str, **datasets) -> None:
        """Append the same batch's rows to ``space``'s datasets."""
        self.ensure_space(sum(np.asarray(v).nbytes for v in datasets.values()))
        for name, values in datasets.items():
            _append_rows(self._spaces[space][name], values)

    def fail(self, path: str, error: str, **extra: str) -> None:
        """Record a file that could not be used, with the reason."""
        from .images import display_path

        self._failures["path"].append(display_path(os.path.abspath(path)))
        self._failures["error"].append(error)
        for name, value in extra.items():
            self._failures[name].append(value)

    def finish(self, fmt: str, **attrs) -> None:
        """Write the failures and the root attributes (format, version, provenance, ``attrs``)."""
        group = self.handle.create_group("failures")
        for name, values in self._failures.items():
            group.create_dataset(name, data=values, dtype=h5_string_dtype())
        self.handle.attrs.update(format=fmt, format_version=FORMAT_VERSIONS[fmt], **provenance(), **attrs)


@contextlib.contextmanager
def sample_file(
    out: str | os.PathLike,
    rows: str,
    columns: Mapping[str, Column] = (),
    failure_columns: Sequence[str] = (),
    *,
    overwrite: bool = False,
) -> Iterator[SampleFile]:
    """A :class:`SampleFile` written atomically to ``out``: it appears only if the block succeeds."""
    import h5py

    with atomic_output(out, overwrite=overwrite) as partial, h5py.File(partial, "w") as handle:
        yield SampleFile(handle, rows, dict(columns), failure_columns)
