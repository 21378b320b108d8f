"""Add a source to a trained attributor from a few samples, without retraining the network.

The attributor's feature extractor and the old classes' rows of its last layer stay frozen. A row
per new class (starting from the class's mean feature direction) is fitted with class-balanced
cross-entropy on the penultimate features the checkpoint keeps: up to 256 training features per
old class, plus the new samples. Calibration and open-set thresholds are then fitted again, as at
training time, on the checkpoint's validation features and a held-out part of the new samples, so
they stay valid for the new class list. The model card lists every enrolment.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .artifacts import compute_artifacts, index_embedders
from .errors import MismatchError, UsageError
from .formats import backbone_path_for, save_checkpoint, utc_now
from .images import FailedImage, count_images, decode_folder, display_path, split_batch
from .inputs import InputKind, attributor_inputs
from .manifold import RealIndex
from .openset import batched_outputs, calibrate
from .outputs import atomic_output, check_outputs
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import Space

HEAD_STEPS = 300
HELD_OUT_SHARE = 0.3  # of each new class's samples, for calibration and thresholds


@dataclass
class NewSource:
    """A source to enrol: the attributor inputs of its samples and their manifold distances."""

    name: str
    inputs: np.ndarray
    distances: np.ndarray
    folder: str = ""
    failures: list[FailedImage] = field(default_factory=list)  # its files that gave no sample


def _held_out(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of n samples: at least one on each side."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(max(1, int(round(n * HELD_OUT_SHARE))), n - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _fit_new_rows(old_weight, old_bias, new_weight, new_bias, features: np.ndarray, labels: np.ndarray, seed: int):
    """Rows of the last layer for the new classes, fitted on frozen features with the old rows fixed
    (class-balanced cross-entropy over every class, full batch, AdamW). The old classes keep their
    decisions among themselves; only the new classes compete with them."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x = torch.from_numpy(features.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    n_classes = old_weight.shape[0] + new_weight.shape[0]
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = torch.from_numpy((len(labels) / (n_classes * np.maximum(counts, 1))).astype(np.float32))
    weight = torch.nn.Parameter(new_weight.clone())
    bias = torch.nn.Parameter(new_bias.clone())
    optimizer = torch.optim.AdamW([weight, bias], lr=1e-2, weight_decay=1e-4)
    for _ in range(HEAD_STEPS):
        logits = x @ torch.cat([old_weight, weight]).T + torch.cat([old_bias, bias])
        loss = F.cross_entropy(logits, y, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return torch.cat([old_weight, weight.detach()]), torch.cat([old_bias, bias.detach()])


def enroll_sources(model, metadata: dict, sources: Sequence[NewSource], *, seed: int = 0):
    """A new (scored model, metadata) whose classes are the old ones plus ``sources``."""
    import torch

    from models import ScoredAttributor

    old_classes = list(metadata["classes"])
    clash = [s.name for s in sources if s.name in old_classes] + [
        s.name for i, s in enumerate(sources) if s.name in [t.name for t in sources[:i]]
    ]
    if clash:
        raise UsageError(f"already a class of the model, or given twice: {', '.join(sorted(set(clash)))}")
    small = [f"{s.name} ({len(s.inputs)})" for s in sources if len(s.inputs) < 2]
    if small:
        raise UsageError(f"enrolment needs at least two samples per source: {', '.join(small)}")
    classes = old_classes + [s.name for s in sources]
    bank, bank_labels = model.bank.numpy(), model.bank_labels.numpy()
    val_features, val_labels = model.val_features.numpy(), model.val_labels.numpy()
    val_distances = model.val_distances.numpy().astype(np.float64)
    fit_features, fit_labels, fit_distances = [bank], [bank_labels], []
    held_features, held_labels, held_distances = [val_features], [val_labels], [val_distances]
    for offset, source in enumerate(sources):
        label = len(old_classes) + offset
        _, features = batched_outputs(model, source.inputs)
        fit_rows, held_rows = _held_out(len(features), seed + offset)
        fit_features.append(features[fit_rows])
        fit_labels.append(np.full(len(fit_rows), label))
        fit_distances.append(source.distances[fit_rows])
        held_features.append(features[held_rows])
        held_labels.append(np.full(len(held_rows), label))
        held_distances.append(source.distances[held_rows])
    train_features, train_labels = np.concatenate(fit_features), np.concatenate(fit_labels)

    old_head = model.attributor.head
    norm = old_head.weight.norm(dim=1).mean()
    new_rows = []
    for label in range(len(old_classes), len(classes)):
        direction = torch.from_numpy(train_features[train_labels == label].mean(axis=0).astype(np.float32))
        new_rows.append(direction / direction.norm().clamp_min(1e-12) * norm)
    old_weight, old_bias = old_head.weight.detach(), old_head.bias.detach()
    new_bias = old_bias.mean().repeat(len(new_rows))
    weight, bias = _fit_new_rows(
        old_weight, old_bias, torch.stack(new_rows), new_bias, train_features, train_labels, seed
    )

    attributor = model.attributor
    attributor.head = torch.nn.Linear(weight.shape[1], len(classes))
    attributor.head.weight.data.copy_(weight)
    attributor.head.bias.data.copy_(bias)
    scored = ScoredAttributor(attributor, len(classes), bank_size=1, val_size=1, knn_k=1).eval()
    features = np.concatenate(held_features)
    with torch.inference_mode():
        logits = attributor.head(torch.from_numpy(features.astype(np.float32))).numpy()
    fitted = calibrate(
        scored,
        train_features,
        train_labels,
        logits,
        features,
        np.concatenate(held_labels),
        np.concatenate(held_distances),
        np.concatenate(fit_distances),
        score=metadata["open_set"]["score"],
        target_fpr=metadata["open_set"]["target_fpr"],
        seed=seed,
    )
    # The trained model's own distances are not kept: its reference stands, raised where the new
    # sources lie farther (a percentile of its validation split and the new samples alone would
    # flag more of its training images than the 0.5 % the note promises).
    enrolled = np.percentile(np.concatenate([*fit_distances, *held_distances[1:]]), 99.5)
    fitted = dataclasses.replace(
        fitted, manifold_reference=max(float(metadata["manifold_reference"]["distance"]), float(enrolled))
    )
    enrolments = list(metadata.get("enrolments", []))
    enrolments.append(
        {
            "utc": utc_now(),
            "sources": [
                {"name": s.name, "samples": int(len(s.inputs)), "folder": display_path(s.folder)} for s in sources
            ],
            "method": f"a last-layer row per new class on frozen features, old rows fixed ({HEAD_STEPS} AdamW "
            "steps, class-balanced); "
            f"{HELD_OUT_SHARE:.0%} of each new source held out for calibration and thresholds",
            "previous_classes": old_classes,
        }
    )
    new_metadata = {
        **metadata,
        "classes": classes,
        **fitted.card(),
        "buffers": {"bank_size": int(len(scored.bank)), "val_size": int(len(scored.val_labels)), "knn_k": scored.knn_k},
        "enrolments": enrolments,
    }
    new_metadata.pop("digest", None)
    return scored, new_metadata


@dataclass
class EnrollResult:
    checkpoint: str
    model: str
    classes: list[str]
    counts: dict[str, int]
    seconds: float
    failures: list[tuple[str, FailedImage]] = field(default_factory=list)  # (source, file) not enrolled


def load_sources(
    index_path: str | os.PathLike,
    metadata: dict,
    folders: Sequence[tuple[str, str]],
    *,
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
) -> list[NewSource]:
    """Decode each folder and make its attributor inputs against the model's own index."""
    space, kind = Space(metadata["space"]), InputKind(metadata["input"])
    sources = []
    with RealIndex(index_path, verify=[space], searching=[space]) as index:
        if index.index_hash != metadata["index_hash"]:
            raise MismatchError(f"{index_path} is not the index the model was trained against (index hash differs)")
        embedder = index_embedders(index, [space], weights, settings.device)[space]
        for name, folder in folders:
            if count_images([folder], sniff=settings.sniff) == 0:
                raise UsageError(f"no image files in {display_path(folder)}")
            inputs, distances, failures = [], [], []
            for batch in decode_folder([folder], index.image_size, settings, backbone=space.needs_backbone):
                decoded, failed, _ = split_batch(batch)  # files that are not images are skipped, as everywhere
                failures.extend(failed)
                if not decoded:
                    continue
                pixels = np.stack([d.pixels for d in decoded])
                found = compute_artifacts(index, {space: embedder}, pixels, [d.sha256 for d in decoded])[space]
                ok = found.neighbours.ids >= 0
                failures.extend(
                    FailedImage(d.path, "no real neighbour other than itself", d.sha256)
                    for d, has in zip(decoded, ok)
                    if not has
                )
                inputs.append(attributor_inputs(kind, pixels[ok], found.artifacts[ok]))
                distances.append(found.neighbours.distances[ok].astype(np.float64))
            if not inputs:
                raise UsageError(f"no image in {display_path(folder)} could be decoded")
            sources.append(NewSource(name, np.concatenate(inputs), np.concatenate(distances), folder, failures))
    return sources


def enroll(
    checkpoint: str | os.PathLike,
    index_path: str | os.PathLike,
    folders: Sequence[tuple[str, str]],
    out: str | os.PathLike,
    *,
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    seed: int = 0,
    overwrite: bool = False,
) -> EnrollResult:
    """Enrol ``folders`` ((name, folder) pairs) into ``checkpoint``; write ``out`` (NAME.onnx) and
    its checkpoint NAME.pt beside it, for later enrolments."""
    from .export import export_onnx
    from .train import load_checkpoint

    started = time.perf_counter()
    out = os.fspath(out)
    if not out.endswith(".onnx"):
        raise UsageError(f"the new model file must end in .onnx, got {out}")
    new_checkpoint = out.removesuffix(".onnx") + ".pt"
    model, metadata = load_checkpoint(checkpoint)
    space = Space(metadata["space"]) if metadata.get("space") else None
    outputs = [new_checkpoint, out, *([backbone_path_for(out)] if space and space.needs_backbone else [])]
    check_outputs(outputs, inputs=[checkpoint, index_path, *(folder for _, folder in folders)], overwrite=overwrite)
    sources = load_sources(index_path, metadata, folders, weights=weights, settings=settings)
    scored, new_metadata = enroll_sources(model, metadata, sources, seed=seed)
    # The checkpoint takes its name only once the model exported from it did: never one alone.
    with atomic_output(new_checkpoint, overwrite=overwrite) as partial:
        save_checkpoint(partial, scored.state_dict(), new_metadata)
        export_onnx(partial, out, backbone_weights=(weights or {}).get(space), overwrite=overwrite)
    counts = {s.name: int(len(s.inputs)) for s in sources}
    failures = [(s.name, failure) for s in sources for failure in s.failures]
    return EnrollResult(new_checkpoint, out, new_metadata["classes"], counts, time.perf_counter() - started, failures)
