"""Stage 3: the real-data manifold — an HDF5 file of real-image embeddings with a FAISS index per space.

Layout (README, "File formats"):

    /                      attrs: format, format_version, manifpt_version, created_utc, image_size,
                                  n_images, spaces (JSON), index_hash, resize_policy, provenance_digest
    /files/path            (n,) UTF-8 strings — source paths as given, non-UTF-8 bytes escaped
    /files/sha256          (n,) ASCII hex SHA-256 of each source file
    /failures/path, /failures/error   files that could not be decoded (not in the index)
    /spaces/<space>/embeddings   (n, d) float32; rgb: uint8 pixels p (φ = p / 255, exact);
                                 freq: (n, m) float32, the unique half of each point-symmetric
                                 spectrum (m = 1,542 of d = 3,072 at 32 px; spaces.SymmetricHalf)
    /spaces/<space>/faiss_index  (bytes,) uint8 — a serialised FAISS index (spaces FAISS searches:
                                 not rgb or freq with ``--faiss Flat``); freq's holds the stored bins
                                 scaled by √w (w = 2 for a mirrored pair)
    /spaces/<space>/search_mean, search_basis, search_projected, search_norms
                                 the exact search's tables (rgb with ``--faiss Flat``):
                                 (d,) f8 PCA mean, (k, d) f8 basis, (n, k) f4 projections, (n,) f8 ‖r − μ‖²
    /spaces/<space>        attrs: embedding_space, dim, shape (JSON), metric, faiss_factory, search
                                  (exact-pca: rgb, exact-codes: freq, with ``--faiss Flat``),
                                  search_dims (JSON), layout (freq: symmetric-half), weights_source,
                                  weights_sha256

The nearest real image of x is argmin ||φ(x) − φ(r)||² (k = 1). An image is never its own
neighbour: index entries whose file SHA-256 equals the query's are skipped (leave-one-out).
With a flat index, rgb is searched by :mod:`search` and freq by :mod:`coded_search` (exact: the
same neighbour and float64 distance as brute force, several times faster than FAISS flat search;
freq's log spectra leave a PCA bound little to prune, so its rows are scanned as 8-bit codes).
Other spaces and factories are searched by FAISS, its candidates re-ranked in float64 on the full
vectors (for freq, FAISS searches the unique half of each spectrum: about half the work).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import file_rows
from .coded_search import CodedSearch
from .engines import LocalEngine
from .errors import FormatError, UsageError
from .file_rows import FileRows
from .formats import (
    HDF5_SIGNATURE,
    INDEX_FORMAT,
    METRIC,
    RESIZE_POLICY,
    check_format,
    not_of_kind,
    require_file,
    sample_file,
)
from .images import FailedImage, SkippedFile, count_images, display_path, split_batch
from .integrity import (
    CODED_SEARCH,
    EXACT_SEARCH,
    PROVENANCE_DIGEST_ATTR,
    IndexAttributes,
    IntegrityError,
    has_provenance_digest,
    index_digest,
    provenance_digest,
    space_digest,
    verify_index,
)
from .outputs import check_outputs
from .search import (
    STAGE_DIMS,
    ExactSearch,
    SearchPlan,
    check_digests,
    digest_keys,
    faiss_distance_margin,
    fit_plan,
    float64_slack,
    project_rows,
    rows_as_float,
)
from .search_tables import VerifiedTables
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import (
    Embedder,
    Space,
    SymmetricHalf,
    backbone_attrs,
    backbone_weights_from,
    make_embedder,
    symmetric_half,
)


@dataclass
class IndexBuildResult:
    """What :func:`build_index` wrote."""

    path: str
    n_images: int
    spaces: list[Space]
    index_hash: str
    failures: list[FailedImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    seconds: float = 0.0


FAISS_ADD_BYTES = 64 * 2**20  # rows handed to FAISS at a time, so a build never holds a second copy of them


def build_faiss_index(coordinates: Callable[[int, int], np.ndarray], n: int, dim: int, factory: str):
    """A FAISS index over ``n`` rows of ``dim`` float32 coordinates from an index-factory string,
    trained (on all of them) if it needs it. ``coordinates(start, stop)`` gives rows start..stop:
    a flat index gets them a block at a time, so memory holds one copy (FAISS's) of the rows."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
    try:
        if not index.is_trained:
            index.train(coordinates(0, n))
        step = max(1, FAISS_ADD_BYTES // (4 * dim))
        for start in range(0, n, step):
            index.add(coordinates(start, min(n, start + step)))
    except RuntimeError as exc:  # e.g. fewer images than IVF lists or PQ centroids
        message = str(exc).splitlines()[0].split("Error: ")[-1]
        raise UsageError(f"FAISS cannot train index {factory!r} on {n} images: {message}") from None
    return index


def write_faiss_index(index, append: Callable[[bytes], int]) -> None:
    """Serialise ``index`` through ``append`` as FAISS writes it (no whole copy in memory)."""
    import faiss

    faiss.write_index(index, faiss.PyCallbackIOWriter(append))  # an error in append propagates as itself


def read_faiss_index(dataset):
    """The FAISS index serialised in a (bytes,) uint8 HDF5 dataset (read a block at a time) or array."""
    import faiss

    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        data = dataset[position : position + size].tobytes()
        position += len(data)
        return data

    return faiss.read_index(faiss.PyCallbackIOReader(read))


def uses_exact_search(space: Space, faiss_factory: str) -> bool:
    """Whether a space is searched by :mod:`search` rather than FAISS: rgb with a flat index (where
    it is faster than FAISS flat search with identical results; README, *Benchmark*)."""
    return space is Space.RGB and faiss_factory == "Flat"


def uses_coded_search(space: Space, faiss_factory: str) -> bool:
    """Whether a space is searched by :mod:`coded_search` rather than FAISS: freq with a flat
    index (faster than FAISS flat search, identical results, and nothing to store but the rows)."""
    return space is Space.FREQ and faiss_factory == "Flat"


SYMMETRIC_HALF = "symmetric-half"  # freq's stored layout (spaces.SymmetricHalf)


def stored_layout(space: Space, size: int) -> SymmetricHalf | None:
    """The unique half a space's rows are stored as (freq), or None (stored in full)."""
    return symmetric_half(size, size) if space is Space.FREQ else None


def stored_rows(space: Space, embeddings: np.ndarray, size: int) -> np.ndarray:
    """Embeddings as the index stores them: rgb as its uint8 pixels (φ = p / 255 read back bit for
    bit), freq as the unique half of its point-symmetric spectra (unfolded back bit for bit)."""
    half = stored_layout(space, size)
    if half is not None:
        return half.fold(embeddings)
    if space is not Space.RGB:
        return embeddings
    pixels = np.rint(embeddings * 255).astype(np.uint8)
    if not np.array_equal(rows_as_float(pixels), embeddings):
        raise ValueError("rgb embeddings that are not pixels / 255 cannot be stored as uint8")
    return pixels


def faiss_coordinates(half: SymmetricHalf, stored: np.ndarray) -> np.ndarray:
    """Stored freq bins scaled by √w (in float64, then rounded once to float32): FAISS's L2
    distance between them is the full vectors' up to rounding (:func:`faiss_distance_margin`)."""
    return (stored.astype(np.float64) * np.sqrt(half.weights)).astype(np.float32)


def pair_means(half: SymmetricHalf, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full query vectors → their pair means q̄ (float64, in the stored layout), and the distance
    those leave out.

    For a point-symmetric x, (a − x)² + (b − x)² = 2((a + b)/2 − x)² + (a − b)²/2, so
    ‖q − x‖² = Σ w·(q̄ − x)² + offset(q) for any q: a query need not be symmetric (φ's are, offset 0).
    """
    first = np.take(queries, half.unique, axis=1).astype(np.float64)
    second = np.take(queries, half.mirror, axis=1).astype(np.float64)
    offsets = np.square(first - second) @ (half.weights / 4)  # (a − b)²/2 per pair; 0 for a bin's own mirror
    return (first + second) / 2, offsets


def fold_queries(half: SymmetricHalf, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full query vectors → FAISS coordinates of their pair means (:func:`pair_means`), and offsets."""
    means, offsets = pair_means(half, queries)
    return faiss_coordinates(half, means), offsets


def build_index(
    roots: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    spaces: Sequence[Space],
    *,
    size: int = 32,
    faiss_factory: str = "Flat",
    faiss_parameters: dict[str, int] | None = None,
    weights: dict[Space, str | None] | None = None,
    backbone_input: str = "resize",
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
    engine=None,
) -> IndexBuildResult:
    """Embed every real image under ``roots`` in each space and write the index to ``out``.

    Files that cannot be decoded are listed in ``/failures`` and in the result, never fatal.
    ``out`` may not be one of the real images or lie in their folders, and an existing ``out`` is
    replaced only with ``overwrite``. ``engine`` (default: this process) embeds the images; this
    process writes the file, so every engine builds the same index (the same ``index_hash``).
    ``backbone_input`` is how sl/ssl bring an image to 224×224: ``resize`` or the authors' ``crop``
    (see :mod:`models.backbones`); it is recorded in the index and used by everything made from it.
    ``faiss_parameters`` (``nprobe`` for IVF, ``efSearch`` for HNSW) are set on the FAISS indexes
    before they are written, so every search of the index uses them (and reports them).

    Raises:
        UsageError: no decodable image was found, or a bad argument.
        WeightsNotFoundError: sl/ssl weights are missing.
    """

    started = time.perf_counter()
    check_outputs([out], inputs=roots, overwrite=overwrite)
    faiss_parameters = faiss_parameters or {}
    for space in spaces:
        check_faiss_parameters(space, size, faiss_factory, faiss_parameters)
    weights = weights or {}
    embedders: dict[Space, Embedder] = {
        s: make_embedder(s, weights.get(s), settings.device, backbone_input) for s in spaces
    }
    total = count_images(roots, sniff=settings.sniff)
    if total == 0:
        raise UsageError(f"no image files found under: {', '.join(display_path(r) for r in roots)}")

    failures: list[FailedImage] = []
    skipped: list[SkippedFile] = []
    progress = settings.progress
    with sample_file(out, "files", overwrite=overwrite) as writer:
        for space, embedder in embedders.items():
            shape = space.artifact_shape(size)
            dim = int(np.prod(shape))
            backbone = getattr(embedder, "weights", None)
            extra = backbone_attrs(backbone)
            exact = uses_exact_search(space, faiss_factory)
            half = stored_layout(space, size)
            writer.add_space(
                space.value,
                {"embeddings": ((dim if half is None else len(half.unique),), "u1" if space is Space.RGB else "f4")},
                embedding_space=space.value,
                dim=dim,
                shape=json.dumps(shape),
                metric=METRIC,
                faiss_factory=faiss_factory,
                **({"search": EXACT_SEARCH, "search_dims": json.dumps(list(STAGE_DIMS))} if exact else {}),
                **({"search": CODED_SEARCH} if uses_coded_search(space, faiss_factory) else {}),
                **({"layout": SYMMETRIC_HALF} if half is not None else {}),
                **extra,
            )

        progress.start("Embedding real images", total)
        engine = engine or LocalEngine()
        for embedded in engine.embedded_batches(roots, size, embedders, weights, settings):
            decoded, failed, not_images = split_batch(embedded.items)
            failures.extend(failed)
            skipped.extend(not_images)
            for item in failed:
                writer.fail(item.path, item.error)
            for item in not_images:
                writer.fail(item.path, f"skipped: {item.reason}")
            if decoded:
                writer.append([item.path for item in decoded], [item.sha256 for item in decoded])
                for space in spaces:
                    writer.append_space(space.value, embeddings=stored_rows(space, embedded.embeddings[space], size))

        if writer.n_rows == 0:
            raise UsageError(
                f"none of the {total} files under the real folders could be decoded "
                f"({len(failures)} failed, {len(skipped)} skipped as not images)"
            )

        progress.start("Building search indexes", len(spaces))
        for space in spaces:
            rows = writer.space_group(space.value)["embeddings"]  # read a block at a time where it can be
            if uses_exact_search(space, faiss_factory):
                plan = fit_plan(rows, STAGE_DIMS[-1], image_size=size)
                projected, norms = project_rows(plan, rows)
                for name, table in (
                    ("search_mean", plan.mean),
                    ("search_basis", plan.basis),
                    ("search_projected", projected),
                    ("search_norms", norms),
                ):
                    writer.add_blob(space.value, name, table)
            elif not uses_coded_search(space, faiss_factory):
                half = stored_layout(space, size)

                def coordinates(start: int, stop: int, half=half, rows=rows) -> np.ndarray:
                    block = rows[start:stop]
                    return rows_as_float(block) if half is None else faiss_coordinates(half, block)

                index = build_faiss_index(coordinates, rows.shape[0], rows.shape[1], faiss_factory)
                set_search_parameters(index, faiss_parameters)
                write_faiss_index(index, writer.add_stream(space.value, "faiss_index"))
            progress.advance(1)

        writer.finish(
            INDEX_FORMAT,
            image_size=size,
            n_images=writer.n_rows,
            spaces=json.dumps([s.value for s in spaces]),
            resize_policy=RESIZE_POLICY,
        )
        # The digests are computed from what the file holds, by the code that verifies it on opening.
        digests = {}
        for space in spaces:
            group = writer.space_group(space.value)
            digests[space.value] = group.attrs["digest"] = space_digest(group)
        index_hash = writer.handle.attrs["index_hash"] = index_digest(writer.handle, digests)
        writer.handle.attrs[PROVENANCE_DIGEST_ATTR] = provenance_digest(writer.handle, index_hash)
    seconds = time.perf_counter() - started
    return IndexBuildResult(os.fspath(out), writer.n_rows, list(spaces), index_hash, failures, skipped, seconds)


SEARCH_PARAMETERS = ("nprobe", "efSearch")  # what `index build` may set: IVF's, HNSW's


def check_faiss_parameters(space: Space, size: int, factory: str, parameters: dict[str, int]) -> None:
    """UsageError unless every search parameter is one the space's FAISS index has (before any
    image is embedded): none for the exact searches, nprobe for IVF, efSearch for HNSW."""
    import faiss

    if not parameters:
        return
    if uses_exact_search(space, factory) or uses_coded_search(space, factory):
        raise UsageError(
            f"{space.value} with --faiss {factory} is searched exactly: it takes no FAISS search parameters"
        )
    dim = len(stored_layout(space, size).unique) if space is Space.FREQ else int(np.prod(space.artifact_shape(size)))
    try:
        probe = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
    known = faiss_search_parameters(probe)
    for name, value in parameters.items():
        if name not in SEARCH_PARAMETERS or name not in known:
            raise UsageError(f"--faiss {factory} has no search parameter {name!r} (nprobe: IVF; efSearch: HNSW)")
        if value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    if parameters.get("nprobe", 0) > known.get("nlist", 0):
        raise UsageError(f"--nprobe {parameters['nprobe']} is more than the {known['nlist']} lists of {factory}")


def set_search_parameters(index, parameters: dict[str, int]) -> None:
    """Set nprobe / efSearch on a FAISS index (through a transform such as ``PCA64,IVF…`` too)."""
    import faiss

    for name, value in parameters.items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def faiss_search_parameters(index) -> dict:
    """The FAISS parameters that change what an approximate search returns (none for flat search):
    IVF's lists probed of all (also behind a transform such as ``PCA64,IVF…``), HNSW's search
    breadth and links per node."""
    import faiss

    # ``index`` stays bound: a downcast view does not own the index, and a temporary one
    # (check_faiss_parameters') would be freed under it.
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nprobe), "nlist": int(inner.nlist)}
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch), "M": int(inner.hnsw.nb_neighbors(1))}
    return {}


RERANKED_CANDIDATES = 8  # FAISS candidates whose exact distance decides the neighbour (more where unsure)
SCAN_FALLBACK = "a float64 scan of every real for queries whose FAISS candidates ran out before one that is not a copy"
EXACT_CHUNK_BYTES = 64 * 2**20  # memory for exact re-ranking at a time


def others_are_farther(
    last_candidate: np.ndarray,
    offsets: np.ndarray,
    query_norms: np.ndarray,
    best: np.ndarray,
    margin: float,
    slack: float,
) -> np.ndarray:
    """Whether every row a flat FAISS search ranked after its last candidate is proven farther (in
    float64, as brute force computes it) than ``best``, the best exact distance among the candidates.

    Such a row r has FAISS distance F_r ≥ F_last, so ‖q − r‖² ≥ F_last + offset − margin·(‖q‖² + ‖r‖²)
    in the FAISS coordinates. A row that could win or tie is within √best of the query there, so
    ‖r‖ ≤ ‖q‖ + √best (1e-6 on top covers rounding the coordinates to float32). ``slack`` bounds
    brute force's own rounding, relatively (:func:`search.float64_slack`).
    """
    reach = np.where(np.isfinite(best), best, 0.0) * (1 + slack)
    row_norms = ((np.sqrt(query_norms) + np.sqrt(reach)) * (1 + 1e-6)) ** 2
    beyond = last_candidate.astype(np.float64) + offsets * (1 - slack) - margin * (query_norms + row_norms)
    return np.isfinite(best) & (beyond > reach)


@dataclass
class Neighbours:
    """Nearest real images of a batch: row ids into the index and squared L2 distances (−1 / inf: none)."""

    ids: np.ndarray
    distances: np.ndarray


class RealIndex:
    """A read-only real-manifold index file. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        verify: Sequence[Space] | None = None,
        threads: int | None = None,
        searching: Sequence[Space] = (),
    ) -> None:
        """Open and verify an index: its structure, the digests of the spaces in ``verify`` (default:
        all) and the root ``index_hash``.

        ``searching``: spaces about to be searched. Their search tables are kept from the
        verification's read of the file (:mod:`manifpt_cli.search_tables`), which is then the
        only read of them.

        ``threads`` is the searches' thread budget (default: FAISS's in the opening thread, which
        :meth:`RunSettings.apply` sets). It holds in whichever thread searches: OpenMP keeps a
        thread count per thread, so a search in a read-ahead thread would otherwise run (and spin)
        one thread per core beside the attributor.

        Raises:
            UsageError: no such file.
            FormatError: not an index of this format version, damaged, or altered (IntegrityError).
        """
        import faiss
        import h5py

        self.threads = threads or faiss.omp_get_max_threads()
        self.path = os.fspath(path)
        require_file(self.path, "index", " (build one with `manifpt index build`)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise not_of_kind(self.path, HDF5_SIGNATURE, "manifpt index (made by `manifpt index build`)") from None
        try:
            check_format(self._file.attrs, INDEX_FORMAT, self.path)
            # Read once: the digests cover these, and everything after uses them, not the file.
            self._attributes = IndexAttributes.read(self._file)
            attrs = self._attributes.root
            self.image_size = int(attrs["image_size"])
            self.n_images = int(attrs["n_images"])
            self.index_hash = str(attrs["index_hash"])
            self.spaces = [Space(name) for name in json.loads(attrs["spaces"])]
            checked = self.spaces if verify is None else [space for space in verify if space in self.spaces]
            kept = VerifiedTables([space.value for space in searching])
            names = [space.value for space in checked]
            self.verification = verify_index(
                self._file, self.path, names, kept.space_readers, kept.file_list_readers, self._attributes
            )
            self._tables = {Space(name): tables for name, tables in kept.spaces.items()}
            # Leave-one-out by the SHA-256 list that was verified.
            self._sha256 = kept.sha256 if kept.sha256 is not None else self._file["files/sha256"][...]
            self._paths: list[str] | None = kept.paths  # else read when first asked for
            # Format 6: the failures as the provenance digest read them; 5 and older: unverified.
            self._failures = kept.failures
            self.n_failures = len(self._failures) if self._failures is not None else len(self._file["failures/path"])
        except IntegrityError:
            self._file.close()
            raise
        except (KeyError, ValueError, TypeError, OSError, AttributeError) as exc:
            self._file.close()
            raise FormatError(f"{self.path} is a damaged manifpt index ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self._file.close()
            raise
        self._faiss: dict[Space, object] = {}
        self._exact: dict[Space, ExactSearch] = {}
        self._coded: dict[Space, CodedSearch] = {}
        self._held: dict[Space, np.ndarray] = {}
        # Two threads may search at once (attribution shares a batch's search): each search, and
        # each table it reads, is made once, by the first thread that needs it.
        self._making = threading.RLock()

    def __enter__(self) -> RealIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for rows in self._held.values():
            if isinstance(rows, FileRows):
                rows.close()
        self._file.close()

    @property
    def attrs(self) -> dict:
        """The root attributes, as read and verified at open."""
        return dict(self._attributes.root)

    def space_attrs(self, space: Space) -> dict:
        """A space's attributes, as read at open (verified where the space was)."""
        return dict(self._space_attrs(space))

    def _space_attrs(self, space: Space) -> dict:
        self._check_space(space)
        return self._attributes.spaces[space.value]

    def _group(self, space: Space):
        self._check_space(space)
        return self._file[f"spaces/{space.value}"]

    def _check_space(self, space: Space) -> None:
        if space not in self.spaces:
            held = ", ".join(s.value for s in self.spaces)
            raise UsageError(f"index {self.path} has no {space.value!r} space (it holds: {held})")

    def backbone_weights(self, space: Space):
        """The BackboneWeights the index's sl/ssl embeddings were made with."""
        return backbone_weights_from(self._space_attrs(space))

    def paths(self, ids: np.ndarray) -> list[str]:
        """Source paths of index rows ``ids`` ("" for −1): as verified where the index was opened
        for searching, else read when first asked for; kept."""
        with self._making:
            if self._paths is None:
                self._paths = list(self._file["files/path"].asstr()[...])
        return [self._paths[i] if i >= 0 else "" for i in ids]

    def sha256(self, ids: np.ndarray) -> list[str]:
        """SHA-256 of the source files of index rows ``ids``."""
        return [str(self._sha256[i].decode() if isinstance(self._sha256[i], bytes) else self._sha256[i]) for i in ids]

    def stored_layout(self, space: Space) -> SymmetricHalf | None:
        """The unique half a space's rows are stored as (freq), or None (stored in full)."""
        if str(self._space_attrs(space).get("layout", "")) != SYMMETRIC_HALF:
            return None
        return symmetric_half(self.image_size, self.image_size)

    def is_exact_search(self, space: Space) -> bool:
        return str(self._space_attrs(space).get("search", "")) == EXACT_SEARCH

    def exact_search(self, space: Space) -> ExactSearch:
        """The exact search of a space that has its tables (read once and kept; its rows as :meth:`_rows`)."""
        with self._making:
            if space not in self._exact:
                rows = self._rows(space)
                plan = SearchPlan(self._table(space, "search_mean"), self._table(space, "search_basis"))
                projected, norms = self._table(space, "search_projected"), self._table(space, "search_norms")
                if (
                    len(rows) != self.n_images
                    or projected.shape != (len(rows), len(plan.basis))
                    or norms.shape != (len(rows),)
                ):
                    raise FormatError(f"index {self.path}: the {space.value} search tables do not match the image list")
                stage_dims = json.loads(self._space_attrs(space)["search_dims"])
                tables = self._tables.pop(space, None)
                squared = tables.squared_norms(len(rows)) if tables is not None else None
                self._exact[space] = ExactSearch(
                    rows, plan, projected, norms, self._sha256, stage_dims, self.threads, squared_norms=squared
                )
        return self._exact[space]

    def is_coded_search(self, space: Space) -> bool:
        """Whether a space is searched by :class:`CodedSearch`: freq with a flat index (exact, the
        same neighbour and distance as brute force, several times faster than FAISS flat search).
        (A version-4 index also holds a flat FAISS index of freq, which is not read.)"""
        return uses_coded_search(space, str(self._space_attrs(space)["faiss_factory"]))

    def coded_search(self, space: Space) -> CodedSearch:
        """The code scan of a freq space (made from its stored rows when first needed, then kept)."""
        with self._making:
            if space not in self._coded:
                rows = self._rows(space)
                if len(rows) != self.n_images:
                    raise FormatError(f"index {self.path}: the {space.value} embeddings do not match the image list")
                half = self.stored_layout(space)
                terms = len(half.full_from_unique)
                self._coded[space] = CodedSearch(rows, self._sha256, np.sqrt(half.weights), self.threads, terms=terms)
        return self._coded[space]

    def search_description(self, space: Space) -> dict:
        """Which search finds the neighbours, for report headers: exact with its parameters, or the
        FAISS factory and (for approximate ones) the parameters that change what it returns."""
        factory = str(self._space_attrs(space)["faiss_factory"])
        if self.is_exact_search(space):
            search = self.exact_search(space)
            return {
                "method": "exact: PCA lower bounds in float32 over a window of rows, verified in float64 (manifpt_cli/search.py)",
                "faiss_factory": factory,
                "exact": True,
                "parameters": search.parameters,
            }
        if self.is_coded_search(space):
            search = self.coded_search(space)
            return {
                "method": "exact: 8-bit code scan with a proven error band over the unique half of each "
                "spectrum, verified in float64 (manifpt_cli/coded_search.py)",
                "faiss_factory": factory,
                "exact": True,
                "parameters": {"grid_step": search.grid.step, "largest_residual": search.band},
            }
        half = " over the unique half of each spectrum" if self.stored_layout(space) is not None else ""
        return {
            "method": f"FAISS {factory}{'' if factory == 'Flat' else ' (approximate)'}{half}, "
            f"{RERANKED_CANDIDATES} or more candidates re-ranked in float64",
            "faiss_factory": factory,
            "exact": factory == "Flat",
            "parameters": faiss_search_parameters(self.faiss_index(space)),
            "reranked_candidates": RERANKED_CANDIDATES,
            **({} if factory == "Flat" else {"fallback": SCAN_FALLBACK}),
        }

    def faiss_index(self, space: Space):
        with self._making:
            if space not in self._faiss:
                tables = self._tables.get(space)
                kept = tables.take("faiss_index") if tables is not None else None
                try:
                    index = read_faiss_index(self._group(space)["faiss_index"] if kept is None else kept)
                except RuntimeError as exc:
                    message = str(exc).splitlines()[0]
                    raise FormatError(
                        f"index {self.path}: the {space.value} FAISS index cannot be read: {message}"
                    ) from None
                if index.ntotal != self.n_images or index.d != self._group(space)["embeddings"].shape[1]:
                    raise FormatError(f"index {self.path}: the {space.value} FAISS index does not match the image list")
                self._faiss[space] = index
        return self._faiss[space]

    def embeddings(self, space: Space, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the exact, full float32 embeddings, in the order given.

        The exact searches hold them already (rgb's pixels; freq's stored rows, in memory or read
        from the file: :meth:`_rows`), as does a flat FAISS index; other factories may compress
        them, so those are read from the HDF5 dataset.
        """
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.is_exact_search(space):
            return rows_as_float(self.exact_search(space).rows[ids])
        half = self.stored_layout(space)
        if self.is_coded_search(space):
            return half.unfold(self._rows(space)[ids])
        if half is not None:
            return half.unfold(self._read_rows(space, ids))
        flat = isinstance(faiss.downcast_index(self.faiss_index(space)), faiss.IndexFlat)
        if flat:
            return self.faiss_index(space).reconstruct_batch(ids)
        return rows_as_float(self._read_rows(space, ids))

    def _rows(self, space: Space) -> np.ndarray | FileRows:
        """A space's stored rows: read once and held, or, above ``HELD_ROWS_BYTES``, gathered from
        the file when needed (:class:`FileRows`, after the open verified the file)."""
        with self._making:
            if space not in self._held:
                dataset = self._group(space)["embeddings"]
                large = dataset.size * dataset.dtype.itemsize > file_rows.HELD_ROWS_BYTES
                try:
                    self._held[space] = FileRows(self.path, dataset) if large else self._table(space, "embeddings")
                except ValueError as exc:  # stored compressed, or not by whole rows: not written by manifpt
                    raise FormatError(f"index {self.path}: {exc}") from None
        return self._held[space]

    def _table(self, space: Space, name: str) -> np.ndarray:
        """A dataset of a space, whole: as the verification kept it (``searching``), else read now."""
        tables = self._tables.get(space)
        kept = tables.take(name) if tables is not None else None
        return self._group(space)[name][...] if kept is None else kept

    def _stored_rows(self, space: Space):
        """A FAISS space's stored rows: as the verification kept them (``searching``; held from
        then on), else the HDF5 dataset."""
        with self._making:
            tables = self._tables.get(space)
            kept = tables.take("embeddings") if tables is not None else None
            if kept is not None:
                self._held[space] = kept
        return self._held[space] if space in self._held else self._group(space)["embeddings"]

    def _read_rows(self, space: Space, ids: np.ndarray) -> np.ndarray:
        """Stored rows ``ids`` of a FAISS space, in the order given."""
        rows = self._stored_rows(space)
        if isinstance(rows, np.ndarray):
            return rows[ids]
        unique, inverse = np.unique(ids, return_inverse=True)
        return rows[unique.tolist()][inverse]

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of each file the build left out (verified from format 6: ``provenance_digest``)."""
        if self._failures is not None:
            return list(self._failures)
        group = self._file["failures"]
        return list(zip(group["path"].asstr()[...], group["error"].asstr()[...]))

    def all_embeddings(self, space: Space) -> np.ndarray:
        """Every row's full float32 embedding (rgb: from the stored uint8 pixels; freq: unfolded)."""
        rows = self._group(space)["embeddings"][...]
        half = self.stored_layout(space)
        return rows_as_float(rows) if half is None else half.unfold(rows)

    def nearest(self, space: Space, queries: np.ndarray, query_sha256: Sequence[str] | None = None) -> Neighbours:
        """Nearest real image of each query row, skipping index entries with the query's own SHA-256.

        Where the space has exact-search tables (rgb), :class:`search.ExactSearch` finds it; freq
        with a flat index, :class:`coded_search.CodedSearch` (from the query's pair means). Otherwise
        FAISS proposes ``RERANKED_CANDIDATES`` candidates (for freq, from the √w-scaled unique half:
        :func:`fold_queries`); their distances are then recomputed exactly (float64, per row, on the
        full vectors), and the smallest wins, ties going to the lowest index row. So a row's
        neighbour and distance do not depend on how queries are batched or threaded (FAISS's own
        distances change in the last digits with the batch size).

        A flat index is searched again with 4× the candidates until the result is proven: every row
        FAISS ranked below the last candidate is at least its FAISS distance minus the rounding bound
        of :func:`faiss_distance_margin` away, so once that exceeds the best exact distance, no
        other row can win or tie. Rows that could win must lie within √(best) of the query, which
        bounds their norms (a single outlier row does not widen every margin). Near-ties within
        rounding, and copies of a query skipped by leave-one-out, are what widen the search.
        """
        import faiss

        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP count, and it stays so: see __init__
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_digests(query_sha256, len(queries))
        if self.is_exact_search(space):
            found = self.exact_search(space).nearest(queries, query_sha256)
            return Neighbours(found.ids, found.distances)
        if self.is_coded_search(space):
            means, offsets = pair_means(self.stored_layout(space), queries)

            def exact(query_ids: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
                return self._pair_distances(space, queries, query_ids, row_ids)

            found = self.coded_search(space).nearest(means, exact, offsets, query_sha256)
            return Neighbours(found.ids, found.distances)
        index = self.faiss_index(space)
        half = self.stored_layout(space)
        if half is None:
            searched, offsets = queries, np.zeros(len(queries))
        else:
            searched, offsets = fold_queries(half, queries)
        proven_by_margin = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        query_norms = np.square(searched.astype(np.float64)).sum(axis=1)
        margin, slack = faiss_distance_margin(index.d), float64_slack(queries.shape[1])
        n = len(queries)
        ids = np.full(n, -1, dtype=np.int64)
        distances = np.full(n, np.inf, dtype=np.float64)
        own_keys, own_fits = digest_keys(query_sha256, self._sha256.dtype) if query_sha256 is not None else (None, None)
        todo = np.arange(n)
        k = RERANKED_CANDIDATES
        while len(todo):
            k = min(k, self.n_images)
            approximate, candidates = index.search(searched[todo], k)
            valid = candidates >= 0
            if own_keys is not None:
                own = (self._sha256[np.clip(candidates, 0, None)] == own_keys[todo, None]) & own_fits[todo, None]
                valid &= ~own
            exact = self._exact_distances(space, queries[todo], candidates)
            exact[~valid] = np.inf
            smallest = exact.min(axis=1)
            found = np.isfinite(smallest)
            closest = exact == smallest[:, None]
            best = np.where(closest & valid, candidates, np.iinfo(np.int64).max).min(axis=1)
            ids[todo[found]] = best[found]
            distances[todo[found]] = smallest[found]
            # Look further where all k candidates were copies of the query itself, or where a row
            # beyond them might still win or tie (flat: not proven; approximate: all k tied).
            if proven_by_margin:
                unsure = ~others_are_farther(
                    approximate[:, -1], offsets[todo], query_norms[todo], smallest, margin, slack
                )
            else:
                unsure = (np.where(valid, exact, -np.inf).max(axis=1) == smallest) & valid.all(axis=1)
            complete = (candidates >= 0).all(axis=1)
            # An approximate index returns fewer than k (padded with −1) when the lists it probes
            # run out: a larger k finds nothing more there, so those rows are scanned instead.
            short = todo[~found & ~complete]
            if len(short):
                ids[short], distances[short] = self._scan_nearest(
                    space, queries[short], (own_keys[short], own_fits[short]) if own_keys is not None else None
                )
            todo = todo[(~found | unsure) & (k < self.n_images) & complete]
            k *= 4
        return Neighbours(ids, distances)

    def _scan_nearest(self, space: Space, queries: np.ndarray, own: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest row of each query by a float64 scan of every stored embedding, skipping its own
        SHA-256 (``own``: :func:`search.digest_keys`; ties: the lowest row; −1 / inf where every row
        is a copy of the query)."""
        dataset = self._stored_rows(space)
        half = self.stored_layout(space)
        queries = queries.astype(np.float64)
        ids = np.full(len(queries), -1, dtype=np.int64)
        distances = np.full(len(queries), np.inf)
        step = max(1, EXACT_CHUNK_BYTES // (queries.shape[1] * 8))
        for start in range(0, self.n_images, step):
            stored = dataset[start : start + step]
            rows = (rows_as_float(stored) if half is None else half.unfold(stored)).astype(np.float64)
            for i, query in enumerate(queries):
                block = np.square(rows - query).sum(axis=1)
                if own is not None and own[1][i]:
                    block[self._sha256[start : start + len(rows)] == own[0][i]] = np.inf
                nearest = int(block.argmin())
                if block[nearest] < distances[i]:  # strictly: earlier rows win ties
                    ids[i], distances[i] = start + nearest, block[nearest]
        return ids, distances

    def _pair_distances(self, space: Space, queries: np.ndarray, query_ids: np.ndarray, row_ids: np.ndarray):
        """Brute force's float64 squared distance between each (query, row) pair, in chunks: the
        same values, summed in the same order."""
        out = np.empty(len(row_ids))
        step = max(1, EXACT_CHUNK_BYTES // (queries.shape[1] * 8))
        for start in range(0, len(row_ids), step):
            pairs = slice(start, start + step)
            difference = np.subtract(
                self.embeddings(space, row_ids[pairs]), queries[query_ids[pairs]], dtype=np.float64
            )
            out[pairs] = np.square(difference, out=difference).sum(axis=1)
        return out

    def _exact_distances(self, space: Space, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(m, k) squared L2 distances in float64 between each query and its candidates (−1: row 0)."""
        m, k = candidates.shape
        pairs = self._pair_distances(space, queries, np.repeat(np.arange(m), k), np.clip(candidates, 0, None).ravel())
        return pairs.reshape(m, k)


def image_folders(path: str | os.PathLike) -> list[str]:
    """The folders an index's images were read from, as it records them (an array file's rows: the
    array's folder). A run that may decode them again (:func:`artifacts.index_images`) must not
    write there. Read unverified, before any work: it can only widen what is refused, and a file
    that is not an index gives none (opening it then says what it is)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            paths = handle["files/path"].asstr()[...]
    except (OSError, KeyError, TypeError, ValueError):
        return []
    return sorted({os.path.dirname(path) or os.curdir for path in paths})


def describe_index(path: str | os.PathLike, *, failures: bool = False) -> dict:
    """A plain summary of an index file (for ``manifpt index info`` and scripts); with
    ``failures``, also the files the build left out, as (path, reason)."""
    with RealIndex(path) as index:
        attrs = index.attrs
        spaces = []
        for space in index.spaces:
            space_attrs = index.space_attrs(space)
            exact = index.is_exact_search(space) or index.is_coded_search(space)
            spaces.append(
                {
                    "space": space.value,
                    "dim": int(space_attrs["dim"]),
                    "faiss_factory": str(space_attrs["faiss_factory"]),
                    "search": "exact" if exact else "faiss",
                    "faiss_ntotal": index.n_images if exact else int(index.faiss_index(space).ntotal),
                    "weights_source": str(space_attrs.get("weights_source", "")),
                    "weights_sha256": str(space_attrs.get("weights_sha256", "")),
                }
            )
        return {
            "path": os.fspath(path),
            "format_version": int(attrs["format_version"]),
            "manifpt_version": str(attrs["manifpt_version"]),
            "created_utc": str(attrs["created_utc"]),
            # Format 5 and older have no digest over manifpt_version, created_utc and the failures.
            "provenance_verified": has_provenance_digest(attrs),
            "image_size": index.image_size,
            "n_images": index.n_images,
            "n_failures": index.n_failures,
            "index_hash": index.index_hash,
            "spaces": spaces,
            **({"failures": index.failures()} if failures else {}),
        }
