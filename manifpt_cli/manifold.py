"""Stage 3: the real-data manifold — an HDF5 file of real-image embeddings with a FAISS index per space.

Layout (README, "File formats"):

    /                      attrs: format, format_version, manifpt_version, created_utc, image_size,
                                  n_images, spaces (JSON), index_hash, resize_policy
    /files/path            (n,) UTF-8 strings — source paths as given, non-UTF-8 bytes escaped
    /files/sha256          (n,) ASCII hex SHA-256 of each source file
    /failures/path, /failures/error   files that could not be decoded (not in the index)
    /spaces/<space>/embeddings   (n, d) float32
    /spaces/<space>/faiss_index  (bytes,) uint8 — faiss.serialize_index
    /spaces/<space>        attrs: embedding_space, dim, shape (JSON), metric, faiss_factory,
                                  weights_source, weights_sha256

The nearest real image of x is argmin ||φ(x) − φ(r)||² (k = 1). An image is never its own
neighbour: index entries whose file SHA-256 equals the query's are skipped (leave-one-out).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .formats import INDEX_FORMAT, METRIC, RESIZE_POLICY, check_format, sample_file
from .images import FailedImage, count_images, decode_folder, display_path, split_batch
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import Embedder, Space, make_embedder


@dataclass
class IndexBuildResult:
    """What :func:`build_index` wrote."""

    path: str
    n_images: int
    spaces: list[Space]
    index_hash: str
    failures: list[FailedImage] = field(default_factory=list)
    seconds: float = 0.0


def build_faiss_index(embeddings: np.ndarray, factory: str):
    """A FAISS index over ``embeddings`` (n, d) from an index-factory string, trained if it needs it."""
    import faiss

    try:
        index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index


def build_index(
    roots: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    spaces: Sequence[Space],
    *,
    size: int = 32,
    faiss_factory: str = "Flat",
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
) -> IndexBuildResult:
    """Embed every real image under ``roots`` in each space and write the index to ``out``.

    Files that cannot be decoded are listed in ``/failures`` and in the result, never fatal.

    Raises:
        UsageError: no decodable image was found, or a bad argument.
        WeightsNotFoundError: sl/ssl weights are missing.
    """
    import faiss

    started = time.perf_counter()
    weights = weights or {}
    embedders: dict[Space, Embedder] = {s: make_embedder(s, weights.get(s), settings.device) for s in spaces}
    total = count_images(roots)
    if total == 0:
        raise UsageError(f"no image files found under: {', '.join(display_path(r) for r in roots)}")

    failures: list[FailedImage] = []
    file_digest = hashlib.sha256()
    space_digests = {space: hashlib.sha256() for space in spaces}
    progress = settings.progress
    with sample_file(out, "files") as writer:
        for space, embedder in embedders.items():
            shape = space.artifact_shape(size)
            dim = int(np.prod(shape))
            backbone = getattr(embedder, "weights", None)
            extra = {"weights_source": backbone.source, "weights_sha256": backbone.sha256} if backbone else {}
            writer.add_space(
                space.value,
                {"embeddings": ((dim,), "f4")},
                embedding_space=space.value,
                dim=dim,
                shape=json.dumps(shape),
                metric=METRIC,
                faiss_factory=faiss_factory,
                **extra,
            )

        progress.start("Embedding real images", total)
        for batch in decode_folder(roots, size, settings):
            decoded, failed = split_batch(batch)
            failures.extend(failed)
            for item in failed:
                writer.fail(item.path, item.error)
            if decoded:
                pixels = np.stack([item.pixels for item in decoded])
                shas = [item.sha256 for item in decoded]
                writer.append([item.path for item in decoded], shas)
                for sha in shas:
                    file_digest.update(sha.encode())
                for space, embedder in embedders.items():
                    vectors = np.ascontiguousarray(embedder(pixels), dtype=np.float32)
                    writer.append_space(space.value, embeddings=vectors)
                    space_digests[space].update(vectors.tobytes())
            progress.advance(len(batch))
        if writer.n_rows == 0:
            raise UsageError(f"none of the {total} files under the real folders could be decoded (see the errors)")

        progress.start("Building FAISS indexes", len(spaces))
        for space in spaces:
            group = writer.space_group(space.value)
            index = build_faiss_index(group["embeddings"][...], faiss_factory)
            group.create_dataset("faiss_index", data=faiss.serialize_index(index))
            progress.advance(1)

        index_hash = hashlib.sha256(f"{INDEX_FORMAT}:{size}".encode() + file_digest.digest())
        for space in spaces:
            index_hash.update(space.value.encode() + space_digests[space].digest())
        writer.finish(
            INDEX_FORMAT,
            image_size=size,
            n_images=writer.n_rows,
            spaces=json.dumps([s.value for s in spaces]),
            index_hash=index_hash.hexdigest(),
            resize_policy=RESIZE_POLICY,
        )
    return IndexBuildResult(
        os.fspath(out), writer.n_rows, list(spaces), index_hash.hexdigest(), failures, time.perf_counter() - started
    )


@dataclass
class Neighbours:
    """Nearest real images of a batch: row ids into the index and squared L2 distances (−1 / inf: none)."""

    ids: np.ndarray
    distances: np.ndarray


class RealIndex:
    """A read-only real-manifold index file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = os.fspath(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as exc:
            raise UsageError(f"cannot open index {self.path}: {exc}") from None
        try:
            check_format(self._file.attrs, INDEX_FORMAT, self.path)
        except Exception:
            self._file.close()
            raise
        attrs = self._file.attrs
        self.image_size = int(attrs["image_size"])
        self.n_images = int(attrs["n_images"])
        self.index_hash = str(attrs["index_hash"])
        self.spaces = [Space(name) for name in json.loads(attrs["spaces"])]
        self._sha256 = self._file["files/sha256"][...]
        self._faiss: dict[Space, object] = {}
        self._paths: list[str] | None = None

    def __enter__(self) -> RealIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def attrs(self) -> dict:
        return dict(self._file.attrs)

    def space_attrs(self, space: Space) -> dict:
        return dict(self._group(space).attrs)

    def _group(self, space: Space):
        if space not in self.spaces:
            held = ", ".join(s.value for s in self.spaces)
            raise UsageError(f"index {self.path} has no {space.value!r} space (it holds: {held})")
        return self._file[f"spaces/{space.value}"]

    def backbone_weights(self, space: Space):
        """The BackboneWeights the index's sl/ssl embeddings were made with."""
        from .spaces import BackboneWeights

        attrs = self._group(space).attrs
        return BackboneWeights(str(attrs["weights_source"]), str(attrs["weights_sha256"]))

    def paths(self, ids: np.ndarray) -> list[str]:
        """Source paths of index rows ``ids`` ("" for −1), read once and kept."""
        if self._paths is None:
            self._paths = list(self._file["files/path"].asstr()[...])
        return [self._paths[i] if i >= 0 else "" for i in ids]

    def faiss_index(self, space: Space):
        if space not in self._faiss:
            import faiss

            self._faiss[space] = faiss.deserialize_index(self._group(space)["faiss_index"][...])
        return self._faiss[space]

    def embeddings(self, space: Space, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the exact embeddings, in the order given.

        A flat FAISS index holds them exactly in memory already; other factories may compress
        them, so those are read from the HDF5 dataset.
        """
        import faiss

        index = faiss.downcast_index(self.faiss_index(space))
        if isinstance(index, faiss.IndexFlat):
            return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        dataset = self._group(space)["embeddings"]
        unique, inverse = np.unique(ids, return_inverse=True)
        return dataset[unique.tolist()][inverse]

    @property
    def n_failures(self) -> int:
        return len(self._file["failures/path"])

    def all_embeddings(self, space: Space) -> np.ndarray:
        return self._group(space)["embeddings"][...]

    def nearest(self, space: Space, queries: np.ndarray, query_sha256: Sequence[str] | None = None) -> Neighbours:
        """Nearest real image of each query row, skipping index entries with the query's own SHA-256."""
        index = self.faiss_index(space)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        ids = np.full(n, -1, dtype=np.int64)
        distances = np.full(n, np.inf, dtype=np.float32)
        own = np.array([s.encode() for s in query_sha256], dtype="S64") if query_sha256 is not None else None
        todo = np.arange(n)
        k = 1 if own is None else 2
        while len(todo):
            k = min(k, self.n_images)
            found_d, found_i = index.search(queries[todo], k)
            unresolved = []
            for row, (cand_d, cand_i) in zip(todo, zip(found_d, found_i)):
                valid = cand_i >= 0
                if own is not None:
                    valid &= self._sha256[np.clip(cand_i, 0, None)] != own[row]
                hits = np.flatnonzero(valid)
                if len(hits):
                    ids[row], distances[row] = cand_i[hits[0]], cand_d[hits[0]]
                elif k < self.n_images and (cand_i >= 0).all():
                    unresolved.append(row)  # all k were copies of the query itself: look further
            todo = np.array(unresolved, dtype=np.int64)
            k *= 4
        return Neighbours(ids, distances)


def describe_index(path: str | os.PathLike) -> dict:
    """A plain summary of an index file (for ``manifpt index info`` and scripts)."""
    with RealIndex(path) as index:
        attrs = index.attrs
        spaces = []
        for space in index.spaces:
            space_attrs = index.space_attrs(space)
            faiss_index = index.faiss_index(space)
            spaces.append(
                {
                    "space": space.value,
                    "dim": int(space_attrs["dim"]),
                    "faiss_factory": str(space_attrs["faiss_factory"]),
                    "faiss_ntotal": int(faiss_index.ntotal),
                    "weights_source": str(space_attrs.get("weights_source", "")),
                    "weights_sha256": str(space_attrs.get("weights_sha256", "")),
                }
            )
        return {
            "path": os.fspath(path),
            "format_version": int(attrs["format_version"]),
            "manifpt_version": str(attrs["manifpt_version"]),
            "created_utc": str(attrs["created_utc"]),
            "image_size": index.image_size,
            "n_images": index.n_images,
            "n_failures": index.n_failures,
            "index_hash": index.index_hash,
            "spaces": spaces,
        }
