"""Stage 5: streaming attribution of suspect images with ONNX Runtime (no PyTorch needed).

decode (thread pool) → φ (NumPy, or the exported backbone in ONNX Runtime) → FAISS nearest real
image → artifact → ONNX attributor → one :class:`AttributionRow` per file, yielded batch by batch,
so memory does not grow with the number of suspects. A file that fails is an error row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .artifacts import SpaceArtifacts, compute_artifacts, index_images
from .errors import FormatError, MismatchError, UsageError
from .evidence import Evidence, render_evidence
from .formats import CHECKPOINT_FORMAT, FORMAT_VERSIONS, ONNX_METADATA_KEY, describe_file, provenance, require_file
from .images import DecodedImage, DecodeResult, FailedImage, SkippedFile, decode_folder, display_path
from .inputs import InputKind, attributor_inputs
from .integrity import ONNX_DIGEST_KEY, check_plain_graph, verify_onnx
from .manifold import Neighbours, RealIndex
from .settings import DEFAULT_SETTINGS, RunSettings
from .shared_work import SharedParts
from .spaces import FEATURE_DIM, Embedder, PixelEmbedder, Space, pixels_to_float
from .verdicts import VerdictRule

SEARCH_PART = 128  # suspects searched as one part of a batch: the rgb search's block of queries
SMALLEST_PART = 64  # parts of 32 searched slower than a whole batch of 64 did (bench: 335 vs 309 µs/image)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _run(session, path: str, outputs: list[str], feed: dict) -> list[np.ndarray]:
    """``session.run``, its failures one line (ONNX Runtime raises its own exception types)."""
    try:
        return session.run(outputs, feed)
    except Exception as exc:
        raise FormatError(f"ONNX Runtime failed running {path}: {_first_line(exc)}") from None


def _check_shapes(path: str, found: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Outputs of the shapes the card implies: a graph whose output shape depends on its input
    passes the load-time check, and its rows would be wrong."""
    for name, output in found.items():
        if output.shape != expected[name]:
            raise FormatError(
                f"{path} gave {name} of shape {output.shape}, not {expected[name]}: its graph is not one "
                "`manifpt export` writes"
            )


def _session(path: str, threads: int, data: bytes | None = None):
    """An ONNX Runtime session of ``path`` (from ``data``, its bytes already read and checked, if given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data if data is not None else path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FormatError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from None


@dataclass
class OnnxBackboneEmbedder:
    """φ for sl/ssl from the exported backbone (``NAME.backbone.onnx``)."""

    space: Space
    session: object
    path: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        (embedding,) = _run(self.session, self.path, ["embedding"], {"image": pixels_to_float(pixels)})
        _check_shapes(self.path, {"embedding": embedding}, {"embedding": (len(pixels), FEATURE_DIM)})
        return embedding


class OnnxAttributor:
    """An exported attributor with its model card; ``embedder`` computes its space's φ."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        """Load and verify an exported model: its digest, its card, and the card against the graph.

        Raises:
            UsageError: no such file, or a file of another kind (the message says which).
            FormatError: not a manifpt model, damaged, or altered since export (IntegrityError).
        """
        self.path = os.fspath(path)
        require_file(self.path, "model")
        kind = describe_file(self.path)
        if not kind.startswith(("an ONNX", "not a file")):
            raise UsageError(
                f"{self.path} is {kind}, not an ONNX model; attribute takes the .onnx from `manifpt export`"
            )
        with open(self.path, "rb") as handle:
            data = handle.read()
        self.digest = verify_onnx(self.path, data)  # before any parser sees the bytes
        check_plain_graph(self.path, data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.session = _session(self.path, threads, data)
        props = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in props or props.get(ONNX_DIGEST_KEY) != self.digest:
            raise FormatError(f"{self.path} has no manifpt model card; export it with `manifpt export`")
        try:
            self.card = json.loads(props[ONNX_METADATA_KEY])
            self.classes: list[str] = list(self.card["classes"])
            self.space = Space(self.card["space"])
            self.image_size = int(self.card["image_size"])
            self.index_hash: str = str(self.card["index_hash"])
            self.input_kind = InputKind(self.card.get("input", InputKind.ARTIFACT.value))
            input_shape = [int(d) for d in self.card["input_shape"]]
            version = self.card.get("format_version")
            if version != FORMAT_VERSIONS[CHECKPOINT_FORMAT]:
                raise FormatError(
                    f"{self.path} is a model of format version {version}; this manifpt reads version "
                    f"{FORMAT_VERSIONS[CHECKPOINT_FORMAT]} (calibrated, with open-set thresholds). "
                    "Train and export it again with this version."
                )
            self.rule = VerdictRule(self.card)
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{self.path} has a damaged model card ({type(exc).__name__}: {exc})") from None
        self._check_graph(input_shape)
        self.embedder: Embedder = PixelEmbedder(self.space)
        if self.space.needs_backbone:
            backbone = self.backbone_path
            if not os.path.isfile(backbone):
                raise UsageError(f"the {self.space.value} model needs its backbone file beside it: {backbone}")
            with open(backbone, "rb") as handle:
                data = handle.read()  # hashed and loaded from the same bytes
            if hashlib.sha256(data).hexdigest() != self.card.get("backbone_onnx_sha256"):
                raise MismatchError(f"{backbone} is not the backbone exported with {self.path} (SHA-256 differs)")
            check_plain_graph(backbone, data)
            self.embedder = OnnxBackboneEmbedder(self.space, _session(backbone, threads, data), backbone)

    @property
    def backbone_path(self) -> str | None:
        """Where the sl/ssl backbone exported with this model lives (None for rgb/freq)."""
        name = self.card.get("backbone_file")
        if not self.space.needs_backbone:
            return None
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise FormatError(f"{self.path} has a damaged model card (backbone_file {name!r})")
        return os.path.join(os.path.dirname(self.path), name)

    def _check_graph(self, input_shape: list[int]) -> None:
        """The card must describe the graph: its input shape and its number of classes."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        problems = []
        if "artifact" not in inputs or list(inputs["artifact"][1:]) != input_shape:
            problems.append(f"the graph's input {inputs} is not the card's {input_shape}")
        if "probabilities" not in outputs or outputs["probabilities"][-1] != len(self.classes):
            problems.append(f"the graph's outputs {outputs} do not give the card's {len(self.classes)} classes")
        if "scores" not in outputs or outputs["scores"][-1] != len(self.rule.graph_scores):
            problems.append(f"the graph's outputs {outputs} do not give the card's scores {self.rule.graph_scores}")
        if problems:
            raise FormatError(f"{self.path}: the model card does not match the model ({'; '.join(problems)})")

    def predict(self, artifacts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, *input_shape) inputs → ((n, n_classes) calibrated probabilities, (n, 4) open-set
        scores, (n, n_classes) logits). The logits rank the classes where float32 probabilities
        cannot: below about 1e-45 every one is 0 (a sharp temperature gets there).

        Raises:
            FormatError: ONNX Runtime failed, or the outputs are not of those shapes (a graph whose
                output shape depends on its input passes the load-time check; its rows would be wrong).
        """
        feed = {"artifact": np.ascontiguousarray(artifacts, np.float32)}
        logits, probabilities, scores = _run(self.session, self.path, ["logits", "probabilities", "scores"], feed)
        n, classes = len(artifacts), len(self.classes)
        _check_shapes(
            self.path,
            {"logits": logits, "probabilities": probabilities, "scores": scores},
            {"logits": (n, classes), "probabilities": (n, classes), "scores": (n, len(self.rule.graph_scores))},
        )
        return probabilities, scores, logits

    def check_index(self, index: RealIndex) -> None:
        """Refuse an index that is not the one this model was trained against."""
        problems = []
        if index.index_hash != self.index_hash:
            problems.append(f"index hash {index.index_hash[:12]}… ≠ the model's {self.index_hash[:12]}…")
        if index.image_size != self.image_size:
            problems.append(f"image size {index.image_size} ≠ the model's {self.image_size}")
        if self.space not in index.spaces:
            problems.append(f"the index has no {self.space.value!r} space")
        if problems:
            raise MismatchError(
                f"model {self.path} was not trained on index {index.path}: {'; '.join(problems)}. "
                "Use the index the model's artifacts were extracted with."
            )


CARD_KEYS = (
    "arch",
    "space",
    "input",
    "classes",
    "image_size",
    "has_real_class",
    "calibration",
    "open_set",
    "manifold_reference",
    "auto",
    "enrolments",
    "exported_utc",
)


def report_model_fields(model: OnnxAttributor) -> dict:
    """What a report's header says of its model, from the verified model itself (``manifpt
    verify`` compares a header with it: the report's digest covers its rows only)."""
    return {
        "space": model.space.value,
        "image_size": model.image_size,
        "classes": model.classes,
        "calibration": model.card["calibration"],
        "model_card": model_card_summary(model.card),
        "verdict_rule": model.rule.describe(),
    }


def model_card_summary(card: dict) -> dict:
    """The model card as a report shows it: what it knows, how it was trained, validated and calibrated
    (the per-epoch history stays in the model)."""
    summary = {key: card[key] for key in CARD_KEYS if key in card}
    summary["training"] = {k: v for k, v in (card.get("training") or {}).items() if k != "history"}
    return summary


def library_versions() -> dict[str, str]:
    """Versions of manifpt and of the libraries that shape a row."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"manifpt": __version__, "python": platform.python_version()}
    for name in ("numpy", "pillow", "h5py", "faiss-cpu", "onnxruntime"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions


@dataclass
class AttributionRow:
    """One suspect file's result; ``error`` says why (and the prediction is empty) when it failed or
    was skipped."""

    path: str
    sha256: str
    predicted: str = ""
    probability: float = float("nan")
    top_k: list[tuple[str, float]] = field(default_factory=list)
    manifold_distance: float = float("nan")
    nearest_real: str = ""
    original_size: tuple[int, int] | None = None
    verdict: str = ""
    open_set_score: float = float("nan")
    notes: list[str] = field(default_factory=list)
    error: str = ""
    skipped: bool = False
    evidence: Evidence | None = None  # pictures for the HTML case report, when asked for

    @property
    def status(self) -> str:
        """``ok``, ``error`` (could not be attributed) or ``skipped`` (not taken for an image)."""
        return "skipped" if self.skipped else "error" if self.error else "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class SearchedBatch:
    """A decoded batch with its suspects' nearest real images and attributor inputs (if any
    decoded) and, once :meth:`Attribution.predicted`, the attributor's outputs for them (NaN where a
    suspect has no neighbour)."""

    batch: Sequence[DecodeResult]
    decoded: list[DecodedImage]
    found: SpaceArtifacts | None = None
    inputs: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    scores: np.ndarray | None = None
    logits: np.ndarray | None = None

    @classmethod
    def joined(cls, parts: Sequence[SearchedBatch]) -> SearchedBatch:
        """One batch from its consecutive parts, searched apart (not yet predicted), in order."""
        if len(parts) == 1:
            return parts[0]
        batch = [item for part in parts for item in part.batch]
        decoded = [item for part in parts for item in part.decoded]
        searched = [part for part in parts if part.found is not None]
        if not searched:
            return cls(batch, decoded)
        neighbours = Neighbours(
            np.concatenate([part.found.neighbours.ids for part in searched]),
            np.concatenate([part.found.neighbours.distances for part in searched]),
        )
        found = SpaceArtifacts(np.concatenate([part.found.artifacts for part in searched]), neighbours)
        return cls(batch, decoded, found, np.concatenate([part.inputs for part in searched]))


class Attribution:
    """An open model + index pair that attributes folders. Use as a context manager."""

    def __init__(
        self,
        model: str | os.PathLike,
        index: str | os.PathLike,
        *,
        top_k: int = 3,
        settings: RunSettings = DEFAULT_SETTINGS,
        evidence: bool = False,
    ) -> None:
        """``evidence``: render each row's pictures (:mod:`manifpt_cli.evidence`) for a case report."""
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k}")
        self.settings = settings
        self.model = OnnxAttributor(model, settings.compute_threads)
        space = self.model.space
        self.index = RealIndex(index, verify=[space], threads=settings.compute_threads, searching=[space])
        try:
            self.model.check_index(self.index)
        except Exception:
            self.index.close()
            raise
        self.top_k = min(top_k, len(self.model.classes))
        self.evidence = evidence

    def __enter__(self) -> Attribution:
        return self

    def __exit__(self, *exc) -> None:
        self.index.close()

    def header(self, roots: Sequence[str | os.PathLike]) -> dict:
        """Provenance for the report: what was run, on what, with which model and index, what the
        integrity checks found, and every setting and library version that can change a row."""
        space = self.model.space
        settings = self.settings
        return {
            **provenance(),
            "model": display_path(os.path.abspath(self.model.path)),
            "model_sha256": self.model.sha256,
            "index": display_path(os.path.abspath(self.index.path)),
            "index_hash": self.index.index_hash,
            **report_model_fields(self.model),
            "suspects": [display_path(os.path.abspath(root)) for root in roots],
            "verification": {
                "model": {"digest": self.model.digest, "result": "matches the digest sealed at export"},
                "index": {**self.index.verification, "result": "matches its index_hash"},
            },
            "search": self.index.search_description(space),
            "settings": {
                "top_k": self.top_k,
                "batch_size": settings.batch_for(self.model.image_size, space.needs_backbone),
                "workers": settings.workers,
                "threads": settings.compute_threads,
                "max_pixels": settings.max_pixels,
                "max_file_bytes": settings.max_file_bytes,
                "sniff": settings.sniff,
            },
            "versions": library_versions(),
        }

    def rows(self, roots: Sequence[str | os.PathLike]) -> Iterator[AttributionRow]:
        """Attribute every image under ``roots``, in discovery order, one row per file.

        Two busy threads, the cores that ``workers`` + ``threads`` give: the read-ahead thread
        decodes each batch and searches it while this one runs the attributor on the batch
        before. The search runs in parts of up to ``SEARCH_PART`` suspects (:class:`SharedParts`), and
        this thread takes the parts not yet begun when it reaches the batch, so it does not wait
        idle while the other searches (the rows do not depend on how a batch is split).
        """
        model = self.model
        batches = decode_folder(
            roots, model.image_size, self.settings, then=self._search_parts, backbone=model.space.needs_backbone
        )
        for shared in batches:
            searched = SearchedBatch.joined(shared.results())
            yield from self.finish_batch(self.predicted(searched))
            self.settings.progress.advance(len(searched.batch))

    def _search_parts(self, batch: Sequence[DecodeResult]) -> SharedParts[SearchedBatch]:
        """:meth:`search_batch` of consecutive items, as parts two threads share: at most
        ``SEARCH_PART`` each, two at least where a batch holds two of ``SMALLEST_PART`` (smaller
        batches are searched whole: parts of 32 searched slower than whole batches of 64)."""
        size = max(SMALLEST_PART, min(SEARCH_PART, -(-len(batch) // 2)))
        starts = range(0, len(batch), size)
        return SharedParts([functools.partial(self.search_batch, batch[i : i + size]) for i in starts])

    def attribute_batch(self, batch: Sequence[DecodeResult]) -> list[AttributionRow]:
        """One row per item of a decoded batch, in its order (every engine goes through here)."""
        return self.finish_batch(self.predicted(self.search_batch(batch)))

    def search_batch(self, batch: Sequence[DecodeResult]) -> SearchedBatch:
        """A batch's nearest real images and artifacts: the part of attribution before the attributor."""
        decoded = [item for item in batch if isinstance(item, DecodedImage)]
        if not decoded:
            return SearchedBatch(batch, decoded)
        pixels = np.stack([d.pixels for d in decoded])
        found = compute_artifacts(
            self.index, {self.model.space: self.model.embedder}, pixels, [d.sha256 for d in decoded]
        )
        found = found[self.model.space]
        return SearchedBatch(batch, decoded, found, attributor_inputs(self.model.input_kind, pixels, found.artifacts))

    def predicted(self, searched: SearchedBatch) -> SearchedBatch:
        """``searched`` with the attributor's probabilities and open-set scores for its suspects
        that have a neighbour (NaN for the others): the attributor stage alone."""
        if not searched.decoded:
            return searched
        has_neighbour = searched.found.neighbours.ids >= 0
        probabilities = np.full((len(searched.decoded), len(self.model.classes)), np.nan, np.float32)
        logits = probabilities.copy()
        scores = np.full((len(searched.decoded), len(self.model.rule.graph_scores)), np.nan, np.float32)
        if has_neighbour.any():
            outputs = self.model.predict(searched.inputs[has_neighbour])
            probabilities[has_neighbour], scores[has_neighbour], logits[has_neighbour] = outputs
        return dataclasses.replace(searched, probabilities=probabilities, scores=scores, logits=logits)

    def finish_batch(self, searched: SearchedBatch) -> list[AttributionRow]:
        """One row per item of a :meth:`predicted` batch, in its order: verdicts, paths, evidence."""
        decoded, found = searched.decoded, searched.found
        if decoded and searched.probabilities is None:
            raise ValueError("finish_batch takes a batch that Attribution.predicted returned")
        results: dict[int, AttributionRow] = {}
        if decoded:
            has_neighbour = found.neighbours.ids >= 0
            probabilities, scores = searched.probabilities, searched.scores
            nearest = self.index.paths(found.neighbours.ids)
            pictures = self._evidence(decoded, found) if self.evidence else {}
            for i, item in enumerate(decoded):
                row = AttributionRow(display_path(item.path), item.sha256, original_size=item.original_size)
                if not has_neighbour[i]:
                    row.error = "no real neighbour in the index other than the image itself"
                elif not np.isfinite(probabilities[i]).all():
                    row.error = "the model gave non-finite probabilities (NaN or infinity) for this image"
                else:
                    # By logit, the probabilities' own order where they do not underflow; ties: class order
                    order = np.argsort(-searched.logits[i], kind="stable")[: self.top_k]
                    row.top_k = [(self.model.classes[j], float(probabilities[i, j])) for j in order]
                    row.predicted, row.probability = row.top_k[0]
                    row.manifold_distance = float(found.neighbours.distances[i])
                    row.nearest_real = nearest[i]
                    rule = self.model.rule
                    notes = rule.notes(item.original_size, item.jpeg_quality, row.manifold_distance)
                    row.open_set_score = rule.score_of(scores[i], row.manifold_distance)
                    row.verdict = rule.decide(row.predicted, row.open_set_score, notes)
                    row.notes = [str(note) for note in notes]
                    row.evidence = pictures.get(i)
                results[id(item)] = row
        rows = []
        for item in searched.batch:
            if isinstance(item, FailedImage):
                rows.append(AttributionRow(display_path(item.path), item.sha256, error=item.error))
            elif isinstance(item, SkippedFile):
                rows.append(AttributionRow(display_path(item.path), "", error=item.reason, skipped=True))
            else:
                rows.append(results[id(item)])
        return rows

    def _evidence(self, decoded: Sequence[DecodedImage], found) -> dict[int, Evidence]:
        """Pictures for each decoded suspect that has a neighbour, by its position in ``decoded``."""
        with_neighbour = np.flatnonzero(found.neighbours.ids >= 0)
        reals = index_images(self.index, found.neighbours.ids[with_neighbour], self.settings)
        pictures = {}
        for i, real in zip(with_neighbour, reals):
            nearest = real.error if isinstance(real, FailedImage) else real.pixels
            pictures[i] = render_evidence(self.model.space, decoded[i].pixels, nearest, found.artifacts[i])
        return pictures
