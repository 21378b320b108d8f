"""Stage 5: streaming attribution of suspect images with ONNX Runtime (no PyTorch needed).

decode (thread pool) → φ (NumPy, or the exported backbone in ONNX Runtime) → FAISS nearest real
image → artifact → ONNX attributor → one :class:`AttributionRow` per file, yielded batch by batch,
so memory does not grow with the number of suspects. A file that fails is an error row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .artifacts import compute_artifacts
from .errors import FormatError, MismatchError, UsageError
from .formats import ONNX_METADATA_KEY, file_sha256, provenance
from .images import DecodedImage, FailedImage, decode_folder, display_path
from .inputs import InputKind, attributor_inputs
from .manifold import RealIndex
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import Embedder, PixelEmbedder, Space, pixels_to_float


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FormatError(f"ONNX Runtime cannot load {path}: {exc}") from None


@dataclass
class OnnxBackboneEmbedder:
    """φ for sl/ssl from the exported backbone (``NAME.backbone.onnx``)."""

    space: Space
    session: object

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["embedding"], {"image": pixels_to_float(pixels)})[0]


class OnnxAttributor:
    """An exported attributor with its model card; ``embedder`` computes its space's φ."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise UsageError(f"no such model file: {self.path}")
        self.session = _session(self.path, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in props:
            raise FormatError(f"{self.path} has no manifpt model card; export it with `manifpt export`")
        self.card = json.loads(props[ONNX_METADATA_KEY])
        self.classes: list[str] = self.card["classes"]
        self.space = Space(self.card["space"])
        self.image_size = int(self.card["image_size"])
        self.index_hash: str = self.card["index_hash"]
        self.input_kind = InputKind(self.card.get("input", InputKind.ARTIFACT.value))
        self.sha256 = file_sha256(self.path)
        self.embedder: Embedder = PixelEmbedder(self.space)
        if self.space.needs_backbone:
            backbone = os.path.join(os.path.dirname(self.path), self.card["backbone_file"])
            if not os.path.isfile(backbone):
                raise UsageError(f"the {self.space.value} model needs its backbone file beside it: {backbone}")
            if file_sha256(backbone) != self.card["backbone_onnx_sha256"]:
                raise MismatchError(f"{backbone} is not the backbone exported with {self.path} (SHA-256 differs)")
            self.embedder = OnnxBackboneEmbedder(self.space, _session(backbone, threads))

    def predict(self, artifacts: np.ndarray) -> np.ndarray:
        """(n, *input_shape) artifacts → (n, n_classes) probabilities."""
        return self.session.run(["probabilities"], {"artifact": np.ascontiguousarray(artifacts, np.float32)})[0]

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


@dataclass
class AttributionRow:
    """One suspect file's result; ``error`` is set (and the prediction empty) when it failed."""

    path: str
    sha256: str
    predicted: str = ""
    probability: float = float("nan")
    top_k: list[tuple[str, float]] = field(default_factory=list)
    manifold_distance: float = float("nan")
    nearest_real: str = ""
    original_size: tuple[int, int] | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class Attribution:
    """An open model + index pair that attributes folders. Use as a context manager."""

    def __init__(
        self,
        model: str | os.PathLike,
        index: str | os.PathLike,
        *,
        top_k: int = 3,
        settings: RunSettings = DEFAULT_SETTINGS,
    ) -> None:
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k}")
        self.settings = settings
        self.model = OnnxAttributor(model, settings.compute_threads)
        self.index = RealIndex(index)
        try:
            self.model.check_index(self.index)
        except Exception:
            self.index.close()
            raise
        self.top_k = min(top_k, len(self.model.classes))

    def __enter__(self) -> Attribution:
        return self

    def __exit__(self, *exc) -> None:
        self.index.close()

    def header(self, roots: Sequence[str | os.PathLike]) -> dict:
        """Provenance for the report: what was run, on what, with which model and index."""
        return {
            **provenance(),
            "model": os.path.abspath(self.model.path),
            "model_sha256": self.model.sha256,
            "index": os.path.abspath(self.index.path),
            "index_hash": self.index.index_hash,
            "space": self.model.space.value,
            "image_size": self.model.image_size,
            "classes": self.model.classes,
            "suspects": [display_path(os.path.abspath(root)) for root in roots],
        }

    def rows(self, roots: Sequence[str | os.PathLike]) -> Iterator[AttributionRow]:
        """Attribute every image under ``roots``, in discovery order, one row per file."""
        space = self.model.space
        embedders = {space: self.model.embedder}
        for batch in decode_folder(roots, self.model.image_size, self.settings):
            decoded = [item for item in batch if isinstance(item, DecodedImage)]
            results: dict[int, AttributionRow] = {}
            if decoded:
                shas = [item.sha256 for item in decoded]
                pixels = np.stack([d.pixels for d in decoded])
                found = compute_artifacts(self.index, embedders, pixels, shas)[space]
                inputs = attributor_inputs(self.model.input_kind, pixels, found.artifacts)
                has_neighbour = found.neighbours.ids >= 0
                probabilities = np.full((len(decoded), len(self.model.classes)), np.nan, np.float32)
                if has_neighbour.any():
                    probabilities[has_neighbour] = self.model.predict(inputs[has_neighbour])
                nearest = self.index.paths(found.neighbours.ids)
                for i, item in enumerate(decoded):
                    row = AttributionRow(display_path(item.path), item.sha256, original_size=item.original_size)
                    if not has_neighbour[i]:
                        row.error = "no real neighbour in the index other than the image itself"
                    else:
                        order = np.argsort(-probabilities[i])[: self.top_k]
                        row.top_k = [(self.model.classes[j], float(probabilities[i, j])) for j in order]
                        row.predicted, row.probability = row.top_k[0]
                        row.manifold_distance = float(found.neighbours.distances[i])
                        row.nearest_real = nearest[i]
                    results[id(item)] = row
            for item in batch:
                if isinstance(item, FailedImage):
                    yield AttributionRow(display_path(item.path), item.sha256, error=item.error)
                else:
                    yield results[id(item)]
            self.settings.progress.advance(len(batch))
