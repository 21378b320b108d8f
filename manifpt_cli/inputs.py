"""What an attributor reads, built the same way at training and at attribution time.

- ``artifact``: φ(x) − φ(x*) in the model's space (ManiFPT).
- ``image``: the image itself, (3, S, S) in [0, 1] (what a raw-pixel classifier sees).
- ``image+artifact``: both stacked on the channel axis, (6, S, S), for the image spaces. Weak
  generators whose content differs from real photos are often easier to tell apart on pixels;
  subtracting the nearest real image removes that signal and adds the neighbour's structure.
- ``spectrum``: a baseline's hand-made features of the image (research only; not exportable).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from .artifacts import ArtifactSet, LabelledSamples, PixelSet, artifact_spaces, load_artifacts, load_pixels
from .spaces import BackboneWeights, Space, default_arch, pixels_to_float


class InputKind(str, Enum):
    """What an attributor's input array holds; the value is stored in checkpoints and model cards."""

    ARTIFACT = "artifact"
    IMAGE = "image"
    IMAGE_ARTIFACT = "image+artifact"
    SPECTRUM = "spectrum"


def attributor_inputs(kind: InputKind, pixels: np.ndarray, artifacts: np.ndarray) -> np.ndarray:
    """The network input for (n, S, S, 3) uint8 ``pixels`` and their (n, *shape) ``artifacts``."""
    if kind is InputKind.ARTIFACT:
        return artifacts
    if kind is InputKind.IMAGE:
        return pixels_to_float(pixels)
    if kind is InputKind.IMAGE_ARTIFACT:
        return np.concatenate([pixels_to_float(pixels), artifacts.astype(np.float32, copy=False)], axis=1)
    raise ValueError(f"{kind.value} inputs are not built from pixels and artifacts")


@dataclass
class TrainingSet:
    """What an attributor trains on: one input per labelled sample, and what those inputs are.

    ``space`` is the embedding space whose nearest real image the input needs (for ``image``, the
    space attribution still reports a manifold distance in); None for baseline inputs, which
    cannot be exported.
    """

    samples: LabelledSamples
    inputs: np.ndarray  # (n, *input_shape)
    kind: InputKind
    name: str  # how tables name it: "freq", "image+rgb", "yu19", ...
    space: Space | None = None
    backbone: BackboneWeights | None = None
    distances: np.ndarray | None = None  # (n,) distance to the nearest real image in ``space``

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def default_arch(self) -> str:
        return default_arch(self.input_shape)

    def subset(self, rows: np.ndarray) -> TrainingSet:
        distances = None if self.distances is None else self.distances[rows]
        return replace(self, samples=self.samples.subset(rows), inputs=self.inputs[rows], distances=distances)

    def without_class(self, name: str) -> TrainingSet:
        """The set without class ``name``, the other classes renumbered in order (leave-one-out)."""
        names = self.samples.label_names
        dropped = names.index(name)
        kept = self.subset(np.flatnonzero(self.samples.labels != dropped))
        labels = kept.samples.labels - (kept.samples.labels > dropped)
        remaining = [n for n in names if n != name]
        return replace(kept, samples=replace(kept.samples, labels=labels, label_names=remaining))


def artifact_training_set(data: ArtifactSet) -> TrainingSet:
    """A space's artifacts as attributor inputs (ManiFPT itself)."""
    return TrainingSet(
        data.samples, data.artifacts, InputKind.ARTIFACT, data.space.value, data.space, data.backbone, data.distances
    )


def pixel_training_set(pixels: PixelSet, kind: InputKind, name: str, inputs: np.ndarray) -> TrainingSet:
    """A training set computed from the decoded images alone (baselines)."""
    return TrainingSet(pixels.samples, inputs, kind, name)


def auto_candidates(artifacts_path) -> list[TrainingSet]:
    """Every space's artifacts, the raw image, and image+artifact for each image space."""
    spaces = artifact_spaces(artifacts_path)
    per_space = {space: load_artifacts(artifacts_path, space) for space in spaces}
    candidates = [artifact_training_set(data) for data in per_space.values()]
    image_spaces = [space for space in spaces if not space.needs_backbone]
    if image_spaces:
        pixels = load_pixels(artifacts_path).pixels
        first = per_space[image_spaces[0]]
        image = attributor_inputs(InputKind.IMAGE, pixels, first.artifacts)
        candidates.append(
            TrainingSet(first.samples, image, InputKind.IMAGE, "image", first.space, distances=first.distances)
        )
        for space in image_spaces:
            data = per_space[space]
            joint = attributor_inputs(InputKind.IMAGE_ARTIFACT, pixels, data.artifacts)
            name = f"image+{space.value}"
            candidates.append(
                TrainingSet(data.samples, joint, InputKind.IMAGE_ARTIFACT, name, space, distances=data.distances)
            )
    return candidates
