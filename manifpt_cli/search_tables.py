"""A space's search tables, kept from the one read of the file that verifies them.

Opening an index recomputes the digests of the spaces it will search, which reads every byte of
them; building the search then needed much of the same data again. Here the verification's
chunks (:data:`integrity.ChunkReader`) fill the tables as they pass, so the bytes searched are
the bytes verified. They are trustworthy only once the verification has passed, and
:class:`RealIndex` uses them only then. Rows above ``file_rows.HELD_ROWS_BYTES`` stay in the
file (:class:`FileRows`); only their exact norms (rgb) are kept. The tables are allocated from
the datasets' shapes, which the verification has by then checked against what the file stores
(:func:`integrity.check_stored`): no damaged header makes them larger than the file.
"""

from __future__ import annotations

import numpy as np

from . import file_rows
from .integrity import CODED_SEARCH, EXACT_SEARCH, FAILURE_DATASETS, ChunkReader, attr_text
from .pixel_products import pixel_squares

TABLES = {  # by the space's ``search``: the datasets its search reads whole, and their shapes
    EXACT_SEARCH: {
        "embeddings": ("n", "d"),
        "search_mean": ("d",),
        "search_basis": ("k", "d"),
        "search_projected": ("n", "k"),
        "search_norms": ("n",),
    },
    CODED_SEARCH: {"embeddings": ("n", "d")},
}
FAISS_TABLES = {"embeddings": ("n", "d"), "faiss_index": ("bytes",)}  # FAISS spaces (no ``search``)


def _text(value) -> str:
    """A variable-length string as h5py's ``asstr`` reads it."""
    return value.decode() if isinstance(value, bytes) else str(value)


class KeptDataset:
    """A whole dataset, filled chunk by chunk at the rows each chunk starts at."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.array = np.empty(shape, dtype)
        self.filled = 0

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        self.array[start : start + len(chunk)] = chunk
        self.filled += len(chunk)

    @property
    def complete(self) -> bool:
        return self.filled == len(self.array)


class _SquaredNorms(KeptDataset):
    """‖r‖² of uint8 pixel rows (int64, exact: :class:`search.ExactSearch`), chunk by chunk."""

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        super().__call__(start, pixel_squares(chunk.reshape(len(chunk), -1)))


class _Both:
    def __init__(self, *readers: ChunkReader) -> None:
        self.readers = readers

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        for reader in self.readers:
            reader(start, chunk)


class SearchTables:
    """What one space's verification keeps for its search: :attr:`readers` to pass to it, then
    :meth:`take` for each table and :meth:`squared_norms` for rgb's rows."""

    def __init__(self, group) -> None:
        import h5py

        search = attr_text(group.attrs.get("search", ""))
        self._kept: dict[str, KeptDataset] = {}
        self._norms: _SquaredNorms | None = None
        self.readers: dict[str, ChunkReader] = {}
        shapes = TABLES.get(search, FAISS_TABLES)
        datasets = {name: group.get(name) for name in shapes}
        if not shapes or not all(isinstance(d, h5py.Dataset) and d.dtype.kind in "uif" for d in datasets.values()):
            return  # nothing to keep, or not as manifpt writes it: the verification says which
        sizes: dict[str, int] = {}
        for name, letters in shapes.items():  # the shapes must agree with each other
            if len(datasets[name].shape) != len(letters):
                return
            for letter, size in zip(letters, datasets[name].shape):
                if sizes.setdefault(letter, size) != size:
                    return
        rows = datasets.pop("embeddings")
        held = rows.size * rows.dtype.itemsize <= file_rows.HELD_ROWS_BYTES
        if shapes is FAISS_TABLES and attr_text(group.attrs.get("faiss_factory", "")) == "Flat":
            held = False  # a flat FAISS index holds the rows itself: they come from its verified bytes
        for name, dataset in datasets.items():
            if name == "faiss_index" and dataset.size > file_rows.HELD_ROWS_BYTES:
                continue  # read again from the file, a block at a time, as rows above the limit are
            self._kept[name] = self.readers[name] = KeptDataset(dataset.shape, dataset.dtype)
        readers: list[ChunkReader] = []
        if held:
            self._kept["embeddings"] = KeptDataset(rows.shape, rows.dtype)
            readers.append(self._kept["embeddings"])
        if search == EXACT_SEARCH and rows.dtype == np.uint8:
            self._norms = _SquaredNorms((len(rows),), np.dtype(np.int64))
            readers.append(self._norms)
        if readers:
            self.readers["embeddings"] = readers[0] if len(readers) == 1 else _Both(*readers)

    def take(self, name: str) -> np.ndarray | None:
        """The dataset ``name`` as verified (handed over once: the index holds it from then on), or None."""
        kept = self._kept.pop(name, None)
        return kept.array if kept is not None and kept.complete else None

    def squared_norms(self, n: int) -> np.ndarray | None:
        """‖r‖² of the n rows, or None where they were not all read."""
        norms = self._norms
        return norms.array if norms is not None and norms.complete and len(norms.array) == n else None


class VerifiedTables:
    """What one open of an index keeps from its verification (``verify_index``'s readers): the
    :class:`SearchTables` of each space in ``searching``, the file list's SHA-256, where a
    space is searched its paths (reports name the nearest real image by them), and the failures
    list where a provenance digest covers it (``index info --failures``)."""

    def __init__(self, searching) -> None:
        self._searching = set(searching)
        self.spaces: dict[str, SearchTables] = {}
        self._sha256: KeptDataset | None = None
        self._paths: KeptDataset | None = None
        self._failures: dict[str, KeptDataset] = {}

    def space_readers(self, name: str, group) -> dict[str, ChunkReader]:
        if name not in self._searching:
            return {}
        self.spaces[name] = SearchTables(group)
        return self.spaces[name].readers

    def file_list_readers(self, handle) -> dict[str, ChunkReader]:
        import h5py

        shas = handle["files/sha256"]  # a 1-d column of fixed-size strings, as manifpt writes it
        if not (isinstance(shas, h5py.Dataset) and shas.ndim == 1 and shas.dtype.kind == "S"):
            return {}
        self._sha256 = KeptDataset(shas.shape, shas.dtype)
        readers = {"files/sha256": self._sha256}
        paths = handle["files/path"]
        if self._searching and isinstance(paths, h5py.Dataset) and paths.ndim == 1 and paths.dtype.kind == "O":
            self._paths = readers["files/path"] = KeptDataset(paths.shape, np.dtype(object))
        for name in FAILURE_DATASETS:
            column = handle[name]
            if isinstance(column, h5py.Dataset) and column.ndim == 1 and column.dtype.kind == "O":
                self._failures[name] = readers[name] = KeptDataset(column.shape, np.dtype(object))
        return readers

    @property
    def failures(self) -> list[tuple[str, str]] | None:
        """(path, reason) of each file the build left out, as verified, or None where not read whole."""
        columns = [self._failures.get(name) for name in FAILURE_DATASETS]
        if any(kept is None or not kept.complete for kept in columns) or len(columns[0].array) != len(columns[1].array):
            return None
        return list(zip(*(map(_text, kept.array) for kept in columns)))

    @property
    def paths(self) -> list[str] | None:
        """The file list's paths as verified (UTF-8, as h5py's ``asstr`` reads them), or None."""
        kept = self._paths
        if kept is None or not kept.complete:
            return None
        return [_text(value) for value in kept.array]

    @property
    def sha256(self) -> np.ndarray | None:
        """The file list's SHA-256 as verified, or None where it was not kept."""
        return self._sha256.array if self._sha256 is not None and self._sha256.complete else None
