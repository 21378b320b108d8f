"""Rows of a large index dataset read from the file when a search needs them, not held in memory.

An index's embeddings are chunked by whole rows and not compressed (:mod:`manifpt_cli.formats`), so
each HDF5 chunk is a run of rows in C order at some byte offset of the file. With the chunks'
offsets, any row is one read at a known offset. The exact search of a million 32×32 images needs
its candidates' rows, a few thousand per batch, not the 3 GB (rgb) or 6 GB (freq) of all of them.
Reads go through the operating system's page cache, which keeps hot rows and gives memory back
under pressure; the process holds only the offsets (a memory map would count every page it had
touched as the process's own memory).
"""

from __future__ import annotations

import os

import numpy as np

from .integrity import IntegrityError

HELD_ROWS_BYTES = 1 << 30  # a space's rows up to this size are read once and held; larger ones stay in the file


class FileRows:
    """The rows of an uncompressed, row-chunked (or contiguous) HDF5 dataset of an open file:
    ``rows[ids]`` and ``rows[a:b]`` return (m, …) arrays as NumPy's indexing would."""

    def __init__(self, path: str | os.PathLike, dataset) -> None:
        self.shape, self.dtype = dataset.shape, dataset.dtype
        self.row_bytes = int(self.dtype.itemsize * np.prod(self.shape[1:], dtype=np.int64))
        self._dataset = dataset  # contiguous slices: HDF5's own read
        if dataset.id.get_create_plist().get_nfilters():
            raise ValueError(f"{dataset.name} is filtered (compressed): its rows cannot be read one by one")
        contiguous = dataset.id.get_offset()
        if contiguous is None and dataset.chunks is None:
            raise ValueError(f"{dataset.name} was never written")
        if contiguous is not None:
            self.rows_per_chunk = max(1, self.shape[0])
            self.chunk_offsets = np.array([contiguous], dtype=np.int64)
        else:
            self.rows_per_chunk = dataset.chunks[0]
            if dataset.chunks[1:] != self.shape[1:]:
                raise ValueError(f"{dataset.name} is not chunked by whole rows")
            self.chunk_offsets = np.full(-(-self.shape[0] // self.rows_per_chunk), -1, dtype=np.int64)
            chunks = []
            # One pass over the chunk index (get_chunk_info(i) walks it anew for every i: 2 s at 1M rows).
            dataset.id.chunk_iter(lambda info: chunks.append((info.chunk_offset[0], info.byte_offset, info.size)))
            for first_row, byte_offset, size in chunks:
                if size != self.rows_per_chunk * self.row_bytes:
                    raise ValueError(f"{dataset.name} has a chunk of {size} bytes, not whole rows")
                self.chunk_offsets[first_row // self.rows_per_chunk] = byte_offset
            if (self.chunk_offsets < 0).any():
                raise ValueError(f"{dataset.name} has chunks that were never written")
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the index (close())

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory this holds (the offsets; the rows are in the file and the page cache)."""
        return self.chunk_offsets.nbytes

    def close(self) -> None:
        self._file.close()

    def __getitem__(self, ids) -> np.ndarray:
        if isinstance(ids, slice):
            return self._dataset[ids]
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids out of range 0..{len(self) - 1}")
        starts = self.chunk_offsets[ids // self.rows_per_chunk] + (ids % self.rows_per_chunk) * self.row_bytes
        out = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
        descriptor = self._file.fileno()
        for row, start in zip(out, starts.tolist()):  # positioned reads: two searching threads need no lock
            if os.preadv(descriptor, [row], start) != self.row_bytes:
                raise IntegrityError(
                    f"{self._file.name} changed after it was opened and verified (it ends before byte "
                    f"{start + self.row_bytes}); open it again"
                )
        return out.view(self.dtype).reshape(len(ids), *self.shape[1:])
