"""Where the per-image work runs: in this process (``local``), or on a Ray cluster (``ray``).

An engine turns discovered files into two kinds of results that the rest of the pipeline writes,
the same way whatever the engine:

- for ``index build``: batches of decoded files with their embeddings in every space;
- for ``attribute``: one :class:`AttributionRow` per file.

Both come back in discovery order, batch by batch, and one process writes every output file, so
an index or a report is the same file (the same digest, the same rows) on every engine.

On Ray (``pip install "manifpt[ray]"``): files are listed once by the driver; for attribution,
Ray tasks read and decode them, and actors that each open the model and the index once embed,
search and attribute. Every node must read the model, the index and the suspects at the same
paths (shared storage); an actor whose model or index digest differs from the driver's refuses
to run. Without an address, a local Ray instance is started with ``workers`` CPUs and shut down
at the end.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ManifptError, MismatchError, UsageError
from .extras import require_extra
from .images import (
    DecodedImage,
    DecodeResult,
    FoundFile,
    decode_folder,
    discover_images,
    display_path,
    iter_batches,
    try_decode,
)
from .progress import SILENT
from .settings import RunSettings
from .spaces import Embedder, Space


class EngineError(ManifptError):
    """The Ray cluster could not run the work (a worker died, the cluster is unreachable)."""


@dataclass
class EmbeddedBatch:
    """One batch of discovered files, decoded, and the embeddings of its decoded images per space."""

    items: list[DecodeResult]
    embeddings: dict[Space, np.ndarray] = field(default_factory=dict)


def embed_batch(items: list[DecodeResult], embedders: dict[Space, Embedder]) -> EmbeddedBatch:
    """Embed the decoded images of ``items`` in every space; pixels are dropped afterwards."""
    decoded = [item for item in items if isinstance(item, DecodedImage)]
    embeddings = {}
    if decoded:
        pixels = np.stack([item.pixels for item in decoded])
        embeddings = {s: np.ascontiguousarray(e(pixels), dtype=np.float32) for s, e in embedders.items()}
    light = [
        replace(item, pixels=np.empty((0, 0, 3), np.uint8)) if isinstance(item, DecodedImage) else item
        for item in items
    ]
    return EmbeddedBatch(light, embeddings)


class LocalEngine:
    """Everything in this process: decoding threads (``workers``) and compute threads."""

    name = "local"

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def embedded_batches(
        self, roots, size: int, embedders: dict[Space, Embedder], weights: dict, settings: RunSettings
    ) -> Iterator[EmbeddedBatch]:
        backbone = any(space.needs_backbone for space in embedders)
        for batch in decode_folder(roots, size, settings, backbone=backbone):
            yield embed_batch(batch, embedders)
            settings.progress.advance(len(batch))

    def attribution_rows(self, attribution, model, index, roots, top_k: int, settings: RunSettings):
        yield from attribution.rows(roots)

    def describe(self) -> dict:
        return {"engine": self.name}


class RayEngine:
    """Runs the per-image work on Ray (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 1) -> None:
        require_extra("ray")
        self.address = address
        self.workers = workers
        self.started_here = False
        self.peak_memory_mib: list[float] = []  # of each attribution actor, after a run

    def __enter__(self) -> RayEngine:
        import ray

        if not ray.is_initialized():
            if self.address:
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise EngineError(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                self.started_here = True
        self.n_actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started_here:
            ray.shutdown()

    def describe(self) -> dict:
        return {"engine": self.name, "ray_address": self.address or "local", "actors": self.n_actors}

    def _ordered(self, submit, batches, progress) -> Iterator:
        """Submit one batch at a time, at most two per actor in flight; yield results in order."""
        window: deque = deque()
        for i, batch in enumerate(batches):
            window.append((submit(batch, i), len(batch)))
            if len(window) >= 2 * self.n_actors:
                yield self._get(window, progress)
        while window:
            yield self._get(window, progress)

    def _started(self, actors: list) -> list:
        """Wait until every actor has opened its files; a worker's refusal is raised here as itself."""
        window = deque((actor.ready.remote(), 0) for actor in actors)
        while window:
            self._get(window, SILENT)
        return actors

    @staticmethod
    def _get(window: deque, progress):
        """The oldest result; a worker's manifpt error is raised here as itself."""
        import ray

        ref, n = window.popleft()
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ManifptError):
                raise cause from None
            lines = str(exc).splitlines() or [type(exc).__name__]
            first = next((line for line in lines if "Error:" in line), lines[0])
            raise EngineError(f"a Ray worker failed: {first.strip()}") from None
        progress.advance(n)
        return result

    def embedded_batches(
        self, roots, size: int, embedders: dict[Space, Embedder], weights: dict, settings: RunSettings
    ) -> Iterator[EmbeddedBatch]:
        import ray

        expected = {space: getattr(e, "weights", None) for space, e in embedders.items()}
        Embed = ray.remote(num_cpus=1)(_EmbedActor)
        actors = self._started([Embed.remote(list(embedders), weights, size, expected) for _ in range(self.n_actors)])
        found = _listed(roots, settings)
        batches = iter_batches(found, settings.batch_for(size, any(space.needs_backbone for space in embedders)))
        limits = (settings.max_pixels, settings.max_file_bytes)
        submit = lambda batch, i: actors[i % len(actors)].embed.remote(batch, *limits)  # noqa: E731
        yield from self._ordered(submit, batches, settings.progress)

    def attribution_rows(self, attribution, model, index, roots, top_k: int, settings: RunSettings):
        import ray

        decode = ray.remote(num_cpus=0.5)(_decode_batch)
        Attribute = ray.remote(num_cpus=0.5)(_AttributeActor)
        expected = (attribution.model.sha256, attribution.index.index_hash)
        paths = (os.path.abspath(model), os.path.abspath(index))
        evidence = attribution.evidence
        actors = self._started([Attribute.remote(*paths, top_k, expected, evidence) for _ in range(self.n_actors)])
        found = _listed(roots, settings)
        size = attribution.model.image_size
        limits = (settings.max_pixels, settings.max_file_bytes)

        def submit(batch, i):
            return actors[i % len(actors)].attribute.remote(decode.remote(batch, size, *limits))

        batches = iter_batches(found, settings.batch_for(size, attribution.model.space.needs_backbone))
        for rows in self._ordered(submit, batches, settings.progress):
            yield from rows
        self.peak_memory_mib = ray.get([actor.peak_memory_mib.remote() for actor in actors])


def _listed(roots, settings: RunSettings) -> list[FoundFile]:
    """Every discovered entry, listed once by the driver; array files are refused (they are read in
    one sequential pass, which the local engine does)."""
    found = list(discover_images(roots, sniff=settings.sniff))
    arrays = [entry.path for entry in found if entry.array]
    if arrays:
        raise UsageError(
            f"array files are read by the local engine (--engine local), not on Ray: {display_path(arrays[0])}"
        )
    return found


def _decode_batch(batch: list[FoundFile], size: int, max_pixels: int, max_file_bytes: int) -> list[DecodeResult]:
    return [try_decode(found, size, max_pixels, max_file_bytes) for found in batch]


class _EmbedActor:
    """Decodes and embeds batches with embedders built once, from the driver's weights."""

    def __init__(self, spaces: Sequence[Space], weights: dict, size: int, expected: dict) -> None:
        self.spaces, self.weights, self.size, self.expected = spaces, weights, size, expected

    def ready(self) -> None:
        """Build the embedders (in a method, so that a refusal reaches the driver as itself)."""
        from .spaces import make_embedder

        self.embedders = {
            space: make_embedder(
                space, self.weights.get(space), input_policy=getattr(self.expected[space], "input", "resize")
            )
            for space in self.spaces
        }
        for space, embedder in self.embedders.items():
            if getattr(embedder, "weights", None) != self.expected[space]:
                raise MismatchError(f"a Ray worker loaded other {space.value} weights than the driver")

    def embed(self, batch: list[FoundFile], max_pixels: int, max_file_bytes: int) -> EmbeddedBatch:
        return embed_batch(_decode_batch(batch, self.size, max_pixels, max_file_bytes), self.embedders)


class _AttributeActor:
    """Opens the model and the index once, checks they are the driver's, attributes decoded batches."""

    def __init__(self, model: str, index: str, top_k: int, expected: tuple[str, str], evidence: bool) -> None:
        self.arguments = (model, index, top_k, expected, evidence)

    def ready(self) -> None:
        """Open and verify the model and index (in a method, so that a refusal reaches the driver as itself)."""
        from .attribute import Attribution

        model, index, top_k, expected, evidence = self.arguments
        self.attribution = Attribution(model, index, top_k=top_k, settings=RunSettings(threads=1), evidence=evidence)
        found = (self.attribution.model.sha256, self.attribution.index.index_hash)
        if found != expected:
            raise MismatchError(
                "a Ray worker read another model or index than the driver (SHA-256 / index_hash differ): "
                "every node must see the same files at the same paths"
            )

    def attribute(self, decoded: list[DecodeResult]):
        return self.attribution.attribute_batch(decoded)

    def peak_memory_mib(self) -> float:
        """This worker process's peak resident memory (for the README's measurements)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_engine(name: str, address: str | None = None, workers: int = 1):
    """The engine called ``name`` (``local`` or ``ray``)."""
    if name == "local":
        if address:
            raise UsageError("an address (--ray-address) goes with the ray engine (--engine ray)")
        return LocalEngine()
    if name == "ray":
        return RayEngine(address, workers)
    raise UsageError(f"unknown engine {name!r}; choose local or ray")
