"""What an attributor reads, built the same way at training and at attribution time.

- ``artifact``: φ(x) − φ(x*) in the model's space (ManiFPT).
- ``image``: the image itself, (3, S, S) in [0, 1] (what a raw-pixel classifier sees).
- ``image+artifact``: both stacked on the channel axis, (6, S, S), for the image spaces. Weak
  generators whose content differs from real photos are often easier to tell apart on pixels;
  subtracting the nearest real image removes that signal and adds the neighbour's structure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .artifacts import ArtifactSet, load_artifacts, load_samples
from .errors import UsageError
from .spaces import Space, pixels_to_float

INPUT_KINDS = ("artifact", "image", "image+artifact")


def attributor_inputs(kind: str, pixels: np.ndarray, artifacts: np.ndarray) -> np.ndarray:
    """The network input for (n, S, S, 3) uint8 ``pixels`` and their (n, *shape) ``artifacts``."""
    if kind == "artifact":
        return artifacts
    if kind == "image":
        return pixels_to_float(pixels)
    if kind == "image+artifact":
        return np.concatenate([pixels_to_float(pixels), artifacts.astype(np.float32, copy=False)], axis=1)
    raise UsageError(f"unknown attributor input {kind!r}; known: {', '.join(INPUT_KINDS)}")


@dataclass
class Candidate:
    """One input ``--space auto`` tries: its name, kind, the space whose neighbour it needs, and data."""

    name: str
    kind: str
    space: Space
    data: ArtifactSet


def auto_candidates(artifacts_path, spaces: list[Space]) -> list[Candidate]:
    """Every space's artifacts, the raw image, and image+artifact for each image space."""
    candidates = [Candidate(space.value, "artifact", space, load_artifacts(artifacts_path, space)) for space in spaces]
    image_spaces = [space for space in spaces if not space.needs_backbone]
    if image_spaces:
        pixels = load_samples(artifacts_path).artifacts
        first = candidates[spaces.index(image_spaces[0])].data
        candidates.append(Candidate("image", "image", image_spaces[0], replace(first, artifacts=attributor_inputs("image", pixels, first.artifacts))))
        for space in image_spaces:
            base = candidates[spaces.index(space)].data
            joint = attributor_inputs("image+artifact", pixels, base.artifacts)
            candidates.append(Candidate(f"image+{space.value}", "image+artifact", space, replace(base, artifacts=joint)))
    return candidates
