"""ONNX export of an attributor (and, for sl/ssl, of its embedding backbone), checked against PyTorch.

Files (README, "ONNX metadata"):
- ``NAME.onnx``: input ``artifact`` (batch, *input_shape) float32; outputs ``logits`` and
  calibrated ``probabilities`` (batch, n_classes), and open-set ``scores`` (batch, 4).
  metadata_props: ``manifpt`` (the full JSON model card, the checkpoint's metadata plus export
  details) and, for quick inspection, ``classes`` (JSON),
  ``space``, ``image_size``, ``index_hash``, ``manifpt_version``.
- ``NAME.backbone.onnx`` (sl/ssl only): input ``image`` (batch, 3, S, S) float32 in [0, 1];
  output ``embedding`` (batch, 2048). The model card names it and records its SHA-256.

Every export runs ONNX Runtime on sample batches (sizes 1 and 8) and fails if any output differs
from PyTorch's by more than ``tolerance`` (absolute on probabilities; relative to their scale on
open-set scores and embeddings).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ExportParityError, MismatchError, UsageError
from .formats import ONNX_METADATA_KEY, backbone_path_for, file_sha256, utc_now
from .integrity import ONNX_DIGEST_KEY, ONNX_DIGEST_PLACEHOLDER, seal_onnx
from .outputs import atomic_outputs, check_outputs
from .spaces import BackboneWeights, Space, load_backbone
from .train import load_checkpoint

DEFAULT_TOLERANCE = 1e-4
OPSET = 18


@dataclass
class ExportResult:
    path: str
    backbone_path: str | None
    max_probability_diff: float
    max_embedding_diff: float | None
    tolerance: float
    seconds: float


def _to_onnx(module, example, path: Path, input_name: str, output_names: list[str]) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        module,
        (example,),
        input_names=[input_name],
        output_names=output_names,
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    program.save(os.fspath(path), external_data=False)


def _session(path: Path):
    import onnxruntime as ort

    # From the bytes: ONNX Runtime takes a path only as UTF-8 text, and a path need not be.
    return ort.InferenceSession(Path(path).read_bytes(), providers=["CPUExecutionProvider"])


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))


def _check_backbone(module, path: Path, image_size: int, tolerance: float) -> float:
    """Largest |ORT − torch| on embeddings, relative to the embeddings' largest magnitude."""
    import torch

    rng = np.random.default_rng(0)
    session = _session(path)
    worst = 0.0
    for n in (1, 4):
        images = rng.random((n, 3, image_size, image_size), dtype=np.float32)
        with torch.inference_mode():
            expected = module(torch.from_numpy(images)).numpy()
        got = session.run(["embedding"], {"image": images})[0]
        worst = max(worst, float(np.abs(got - expected).max() / max(1e-6, np.abs(expected).max())))
    if worst > tolerance * 10:  # ResNet50's 50 layers accumulate more float32 rounding than a head
        raise ExportParityError(
            f"backbone ONNX differs from PyTorch by {worst:.2e} (relative), over {tolerance * 10:.0e}"
        )
    return worst


def _check_attributor(model, path: Path, input_shape: tuple[int, ...], tolerance: float) -> float:
    """Largest |ORT − torch| over calibrated probabilities and open-set scores (scores relative to
    their scale, as Mahalanobis distances can be large)."""
    import torch

    mean = model.standardize.mean.numpy()
    std = model.standardize.std.numpy()
    rng = np.random.default_rng(0)
    session = _session(path)
    worst = 0.0
    for n in (1, 8):
        shape = (n, *input_shape)
        sample = (mean + std * rng.standard_normal(shape)).astype(np.float32)
        with torch.inference_mode():
            _, expected, expected_scores = (t.numpy() for t in model(torch.from_numpy(sample)))
        got, got_scores = session.run(["probabilities", "scores"], {"artifact": sample})
        scale = np.maximum(np.abs(expected_scores).max(axis=0), 1.0)
        worst = max(
            worst, float(np.abs(got - expected).max()), float((np.abs(got_scores - expected_scores) / scale).max())
        )
    if worst > tolerance:
        raise ExportParityError(
            f"ONNX Runtime outputs differ from PyTorch by {worst:.2e}, over the tolerance {tolerance:.0e}"
        )
    return worst


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone_weights: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ExportResult:
    """Export a checkpoint to ``out`` (plus ``*.backbone.onnx`` for sl/ssl) and verify it.

    ``backbone_weights`` overrides where the sl/ssl weights are read from; they must be the ones the
    index was built with (checked by SHA-256). The model (and its backbone) are written together,
    sealed with a digest of the whole file (see :mod:`manifpt_cli.integrity`).

    Raises:
        ExportParityError: ONNX Runtime disagrees with PyTorch beyond ``tolerance``.
        MismatchError / WeightsNotFoundError: the backbone weights are not the index's, or missing.
    """
    import torch

    started = time.perf_counter()
    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"the ONNX model file must end in .onnx, got {out}")
    if os.fspath(checkpoint).lower().endswith(".onnx") and os.path.isfile(checkpoint):
        raise UsageError(
            f"{checkpoint} is already an ONNX model; export takes the checkpoint (.pt) from `manifpt train`"
        )
    model, metadata = load_checkpoint(checkpoint)
    input_shape = tuple(metadata["input_shape"])
    if metadata.get("space") is None:
        raise UsageError(
            f"{checkpoint} was trained on {metadata.get('input')} inputs, which no embedding space gives at "
            "attribution time; only attributors trained by `manifpt train` can be exported"
        )
    space = Space(metadata["space"])
    backbone_out = backbone_path_for(out) if space.needs_backbone else None
    outputs = [out, backbone_out] if backbone_out else [out]
    check_outputs(outputs, inputs=[checkpoint, *([backbone_weights] if backbone_weights else [])], overwrite=overwrite)
    card = {**metadata, "exported_utc": utc_now(), "exported_by": __version__, "parity_tolerance": tolerance}
    embedding_diff = None

    with atomic_outputs(outputs, overwrite=overwrite) as partials:
        if backbone_out:
            partial_backbone = partials[1]
            recorded = metadata["backbone"]
            backbone = BackboneWeights(**recorded)
            module, found = load_backbone(space, backbone_weights or backbone.load_argument, backbone.input)
            if found.sha256 != recorded["sha256"]:
                raise MismatchError(
                    f"the {space.value} weights from {found.source} are not those the model was trained with "
                    f"({recorded['source']}); pass the right file with --{space.value}-weights"
                )
            example = torch.rand(2, 3, metadata["image_size"], metadata["image_size"])
            _to_onnx(module, example, partial_backbone, "image", ["embedding"])
            _set_metadata(
                partial_backbone,
                {ONNX_METADATA_KEY: json.dumps({"role": "backbone", "space": space.value, **recorded})},
            )
            embedding_diff = _check_backbone(module, partial_backbone, metadata["image_size"], tolerance)
            card["backbone_file"] = backbone_out.name
            card["backbone_onnx_sha256"] = file_sha256(partial_backbone)

        partial_model = partials[0]
        example = torch.zeros(2, *input_shape)
        _to_onnx(model, example, partial_model, "artifact", ["logits", "probabilities", "scores"])
        probability_diff = _check_attributor(model, partial_model, input_shape, tolerance)
        card["max_probability_diff"] = probability_diff
        _set_metadata(
            partial_model,
            {
                ONNX_METADATA_KEY: json.dumps(card),
                "classes": json.dumps(metadata["classes"]),
                "space": space.value,
                "image_size": str(metadata["image_size"]),
                "index_hash": metadata["index_hash"],
                "manifpt_version": __version__,
                ONNX_DIGEST_KEY: ONNX_DIGEST_PLACEHOLDER,
            },
        )
        seal_onnx(partial_model)
    return ExportResult(
        os.fspath(out),
        os.fspath(backbone_out) if backbone_out else None,
        probability_diff,
        embedding_diff,
        tolerance,
        time.perf_counter() - started,
    )
