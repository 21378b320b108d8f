"""Attributor training: cross-entropy on one space's artifacts, best checkpoint by validation accuracy.

A checkpoint is ``{"state_dict": ..., "metadata": "<JSON>"}`` saved with ``torch.save``; it loads
with ``torch.load(weights_only=True)`` and never unpickles code. The metadata (README, "File
formats") carries everything export and attribution need: classes, space, image size, the index
hash, backbone weights, architecture and the training configuration with its history.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .artifacts import load_artifacts
from .errors import UsageError
from .formats import CHECKPOINT_FORMAT, FORMAT_VERSION, load_checkpoint_payload, provenance, save_checkpoint
from .inputs import TrainingSet, artifact_training_set, auto_candidates
from .outputs import check_outputs
from .progress import SILENT, Progress
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import Space


@dataclass
class TrainConfig:
    """Hyper-parameters (AdamW with cosine decay; recorded in the checkpoint)."""

    arch: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


@dataclass
class TrainResult:
    path: str
    metadata: dict
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best_val_accuracy(self) -> float:
        return self.metadata["training"]["val_accuracy"]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_fraction`` of every class (at least one where a class has two or more)."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = np.maximum(x.std(axis=axes, dtype=np.float64), 1e-6)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)


def _evaluate(model, x, y, batch_size: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    losses, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            losses += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    return losses / max(1, len(x)), correct / max(1, len(x))


def fit(
    data: TrainingSet,
    config: TrainConfig,
    *,
    device: str = "cpu",
    progress: Progress = SILENT,
    augment=None,
):
    """Train an attributor on ``data``; returns (model with the best weights, metadata, history).

    ``augment``, if given, maps each training batch (a tensor) to an augmented one; validation
    batches are never augmented.
    """
    import torch
    import torch.nn.functional as F

    from models import create_model

    if config.epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {config.epochs}")
    arch = config.arch or data.default_arch
    labels = data.samples.labels
    n_classes = len(data.samples.label_names)
    present = np.unique(labels)
    if len(present) < 2:
        raise UsageError(f"training needs at least two classes with samples; found {len(present)}")
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise UsageError("too few samples for a validation split: give each class at least two images")

    torch.manual_seed(config.seed)
    try:
        model = create_model(arch, data.input_shape, n_classes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inputs = data.inputs.astype(np.float32, copy=False)
    mean, std = _standardize_stats(inputs[train_idx])
    model.standardize.mean.copy_(torch.from_numpy(mean))
    model.standardize.std.copy_(torch.from_numpy(std))
    model.to(device)

    x_train = torch.from_numpy(inputs[train_idx]).to(device)
    y_train = torch.from_numpy(labels[train_idx]).to(device)
    x_val = torch.from_numpy(inputs[val_idx]).to(device)
    y_val = torch.from_numpy(labels[val_idx]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    generator = torch.Generator().manual_seed(config.seed)

    history: list[EpochStats] = []
    best_state, best = None, None
    batch_size = min(config.batch_size, len(x_train))
    progress.start(f"Training {arch} on {data.name}", config.epochs)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total_loss, correct = 0.0, 0
        # Drop a trailing batch of one: BatchNorm cannot train on a single sample.
        n_used = len(order) - (len(order) % batch_size == 1)
        for start in range(0, n_used, batch_size):
            batch = order[start : min(start + batch_size, n_used)]
            inputs = x_train[batch] if augment is None else augment(x_train[batch])
            logits = model(inputs)
            loss = F.cross_entropy(logits, y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(1) == y_train[batch]).sum())
        scheduler.step()
        val_loss, val_accuracy = _evaluate(model, x_val, y_val, 256)
        stats = EpochStats(epoch, total_loss / n_used, correct / n_used, val_loss, val_accuracy)
        history.append(stats)
        if (
            best is None
            or val_accuracy > best.val_accuracy
            or (val_accuracy == best.val_accuracy and val_loss < best.val_loss)
        ):
            best = stats
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        progress.advance(1, loss=stats.train_loss, val_acc=val_accuracy)
        progress.log(
            f"epoch {epoch:>3}/{config.epochs}  loss {stats.train_loss:.4f}  train acc {stats.train_accuracy:.3f}  "
            f"val loss {val_loss:.4f}  val acc {val_accuracy:.3f}"
        )
    model.load_state_dict(best_state)
    model.cpu().eval()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        **provenance(),
        "arch": arch,
        "input_shape": list(data.input_shape),
        "classes": list(data.samples.label_names),
        "space": data.space.value if data.space else None,
        "input": data.kind.value,
        "image_size": data.samples.image_size,
        "index_hash": data.samples.index_hash,
        "backbone": {"source": data.backbone.source, "sha256": data.backbone.sha256} if data.backbone else None,
        "training": {
            **asdict(config),
            "arch": arch,
            "best_epoch": best.epoch,
            "val_accuracy": best.val_accuracy,
            "train_size": int(len(train_idx)),
            "val_size": int(len(val_idx)),
            "history": [asdict(h) for h in history],
        },
    }
    return model, metadata, history


def load_checkpoint(path: str | os.PathLike):
    """Load an attributor checkpoint safely (``weights_only=True``); returns (model in eval mode, metadata).

    Raises:
        FormatError: the file is not a manifpt attributor checkpoint.
    """
    from models import create_model

    state, metadata = load_checkpoint_payload(path, CHECKPOINT_FORMAT)
    model = create_model(metadata["arch"], metadata["input_shape"], len(metadata["classes"]))
    model.load_state_dict(state)
    return model.eval(), metadata


def train_auto(
    artifacts_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> TrainResult:
    """``--space auto``: train on every candidate input, keep the best on the validation split only.

    Every candidate sees the same seeded train/validation split (the split depends only on the
    labels and the seed). The choice and the whole validation table go into the metadata.
    """
    started = time.perf_counter()
    check_outputs([out], inputs=[artifacts_path], overwrite=overwrite)
    config = config or TrainConfig()
    table, best = [], None
    for candidate in auto_candidates(artifacts_path):
        settings.progress.log(f"auto: trying {candidate.name}")
        model, metadata, history = fit(candidate, config, device=settings.device, progress=settings.progress)
        accuracy = metadata["training"]["val_accuracy"]
        table.append({"input": candidate.name, "arch": metadata["arch"], "val_accuracy": accuracy})
        if best is None or accuracy > best[1]["training"]["val_accuracy"]:
            best = (model, metadata, history, candidate.name)
    model, metadata, history, chosen = best
    metadata["auto"] = {"chosen": chosen, "validation": table}
    return _save(out, model, metadata, history, artifacts_path, started, overwrite)


def train_attributor(
    artifacts_path: str | os.PathLike,
    space: Space,
    out: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> TrainResult:
    """Load one space of an artifacts file, train an attributor and save the best checkpoint to ``out``."""
    started = time.perf_counter()
    check_outputs([out], inputs=[artifacts_path], overwrite=overwrite)
    data = artifact_training_set(load_artifacts(artifacts_path, space))
    model, metadata, history = fit(data, config or TrainConfig(), device=settings.device, progress=settings.progress)
    return _save(out, model, metadata, history, artifacts_path, started, overwrite)


def _save(out, model, metadata: dict, history, artifacts_path, started: float, overwrite: bool) -> TrainResult:
    metadata["training"]["artifacts_file"] = os.path.abspath(os.fspath(artifacts_path))
    save_checkpoint(out, model.state_dict(), metadata, overwrite=overwrite)
    return TrainResult(os.fspath(out), metadata, history, time.perf_counter() - started)
