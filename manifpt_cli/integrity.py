"""Digests that bind what attribution uses to what was built, checked every time a file is opened.

Index (HDF5): ``index_hash`` is a SHA-256 over everything attribution reads: the image size, the
resize policy, the list of spaces, every file path and file SHA-256, and for each space its
attributes (dimension, shape, metric, FAISS factory, search method, stored layout, backbone weights), its
embeddings and its serialised FAISS index or exact-search tables (PCA mean, basis, projections,
norms). Each space also stores its own ``digest``; opening an index recomputes the digests of
the spaces it will search and the root hash, and refuses any difference. From format 6
``provenance_digest`` covers what the index says of itself but attribution does not read (the
manifpt version and time that wrote it, the files it left out, and the ``index_hash``), apart
from ``index_hash``, so that the same images and settings still give the same ``index_hash``
whenever and by whichever engine they are indexed. Links to other files,
objects manifpt did not write, and datasets that do not store every byte they declare are
refused too, before any digest is read.

ONNX model: the metadata key ``manifpt_digest`` holds a SHA-256 of the whole file with that value
zeroed, so the graph, the weights and the model card are all covered, and the check needs no ONNX
package (the lean install has none).

What this catches: corruption, truncation, careless or deliberate edits of a file by someone who
does not recompute the digest, files swapped or mixed up. What it cannot catch: someone who
rebuilds a file and its digests with their own tool. Against that, keep the digests of the
files you used (they are in every report) in your case notes, and compare with ``manifpt verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import FormatError

# backbone_input is absent from indexes made before manifpt 0.3 (absent attributes are left out).
SPACE_DIGEST_ATTRS = (
    "embedding_space",
    "dim",
    "shape",
    "metric",
    "faiss_factory",
    "weights_source",
    "weights_sha256",
    "backbone_input",
    "search",
    "search_dims",
    "layout",
)
# What a space holds: the exact-search tables (rgb with a flat index), nothing but its rows (freq
# with a flat index: its code scan is made from them) or a FAISS index.
EXACT_SEARCH = "exact-pca"
EXACT_SEARCH_DATASETS = ("embeddings", "search_mean", "search_basis", "search_projected", "search_norms")
CODED_SEARCH = "exact-codes"
CODED_SEARCH_DATASETS = ("embeddings",)
FAISS_DATASETS = ("embeddings", "faiss_index")
ROOT_DIGEST_ATTRS = ("format", "format_version", "image_size", "n_images", "spaces", "resize_policy")
PROVENANCE_DIGEST_ATTR = "provenance_digest"
PROVENANCE_DIGEST_VERSION = 6  # the first index format that has one
PROVENANCE_ATTRS = ("manifpt_version", "created_utc")
FAILURE_DATASETS = ("failures/path", "failures/error")
ROWS_PER_CHUNK = 4096  # rows of variable-length strings hashed at a time
CHUNK_BYTES = 16 * 2**20  # bytes of a numeric dataset read at a time
ONNX_DIGEST_KEY = "manifpt_digest"
ONNX_DIGEST_PLACEHOLDER = "0" * 64


class IntegrityError(FormatError):
    """A file's content does not match its recorded digest, or holds objects manifpt did not write."""


def attr_text(value) -> str:
    """An HDF5 attribute as text, however h5py returns it (str, bytes or a NumPy scalar); bytes
    that are not UTF-8 (a path's) as surrogate escapes, as Python reads such paths."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def _attr_digest_text(value) -> str:
    """An attribute as exact, typed text: arrays by dtype, shape and bytes (``str()`` of a large
    array is abbreviated and rounded, so two different arrays could read the same)."""
    if isinstance(value, np.ndarray):
        return f"array:{value.dtype.str}:{list(value.shape)}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    return f"{type(value).__name__}:{attr_text(value)}"


def _update_attrs(digest, attrs, keys) -> None:
    described = {key: _attr_digest_text(attrs[key]) for key in keys if key in attrs}
    digest.update(json.dumps(described, sort_keys=True).encode())


ChunkReader = Callable[[int, np.ndarray], None]  # (first row, rows): what else a read is for


def _update_dataset(digest, dataset, reader: ChunkReader | None = None) -> None:
    """Shape, type and every element of a dataset, read in chunks (memory stays bounded). ``reader``
    sees each chunk too, so a caller that needs the data reads the file once."""
    digest.update(json.dumps([list(dataset.shape), str(dataset.dtype)]).encode())
    if dataset.dtype.kind == "O":  # variable-length strings: length-prefixed, so no two lists collide
        for start in range(0, len(dataset), ROWS_PER_CHUNK):
            values = dataset[start : start + ROWS_PER_CHUNK]
            for value in values:
                data = value if isinstance(value, bytes) else str(value).encode()
                digest.update(len(data).to_bytes(8, "little") + data)
            if reader is not None:
                reader(start, values)
        return
    # By bytes, not rows: a serialised FAISS index is one long row of bytes. The digest is the same
    # whatever the chunking (the bytes are hashed in order).
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64)))
    rows = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, len(dataset), rows):
        chunk = np.ascontiguousarray(dataset[start : start + rows])
        digest.update(chunk)  # its bytes, through the buffer protocol: no copy
        if reader is not None:
            reader(start, chunk)


def space_datasets(attrs) -> tuple[str, ...]:
    """The datasets a space group holds, by its ``search`` attribute."""
    search = attr_text(attrs.get("search", ""))
    return {EXACT_SEARCH: EXACT_SEARCH_DATASETS, CODED_SEARCH: CODED_SEARCH_DATASETS}.get(search, FAISS_DATASETS)


def space_digest(group, readers: dict[str, ChunkReader] | None = None, attrs: Mapping | None = None) -> str:
    """SHA-256 over one space's attributes (``attrs``, default: the group's), embeddings and search
    data (FAISS index or exact-search tables); ``readers`` by dataset name (:func:`_update_dataset`)."""
    attrs = group.attrs if attrs is None else attrs
    digest = hashlib.sha256(b"manifpt-space")
    _update_attrs(digest, attrs, SPACE_DIGEST_ATTRS)
    for name in space_datasets(attrs):
        _update_dataset(digest, group[name], (readers or {}).get(name))
    return digest.hexdigest()


def index_digest(
    handle, space_digests: dict[str, str], readers: dict[str, ChunkReader] | None = None, attrs: Mapping | None = None
) -> str:
    """The root ``index_hash``: the index's attributes (``attrs``, default: the file's) and file
    list, then each space's digest (``readers`` by dataset name: :func:`_update_dataset`)."""
    attrs = handle.attrs if attrs is None else attrs
    digest = hashlib.sha256(b"manifpt-index")
    _update_attrs(digest, attrs, ROOT_DIGEST_ATTRS)
    for name in ("files/path", "files/sha256"):
        _update_dataset(digest, handle[name], (readers or {}).get(name))
    for space in json.loads(attr_text(attrs["spaces"])):
        digest.update(space.encode() + space_digests[space].encode())
    return digest.hexdigest()


def has_provenance_digest(attrs: Mapping) -> bool:
    """Whether an index of this format version has a ``provenance_digest`` (format 6 and later)."""
    return int(attrs["format_version"]) >= PROVENANCE_DIGEST_VERSION


def provenance_digest(
    handle, index_hash: str, attrs: Mapping | None = None, readers: dict[str, ChunkReader] | None = None
) -> str:
    """SHA-256 over an index's ``index_hash``, its provenance attributes (``attrs``, default: the
    file's) and its failures list (``readers`` by dataset name: :func:`_update_dataset`):
    ``index info``'s account of who wrote it, when, and what it left out."""
    attrs = handle.attrs if attrs is None else attrs
    digest = hashlib.sha256(b"manifpt-index-provenance" + index_hash.encode())
    _update_attrs(digest, attrs, PROVENANCE_ATTRS)
    for name in FAILURE_DATASETS:
        _update_dataset(digest, handle[name], (readers or {}).get(name))
    return digest.hexdigest()


EXPECTED_INDEX_OBJECTS = {
    "files",
    "files/path",
    "files/sha256",
    "failures",
    "failures/path",
    "failures/error",
    "spaces",
}


def check_stored(handle, datasets, path: str) -> None:
    """Refuse datasets of the open file ``handle`` that are not stored in full inside it, as
    manifpt writes every dataset: uncompressed, every byte written, nothing kept elsewhere.

    Unwritten chunks read as zeros and external storage can name any file (``/dev/zero``, a FIFO),
    so a damaged or crafted header could otherwise declare terabytes, and their digest would read
    for hours; a chunk index can list one chunk many times, hence the bound on the whole file too.
    With this check no read or allocation from a header exceeds the file.
    """
    declared = 0
    for dataset in datasets:
        layout = dataset.id.get_create_plist()
        if dataset.is_virtual or layout.get_external_count():
            raise IntegrityError(
                f"{path}: {dataset.name} keeps its data outside this file (virtual or external storage); "
                "manifpt writes no such dataset, so the file was altered"
            )
        if layout.get_nfilters():
            raise IntegrityError(f"{path}: {dataset.name} is compressed or filtered; manifpt writes no such dataset")
        stored = dataset.id.get_storage_size()
        if stored < dataset.nbytes:
            raise IntegrityError(
                f"{path}: {dataset.name} declares {dataset.nbytes:,} bytes but the file stores {stored:,} of them; "
                "it was damaged or altered"
            )
        declared += dataset.nbytes
    if declared > handle.id.get_filesize():
        raise IntegrityError(
            f"{path}: its datasets declare {declared:,} bytes, more than the file's {handle.id.get_filesize():,}; "
            "it was damaged or altered"
        )


@dataclass(frozen=True)
class IndexAttributes:
    """An index's attributes, the root's and each space's, read once as it opens. The digests are
    computed over these and the index uses them from then on, so an attribute changed in the file
    afterwards reaches neither."""

    root: dict
    spaces: dict[str, dict]

    @classmethod
    def read(cls, handle) -> IndexAttributes:
        import h5py

        root = dict(handle.attrs)
        spaces = {}
        for name in json.loads(attr_text(root["spaces"])):
            where = f"spaces/{name}"  # read only through hard links to groups: check_structure refuses the rest
            if all(isinstance(handle.get(p, getlink=True), h5py.HardLink) for p in ("spaces", where)):
                if isinstance(handle[where], h5py.Group):
                    spaces[name] = dict(handle[where].attrs)
        return cls(root, spaces)


def check_structure(handle, path: str, attributes: IndexAttributes) -> None:
    """Refuse links (to other files or elsewhere in this one), objects manifpt does not write, and
    datasets that do not store what they declare (:func:`check_stored`)."""
    import h5py

    expected = set(EXPECTED_INDEX_OBJECTS)
    for space in json.loads(attr_text(attributes.root["spaces"])):
        expected.add(f"spaces/{space}")
        if space in attributes.spaces:
            expected.update(f"spaces/{space}/{name}" for name in space_datasets(attributes.spaces[space]))
    links: list[tuple[str, object]] = []
    handle.visititems_links(lambda name, link: links.append((name, link)))  # raising inside h5py's walk is unsafe
    for name, link in links:
        if not isinstance(link, h5py.HardLink):
            raise IntegrityError(
                f"index {path} holds a {type(link).__name__} at /{name}; manifpt writes no links, so the file "
                "was altered (it may point at data elsewhere). Rebuild it with `manifpt index build`"
            )
    found = [name for name, _ in links]
    for name in found:
        is_group = name in ("files", "failures", "spaces") or name.count("/") == 1 and name.startswith("spaces/")
        if isinstance(handle[name], h5py.Group) != is_group:
            raise IntegrityError(f"index {path}: /{name} is not the kind of object manifpt writes there")
    unexpected = sorted(set(found) - expected)
    missing = sorted(expected - set(found))
    if unexpected or missing:
        detail = "; ".join(
            part
            for part in (
                f"unexpected: {', '.join('/' + n for n in unexpected)}" if unexpected else "",
                f"missing: {', '.join('/' + n for n in missing)}" if missing else "",
            )
            if part
        )
        raise IntegrityError(f"index {path} is not laid out as manifpt writes it ({detail}); it was altered or damaged")
    check_stored(handle, [handle[name] for name in found if isinstance(handle[name], h5py.Dataset)], f"index {path}")


def verify_index(
    handle,
    path: str,
    spaces_to_check: list[str],
    readers: Callable[[str, object], dict[str, ChunkReader]] | None = None,
    file_readers: Callable[[object], dict[str, ChunkReader]] | None = None,
    attributes: IndexAttributes | None = None,
) -> dict:
    """Recompute the digests of ``spaces_to_check`` and the root hash; raise IntegrityError on any difference.

    ``readers(space, group)``, asked once the structure has passed, gives the readers (by dataset)
    that see every chunk its digest reads (:func:`_update_dataset`), and ``file_readers(handle)``
    those of the file list (``files/sha256``) and the failures list; what they keep is trustworthy only once this returns.
    The digests cover ``attributes`` (default: read now), which the caller can then rely on.
    Returns what was checked, for the report header (``provenance``: "ok", or not covered by
    an index older than format 6).
    """
    attributes = attributes or IndexAttributes.read(handle)
    spaces = json.loads(attr_text(attributes.root["spaces"]))
    check_structure(handle, path, attributes)
    digests = {}
    for space in spaces:
        group, attrs = handle[f"spaces/{space}"], attributes.spaces[space]
        stored = attr_text(attrs.get("digest", ""))
        if space in spaces_to_check:
            recomputed = space_digest(group, readers(space, group) if readers else None, attrs)
            if recomputed != stored:
                raise IntegrityError(
                    f"index {path}: the {space} space's embeddings, FAISS index or settings do not match its recorded "
                    "digest; the file was edited or damaged. Rebuild it with `manifpt index build`"
                )
        digests[space] = stored
    file_list = file_readers(handle) if file_readers else None
    root = index_digest(handle, digests, file_list, attributes.root)
    if root != attr_text(attributes.root["index_hash"]):
        raise IntegrityError(
            f"index {path} does not match its index_hash (its file list, image size, spaces or a space digest were "
            "changed); the file was edited or damaged. Rebuild it with `manifpt index build`"
        )
    provenance = f"not covered (index format {attr_text(attributes.root['format_version'])})"
    if has_provenance_digest(attributes.root):
        if provenance_digest(handle, root, attributes.root, file_list) != attr_text(
            attributes.root.get(PROVENANCE_DIGEST_ATTR, "")
        ):
            raise IntegrityError(
                f"index {path}: its manifpt_version, created_utc or failures list do not match its provenance_digest; "
                "the file was edited or damaged. Rebuild it with `manifpt index build`"
            )
        provenance = "ok"
    return {"index_hash": root, "verified_spaces": sorted(spaces_to_check), "structure": "ok", "provenance": provenance}


# --- checkpoints and artifacts files -------------------------------------------------------------


def state_dict_sha256(state) -> str:
    """SHA-256 over sorted parameter names and their bytes: identity of weights, not of files."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        header = json.dumps([key, str(tensor.dtype), list(tensor.shape)])  # same bytes, other type: other digest
        digest.update(len(header).to_bytes(8, "little") + header.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def checkpoint_digest(state, metadata: dict) -> str:
    """SHA-256 of a checkpoint's weights and of its metadata (all but the ``digest`` entry itself)."""
    described = json.dumps({k: v for k, v in metadata.items() if k != "digest"}, sort_keys=True)
    return hashlib.sha256(f"{state_dict_sha256(state)}:{described}".encode()).hexdigest()


def verify_checkpoint(state, metadata: dict, path: str) -> None:
    if metadata.get("digest") != checkpoint_digest(state, metadata):
        raise IntegrityError(f"{path} does not match its recorded digest: its weights or metadata changed after saving")


ARTIFACTS_DIGEST_ATTR = "content_sha256"


def hdf5_digest(handle, skip_attr: str = ARTIFACTS_DIGEST_ATTR) -> str:
    """SHA-256 over every dataset (in name order) and every attribute of an HDF5 file but ``skip_attr``.

    Links are refused, so the digest always describes data inside this file.
    """
    import h5py

    links: list[tuple[str, object]] = []
    handle.visititems_links(lambda name, link: links.append((name, link)))
    for name, link in links:
        if not isinstance(link, h5py.HardLink):
            raise IntegrityError(f"{handle.filename} holds a {type(link).__name__} at /{name}; manifpt writes no links")
    names = sorted(name for name, _ in links)
    check_stored(handle, [handle[name] for name in names if isinstance(handle[name], h5py.Dataset)], handle.filename)
    digest = hashlib.sha256(b"manifpt-hdf5")
    for name in names:
        obj = handle[name]
        digest.update(name.encode() + b"\0")
        _update_attrs(digest, obj.attrs, sorted(obj.attrs))
        if isinstance(obj, h5py.Dataset):
            _update_dataset(digest, obj)
    _update_attrs(digest, handle.attrs, sorted(key for key in handle.attrs if key != skip_attr))
    return digest.hexdigest()


# --- ONNX models -------------------------------------------------------------------------------


def onnx_digest(data: bytes, stored: str) -> str:
    """SHA-256 of an ONNX file's bytes with its stored digest value zeroed (it appears exactly once)."""
    marker = stored.encode()
    if data.count(marker) != 1:
        raise IntegrityError("the model's digest entry is missing or ambiguous")
    return hashlib.sha256(data.replace(marker, ONNX_DIGEST_PLACEHOLDER.encode())).hexdigest()


def seal_onnx(path: str | os.PathLike) -> str:
    """Replace the placeholder digest written into ``path``'s metadata by the file's real digest."""
    with open(path, "rb") as handle:
        data = handle.read()
    digest = onnx_digest(data, ONNX_DIGEST_PLACEHOLDER)
    with open(path, "wb") as handle:
        handle.write(data.replace(ONNX_DIGEST_PLACEHOLDER.encode(), digest.encode()))
    return digest


# How protobuf stores the entry: the key, then field 2 (tag 0x12) of length 64 (0x40), the hex digest.
_STORED_DIGEST = re.compile(rb"manifpt_digest\x12\x40([0-9a-f]{64})")


def verify_onnx(path: str | os.PathLike, data: bytes) -> str:
    """Check an ONNX file's bytes against the ``manifpt_digest`` they carry, before anything parses
    them; returns the digest."""
    found = _STORED_DIGEST.findall(data)
    if len(found) != 1:
        raise IntegrityError(
            f"{path} carries no manifpt digest (or a damaged one): it was not written by this version of "
            "`manifpt export`, or it was altered"
        )
    stored = found[0].decode()
    try:
        actual = onnx_digest(data, stored)
    except IntegrityError:  # the value is found once as the entry, so it appears again elsewhere
        raise IntegrityError(f"{path} carries its digest's value more than once: it was altered after export") from None
    if actual != stored:
        raise IntegrityError(
            f"{path} does not match its recorded digest: its graph, weights or model card were changed after export"
        )
    return stored


# ModelProto, GraphProto, NodeProto and AttributeProto field numbers (onnx/onnx.proto3).
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE = 1
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 4, 5, 7
ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS, ATTRIBUTE_TYPE = 6, 11, 20
GRAPH_ATTRIBUTE_TYPES = (5, 10)  # AttributeProto.GRAPH, GRAPHS
STANDARD_DOMAINS = ("", "ai.onnx")


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def _protobuf_fields(data: memoryview):
    """(field number, value) of each field of a serialised protobuf message: varints as ints,
    length-delimited fields as memoryviews of their bytes (no copy); fixed-width ones skipped."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("a field runs past the end of its message")
            value, position = data[position : position + length], position + length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
            continue
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def _delimited(value) -> memoryview:
    """A field that must be a sub-message or a string (wire type 2), as the schema says."""
    if not isinstance(value, memoryview):
        raise ValueError("a message or string field of another wire type")
    return value


def check_plain_graph(path: str | os.PathLike, data: bytes) -> None:
    """Refuse an ONNX model that is not a plain graph of standard operators, as ``manifpt export``
    writes: no subgraphs (If, Loop, Scan bodies), no model-local functions, no custom domains.

    The digest stops edits, not a forger who seals their own file; a Loop of 10¹² turns runs
    inside ONNX Runtime, where neither Ctrl-C nor SIGTERM reaches it. Read from the bytes, before
    ONNX Runtime parses them (the lean install has no ``onnx`` package).
    """

    def refuse(what: str) -> None:
        raise IntegrityError(
            f"{path} holds {what}; `manifpt export` writes plain graphs of standard ONNX operators, so this "
            "model was not made by it"
        )

    try:
        for number, model_field in _protobuf_fields(memoryview(data)):
            if number == MODEL_FUNCTIONS:
                refuse("model-local functions")
            if number != MODEL_GRAPH:
                continue
            for graph_number, node in _protobuf_fields(_delimited(model_field)):
                if graph_number != GRAPH_NODE:
                    continue
                op_type, domain, attributes = "", "", []
                for node_number, value in _protobuf_fields(_delimited(node)):
                    if node_number == NODE_OP_TYPE:
                        op_type = bytes(_delimited(value)).decode(errors="replace")
                    elif node_number == NODE_DOMAIN:
                        domain = bytes(_delimited(value)).decode(errors="replace")
                    elif node_number == NODE_ATTRIBUTE:
                        attributes.append(_delimited(value))
                if domain not in STANDARD_DOMAINS:
                    refuse(f"an operator of the custom domain {domain!r} ({op_type})")
                for attribute in attributes:
                    for attribute_number, value in _protobuf_fields(attribute):
                        graph_typed = attribute_number == ATTRIBUTE_TYPE and value in GRAPH_ATTRIBUTE_TYPES
                        if attribute_number in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS) or graph_typed:
                            refuse(f"a subgraph (in a {op_type} node)")
    except ValueError as exc:
        raise FormatError(f"{path} is not a readable ONNX model: {exc}") from None
