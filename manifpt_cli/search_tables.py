"""A space's search tables, kept from the one read of the file that verifies them.

Opening an index recomputes the digests of the spaces it will search, which reads every byte of
them; building the search then needed much of the same data again. At 1,000,000 rgb rows that
second read was the 3 GB of pixels (for their exact norms) and the 1 GB of projections. Here the
verification's chunks (:data:`integrity.ChunkReader`) fill the tables as they pass. They are
trustworthy only once the verification has passed, and :class:`RealIndex` uses them only then.
"""

from __future__ import annotations

import numpy as np

from .file_rows import HELD_ROWS_BYTES
from .integrity import CODED_SEARCH, EXACT_SEARCH, ChunkReader

# Kept whole up to HELD_ROWS_BYTES each (a damaged file's shapes cost no more than that before its
# digest fails); larger ones are read again, or, for rows, gathered from the file (FileRows).
KEPT_DATASETS = {
    EXACT_SEARCH: ("embeddings", "search_mean", "search_basis", "search_projected", "search_norms"),
    CODED_SEARCH: ("embeddings",),
}


class _Kept:
    """A whole dataset, filled chunk by chunk."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.array = np.empty(shape, dtype)

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        self.array[start : start + len(chunk)] = chunk


class _SquaredNorms:
    """‖r‖² of uint8 pixel rows (int64, exact: :class:`search.ExactSearch`), chunk by chunk."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def __call__(self, start: int, chunk: np.ndarray) -> None:
        flat = chunk.reshape(len(chunk), -1)
        self.parts.append(np.einsum("ij,ij->i", flat, flat, dtype=np.int64))


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

        search = group.attrs.get("search", "")
        search = search.decode() if isinstance(search, bytes) else str(search)
        self._kept: dict[str, _Kept] = {}
        self._norms: _SquaredNorms | None = None
        self.readers: dict[str, ChunkReader] = {}
        for name in KEPT_DATASETS.get(search, ()):
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "uif" or not dataset.shape:
                continue  # the verification refuses what is missing or odd
            if dataset.size * dataset.dtype.itemsize <= HELD_ROWS_BYTES:
                self._kept[name] = self.readers[name] = _Kept(dataset.shape, dataset.dtype)
        rows = group.get("embeddings")
        if search == EXACT_SEARCH and isinstance(rows, h5py.Dataset) and rows.dtype == np.uint8:
            self._norms = _SquaredNorms()
            kept = self.readers.get("embeddings")
            self.readers["embeddings"] = self._norms if kept is None else _Both(kept, self._norms)

    def take(self, name: str) -> np.ndarray | None:
        """The dataset ``name`` as verified (handed over once: the index holds it from then on), or None."""
        kept = self._kept.pop(name, None)
        return None if kept is None else kept.array

    def squared_norms(self, n: int) -> np.ndarray | None:
        """‖r‖² of the n rows, or None where they were not all read."""
        if self._norms is None:
            return None
        norms = np.concatenate(self._norms.parts) if self._norms.parts else np.zeros(0, dtype=np.int64)
        return norms if len(norms) == n else None
