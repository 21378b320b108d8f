"""PyTorch network definitions for manifpt (a leaf package: it imports nothing from manifpt_cli).

Checkpoints hold state dicts and JSON metadata, never pickled classes from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .attributors import ATTRIBUTOR_BUILDERS, Attributor, ScoredAttributor, Standardize, build_attributor
from .backbones import INPUT_POLICIES, ResNet50Embedding

__all__ = [
    "INPUT_POLICIES",
    "Attributor",
    "ResNet50Embedding",
    "ScoredAttributor",
    "Standardize",
    "create_model",
    "list_models",
]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(ATTRIBUTOR_BUILDERS)


def create_model(name: str, input_shape: Sequence[int], num_classes: int) -> Attributor:
    """Build an attributor by name for artifacts of ``input_shape`` ((C, H, W) or (D,)).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a shape the network cannot take.
    """
    if name not in ATTRIBUTOR_BUILDERS:
        raise ValueError(f"unknown attributor {name!r}; choose one of: {', '.join(list_models())}")
    return build_attributor(name, input_shape, num_classes)
