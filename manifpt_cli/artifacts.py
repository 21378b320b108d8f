"""Stage 4: artifacts a = φ(x) − φ(x*) for labelled folders of images, written to HDF5.

Layout (README, "File formats"):

    /                       attrs: format, format_version, manifpt_version, created_utc, image_size,
                                   index_hash, index_path, label_names (JSON), spaces (JSON), n_samples
    /samples/path           (n,) UTF-8 strings
    /samples/sha256         (n,) ASCII hex SHA-256 of each file
    /samples/label          (n,) int32 — index into label_names
    /samples/pixels         (n, S, S, 3) uint8 — the decoded image (baselines train on these)
    /spaces/<space>/artifacts          (n, *shape) float32 — (3, S, S) for rgb/freq, (2048,) for sl/ssl
    /spaces/<space>/neighbor_id        (n,) int64 — row of x* in the index
    /spaces/<space>/neighbor_distance  (n,) float32 — ||φ(x) − φ(x*)||²
    /failures/path, /failures/error, /failures/label   files that could not be decoded
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import FormatError, ImageDecodeError, MismatchError, UsageError
from .formats import ARTIFACTS_FORMAT, HDF5_SIGNATURE, check_format, json_attr, not_of_kind, require_file, sample_file
from .images import (
    DecodedImage,
    FailedImage,
    SkippedFile,
    count_images,
    decode_folder,
    decode_image,
    display_path,
    iter_batches,
    split_batch,
)
from .integrity import ARTIFACTS_DIGEST_ATTR, IntegrityError, hdf5_digest
from .manifold import Neighbours, RealIndex, image_folders
from .outputs import check_outputs
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import (
    BackboneWeights,
    Embedder,
    Space,
    TorchBackboneEmbedder,
    backbone_attrs,
    backbone_weights_from,
    load_backbone,
    make_embedder,
)

REAL_LABEL = "real"
REAL_FROM_INDEX = "index"  # extract's ``real``: the class ``real`` from the index's own images


@dataclass
class SpaceArtifacts:
    """Artifacts of one batch in one space: (n, *shape) artifacts and their nearest real images."""

    artifacts: np.ndarray
    neighbours: Neighbours


def compute_artifacts(
    index: RealIndex, embedders: dict[Space, Embedder], pixels: np.ndarray, sha256: Sequence[str]
) -> dict[Space, SpaceArtifacts]:
    """φ(x) − φ(x*) for a batch of (n, S, S, 3) uint8 images, in every space of ``embedders``.

    Rows with no neighbour (an index holding only copies of the image) get NaN artifacts.
    """
    result = {}
    for space, embedder in embedders.items():
        queries = np.ascontiguousarray(embedder(pixels), dtype=np.float32)
        neighbours = index.nearest(space, queries, sha256)
        found = neighbours.ids >= 0
        artifacts = np.full_like(queries, np.nan)
        if found.any():
            artifacts[found] = queries[found] - index.embeddings(space, neighbours.ids[found])
        shape = space.artifact_shape(index.image_size)
        result[space] = SpaceArtifacts(artifacts.reshape(len(queries), *shape), neighbours)
    return result


def index_embedders(
    index: RealIndex, spaces: Sequence[Space], weights: dict[Space, str | None] | None = None, device: str = "cpu"
) -> dict[Space, Embedder]:
    """PyTorch/NumPy embedders that reproduce the index's own spaces (same backbone weights).

    Raises:
        MismatchError: the weights found differ from those the index was built with.
    """
    weights = weights or {}
    embedders: dict[Space, Embedder] = {}
    for space in spaces:
        if not space.needs_backbone:
            embedders[space] = make_embedder(space)
            continue
        recorded = index.backbone_weights(space)
        module, found = load_backbone(space, weights.get(space) or recorded.load_argument, recorded.input)
        if found.sha256 != recorded.sha256:
            raise MismatchError(
                f"the {space.value} weights loaded from {found.source} (sha256 {found.sha256[:12]}…) are not the "
                f"ones index {index.path} was built with ({recorded.source}, sha256 {recorded.sha256[:12]}…)"
            )
        embedders[space] = TorchBackboneEmbedder(space, module, found, device)
    return embedders


@dataclass
class ExtractResult:
    """What :func:`extract_artifacts` wrote."""

    path: str
    label_names: list[str]
    counts: dict[str, int]
    spaces: list[Space]
    failures: list[tuple[str, FailedImage]] = field(default_factory=list)
    seconds: float = 0.0
    skipped: list[tuple[str, SkippedFile]] = field(default_factory=list)  # not image files: no failure

    @property
    def n_samples(self) -> int:
        return sum(self.counts.values())


def _labelled_folders(sources: Sequence[tuple[str, str]], real: str | os.PathLike | None) -> list[tuple[str, str]]:
    """(class, folder) pairs; the folder of a real class drawn from the index is ``REAL_FROM_INDEX``."""
    folders = list(sources)
    if real is not None:
        folders.append((REAL_LABEL, os.fspath(real)))
    names = [name for name, _ in folders]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise UsageError(
            f"class names must be unique; repeated: {', '.join(duplicated)} ('real' names the real folder's class)"
        )
    if not folders:
        raise UsageError("give at least one source (a class name and its folder)")
    return folders


def index_images(index: RealIndex, rows: np.ndarray, settings: RunSettings) -> list[DecodedImage | FailedImage]:
    """The index's own images at ``rows``; a FailedImage, saying why, for one that cannot be had exactly.

    Their pixels come from the rgb embeddings when the index has that space and verified it as
    it opened (exact: rgb is the pixels / 255); otherwise the files are decoded again from their
    recorded paths and must still have their recorded SHA-256. (An index opened to search freq
    verifies freq alone: its rgb rows, unchecked, could show any picture.)
    """
    paths, shas, size = index.paths(rows), index.sha256(rows), index.image_size
    if Space.RGB.value in index.verification["verified_spaces"]:
        floats = index.embeddings(Space.RGB, rows).reshape(len(rows), 3, size, size)
        pixels = np.clip(np.rint(floats * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return [DecodedImage(p, np.ascontiguousarray(x), (size, size), h) for p, x, h in zip(paths, pixels, shas)]
    images: list[DecodedImage | FailedImage] = []
    for path, sha in zip(paths, shas):
        try:
            image = decode_image(path, size, settings.max_pixels, settings.max_file_bytes)
        except ImageDecodeError as exc:
            images.append(FailedImage(path, f"the index's image {display_path(path)} cannot be read again ({exc})"))
            continue
        if image.sha256 != sha:
            images.append(
                FailedImage(path, f"{display_path(path)} changed since the index was built (SHA-256 differs)")
            )
            continue
        images.append(image)
    return images


def index_real_images(index: RealIndex, count: int, settings: RunSettings, seed: int = 0) -> list[DecodedImage]:
    """``count`` of the index's own images (seeded sample), for a ``real`` class with leave-one-out."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(index.n_images, size=min(count, index.n_images), replace=False))
    images = index_images(index, rows, settings)
    for image in images:
        if isinstance(image, FailedImage):
            raise UsageError(f"{image.error}; give a real class with --real DIR, or none with --real none")
    return images


def extract_artifacts(
    index_path: str | os.PathLike,
    sources: Sequence[tuple[str, str]],
    out: str | os.PathLike,
    *,
    spaces: Sequence[Space] | None = None,
    real: str | os.PathLike | None = None,
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> ExtractResult:
    """Compute artifacts for every image of every labelled folder and write them to ``out``.

    ``sources`` are (class name, folder) pairs; ``real`` adds a ``real`` class whose images are
    never their own neighbour: a folder, or ``REAL_FROM_INDEX`` for a sample of the index's own
    images (as many as the largest source class; see :func:`index_real_images`). Undecodable files
    are listed, never fatal. ``out`` may be none of
    the inputs, and an existing ``out`` is replaced only with ``overwrite``.
    """
    started = time.perf_counter()
    folders = _labelled_folders(sources, real)
    from_index = [name for name, folder in folders if folder == REAL_FROM_INDEX]
    disk_folders = [(name, folder) for name, folder in folders if folder != REAL_FROM_INDEX]
    inputs = [index_path, *(folder for _, folder in disk_folders)]
    check_outputs([out], inputs=inputs + (image_folders(index_path) if from_index else []), overwrite=overwrite)
    label_names = [name for name, _ in folders]
    progress = settings.progress
    with RealIndex(index_path) as index:
        spaces = list(spaces) if spaces else index.spaces
        embedders = index_embedders(index, spaces, weights, settings.device)
        size = index.image_size
        totals = {name: count_images([folder], sniff=settings.sniff) for name, folder in disk_folders}
        empty = [f"{name}={display_path(folder)}" for name, folder in disk_folders if totals[name] == 0]
        if empty:
            raise UsageError(f"no image files in: {', '.join(empty)}")
        if from_index:
            index_images = index_real_images(index, max(totals.values(), default=index.n_images), settings)
            totals[REAL_LABEL] = len(index_images)
        counts = dict.fromkeys(label_names, 0)
        failures: list[tuple[str, FailedImage]] = []
        columns = {"label": ((), "i4"), "pixels": ((size, size, 3), "u1")}
        with sample_file(out, "samples", columns, failure_columns=["label"], overwrite=overwrite) as writer:
            for space in spaces:
                shape = space.artifact_shape(size)
                backbone = index.backbone_weights(space) if space.needs_backbone else None
                extra = backbone_attrs(backbone)
                writer.add_space(
                    space.value,
                    {"artifacts": (shape, "f4"), "neighbor_id": ((), "i8"), "neighbor_distance": ((), "f4")},
                    embedding_space=space.value,
                    shape=json.dumps(shape),
                    **extra,
                )

            skipped: list[tuple[str, SkippedFile]] = []

            def fail(name: str, item: FailedImage) -> None:
                failures.append((name, item))
                writer.fail(item.path, item.error, label=name)

            progress.start("Extracting artifacts", sum(totals.values()))
            with_backbone = any(space.needs_backbone for space in spaces)
            for label, (name, folder) in enumerate(folders):
                if folder == REAL_FROM_INDEX:
                    batches = iter_batches(index_images, settings.batch_for(size, with_backbone))
                else:
                    batches = decode_folder([folder], size, settings, backbone=with_backbone)
                for batch in batches:
                    decoded, failed, not_images = split_batch(batch)
                    for item in failed:
                        fail(name, item)
                    for item in not_images:  # recorded in the file as the index does, not a failure
                        skipped.append((name, item))
                        writer.fail(item.path, f"skipped: {item.reason}", label=name)
                    if decoded:
                        pixels = np.stack([item.pixels for item in decoded])
                        shas = [item.sha256 for item in decoded]
                        per_space = compute_artifacts(index, embedders, pixels, shas)
                        keep = np.ones(len(decoded), dtype=bool)
                        for space_result in per_space.values():
                            keep &= space_result.neighbours.ids >= 0
                        for i in np.flatnonzero(~keep):
                            fail(name, FailedImage(decoded[i].path, "no real neighbour other than itself", shas[i]))
                        kept = np.flatnonzero(keep)
                        writer.append(
                            [decoded[i].path for i in kept],
                            [shas[i] for i in kept],
                            label=np.full(len(kept), label, dtype=np.int32),
                            pixels=pixels[kept],
                        )
                        for space, found in per_space.items():
                            writer.append_space(
                                space.value,
                                artifacts=found.artifacts[kept],
                                neighbor_id=found.neighbours.ids[kept],
                                neighbor_distance=found.neighbours.distances[kept],
                            )
                        counts[name] += len(kept)
                    progress.advance(len(batch))
            if writer.n_rows == 0:
                raise UsageError("no image could be decoded in any source folder (see the errors)")
            writer.finish(
                ARTIFACTS_FORMAT,
                image_size=size,
                index_hash=index.index_hash,
                index_path=_path_attribute(os.path.abspath(index.path)),
                label_names=json.dumps(label_names),
                spaces=json.dumps([s.value for s in spaces]),
                n_samples=writer.n_rows,
            )
            writer.handle.attrs[ARTIFACTS_DIGEST_ATTR] = hdf5_digest(writer.handle)
    seconds = time.perf_counter() - started
    return ExtractResult(os.fspath(out), label_names, counts, list(spaces), failures, seconds, skipped)


@dataclass
class LabelledSamples:
    """The labelled rows of an artifacts file, which every input made from them shares."""

    labels: np.ndarray  # (n,) int64, indices into label_names
    label_names: list[str]
    image_size: int
    index_hash: str
    paths: list[str]
    sha256: list[str]  # of each file: leave-one-out needs it when a perturbed copy is searched

    def subset(self, rows: np.ndarray) -> LabelledSamples:
        return replace(
            self, labels=self.labels[rows], paths=[self.paths[i] for i in rows], sha256=[self.sha256[i] for i in rows]
        )


@dataclass
class ArtifactSet:
    """One space's artifacts φ(x) − φ(x*), (n, *space.artifact_shape) float32."""

    samples: LabelledSamples
    space: Space
    artifacts: np.ndarray
    backbone: BackboneWeights | None = None  # the sl/ssl weights the artifacts were made with
    distances: np.ndarray | None = None  # (n,) squared L2 distance to the nearest real image


@dataclass
class PixelSet:
    """The decoded images of an artifacts file, (n, S, S, 3) uint8 (what baselines train on)."""

    samples: LabelledSamples
    pixels: np.ndarray


@contextlib.contextmanager
def _open_artifacts(path: str | os.PathLike):
    """An artifacts file opened read-only and format-checked, or a clear error."""
    import h5py

    require_file(path, "artifacts", " (make one with `manifpt extract`)")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise not_of_kind(path, HDF5_SIGNATURE, "artifacts file") from None
    with handle:
        try:
            check_format(handle.attrs, ARTIFACTS_FORMAT, path)
            intact = handle.attrs.get(ARTIFACTS_DIGEST_ATTR) == hdf5_digest(handle)
        except FormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise FormatError(f"{path} is a damaged artifacts file ({type(exc).__name__}: {exc})") from None
        if not intact:
            raise IntegrityError(
                f"{path} does not match its recorded digest: it was edited or damaged after extraction"
            )
        yield handle


def _samples(handle) -> LabelledSamples:
    return LabelledSamples(
        labels=handle["samples/label"][...].astype(np.int64),
        label_names=json_attr(handle.attrs, "label_names"),
        image_size=int(handle.attrs["image_size"]),
        index_hash=str(handle.attrs["index_hash"]),
        paths=list(handle["samples/path"].asstr()[...]),
        sha256=list(handle["samples/sha256"].asstr()[...]),
    )


def artifact_spaces(path: str | os.PathLike) -> list[Space]:
    """The spaces an artifacts file holds."""
    with _open_artifacts(path) as handle:
        return [Space(name) for name in json_attr(handle.attrs, "spaces")]


def load_artifacts(path: str | os.PathLike, space: Space) -> ArtifactSet:
    """Read one space of an artifacts file.

    Raises:
        FormatError: not an artifacts file; UsageError: unreadable, or the space is not in it.
    """
    with _open_artifacts(path) as handle:
        held = json_attr(handle.attrs, "spaces")
        if space.value not in held:
            raise UsageError(f"{path} has no {space.value!r} artifacts (it holds: {', '.join(held)})")
        group = handle[f"spaces/{space.value}"]
        backbone = None
        if space.needs_backbone:
            backbone = backbone_weights_from(group.attrs)
        distances = group["neighbor_distance"][...].astype(np.float64)
        return ArtifactSet(_samples(handle), space, group["artifacts"][...], backbone, distances)


def _path_attribute(path: str) -> str | np.bytes_:
    """A path as an HDF5 attribute: text, or its bytes where it is not UTF-8 (HDF5 text must be)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return np.bytes_(os.fsencode(path))
    return path


def artifacts_index_path(path: str | os.PathLike) -> str:
    """The index an artifacts file was extracted against (as recorded; it is re-verified when opened)."""
    with _open_artifacts(path) as handle:
        return os.fsdecode(handle.attrs["index_path"])


def load_pixels(path: str | os.PathLike) -> PixelSet:
    """The decoded images of an artifacts file."""
    with _open_artifacts(path) as handle:
        return PixelSet(_samples(handle), handle["samples/pixels"][...])
