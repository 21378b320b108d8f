"""Rows of a large index dataset read from the file when a search needs them, not held in memory.

An index's embeddings are chunked by whole rows and not compressed (:mod:`manifpt_cli.formats`), so
each HDF5 chunk is a run of rows in C order at some byte offset of the file. A read-only memory map
of the file and the chunks' offsets give any rows for the pages they touch. Those pages belong to
the operating system's page cache, which gives them back under memory pressure; the process holds
only the offsets. The exact search of a million 32×32 images needs its candidates' rows, a few
thousand per batch, not the 3 GB (rgb) or 6 GB (freq) of all of them.
"""

from __future__ import annotations

import os

import numpy as np

HELD_ROWS_BYTES = 1 << 30  # a space's rows up to this size are read once and held; larger ones stay in the file


class MappedRows:
    """The rows of an uncompressed, row-chunked (or contiguous) HDF5 dataset, gathered from a
    memory map of its file: ``rows[ids]`` and ``rows[a:b]`` return (m, …) arrays like NumPy's."""

    def __init__(self, path: str | os.PathLike, dataset) -> None:
        self.shape, self.dtype = dataset.shape, dataset.dtype
        self.row_bytes = int(self.dtype.itemsize * np.prod(self.shape[1:], dtype=np.int64))
        contiguous = dataset.id.get_offset()
        if contiguous is not None:
            self.rows_per_chunk = max(1, self.shape[0])
            self.chunk_offsets = np.array([contiguous], dtype=np.int64)
        else:
            self.rows_per_chunk = dataset.chunks[0]
            if dataset.chunks[1:] != self.shape[1:]:
                raise ValueError(f"{dataset.name} is not chunked by whole rows")
            self.chunk_offsets = np.full(-(-self.shape[0] // self.rows_per_chunk), -1, dtype=np.int64)
            for i in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(i)
                if info.filter_mask != 0 or info.size != self.rows_per_chunk * self.row_bytes:
                    raise ValueError(f"{dataset.name} is filtered (compressed): its rows cannot be mapped")
                self.chunk_offsets[info.chunk_offset[0] // self.rows_per_chunk] = info.byte_offset
            if (self.chunk_offsets < 0).any():
                raise ValueError(f"{dataset.name} has chunks that were never written")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if self.shape[0] else None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by this process (the offsets; the rows are in the page cache)."""
        return self.chunk_offsets.nbytes

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.arange(len(self))[ids] if isinstance(ids, slice) else np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids out of range 0..{len(self) - 1}")
        starts = self.chunk_offsets[ids // self.rows_per_chunk] + (ids % self.rows_per_chunk) * self.row_bytes
        out = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
        for i, start in enumerate(starts.tolist()):
            out[i] = self._map[start : start + self.row_bytes]
        return out.view(self.dtype).reshape(len(ids), *self.shape[1:])
