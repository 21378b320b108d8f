"""Attributor training: cross-entropy on one space's artifacts, best checkpoint by validation accuracy.

A checkpoint is ``{"state_dict": ..., "metadata": "<JSON>"}`` saved with ``torch.save``; it loads
with ``torch.load(weights_only=True)`` and never unpickles code. The metadata (README, "File
formats") carries everything export and attribution need: classes, space, image size, the index
hash, backbone weights, architecture and the training configuration with its history.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .artifacts import REAL_LABEL, artifacts_index_path, index_embedders, load_artifacts, load_pixels
from .errors import MismatchError, UsageError
from .formats import CHECKPOINT_FORMAT, FORMAT_VERSIONS, load_checkpoint_payload, provenance, save_checkpoint
from .inputs import TrainingSet, artifact_training_set, auto_candidates
from .manifold import RealIndex
from .openset import DEFAULT_SCORE, DEFAULT_TARGET_FPR, SCORES, all_scores, auroc, batched_outputs, calibrate
from .outputs import check_outputs
from .perturb import Perturbation, perturbed_set
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
    target_fpr: float = DEFAULT_TARGET_FPR
    open_set_score: str = DEFAULT_SCORE  # or "auto": chosen by leave-one-generator-out validation


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


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_fraction`` of every class (at least one where a class has two or more).

    With ``groups`` (each row's file SHA-256), a class's rows of one group stay on one side: copies
    of a file on both would let validation see what training saw. Rows all of their own group
    split as without ``groups``.
    """
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    # A row with no digest recorded ("") is a group of its own.
    keys = np.array([g or f"\0{i}" for i, g in enumerate(groups)]) if groups is not None else np.arange(len(labels))
    train, val = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        _, first, which = np.unique(keys[rows], return_index=True, return_inverse=True)
        groups = np.argsort(first)  # the class's groups in the order their first rows come
        n_val = int(round(len(groups) * val_fraction))
        n_val = min(max(n_val, 1 if len(groups) > 1 else 0), len(groups) - 1)
        # Permuted as the rows themselves were where every group is one row: the same split then.
        side = np.isin(which, rng.permutation(groups)[:n_val])
        val.extend(rows[side])
        train.extend(rows[~side])
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
    copies: PerturbedCopies | None = None,
    initialise=None,
):
    """Train an attributor on ``data``; returns (scored model with the best weights, metadata, history).

    The model is a :class:`models.ScoredAttributor`: calibrated, with its open-set statistics and
    thresholds fitted on the validation split (:mod:`manifpt_cli.openset`). ``augment``, if given,
    maps each training batch (a tensor) to an augmented one; validation batches are never
    augmented. ``copies`` are perturbed copies of ``data``'s images (``train --augment``): each
    goes to the side of the split its original is on, so no copy of a validation image trains.
    ``initialise``, if given, sets the new network's starting weights (a baseline's pretraining).
    """
    import torch
    import torch.nn.functional as F

    from models import ScoredAttributor, create_model

    if config.epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {config.epochs}")
    if config.open_set_score == "auto":
        raise UsageError("fit takes a named open-set score; choose it first (train.select_score)")
    arch = config.arch or data.default_arch
    labels = data.samples.labels
    n_classes = len(data.samples.label_names)
    present = np.unique(labels)
    if len(present) < 2:
        raise UsageError(f"training needs at least two classes with samples; found {len(present)}")
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed, data.samples.sha256)
    if len(val_idx) == 0:
        raise UsageError("too few samples for a validation split: give each class at least two images")

    torch.manual_seed(config.seed)
    try:
        model = create_model(arch, data.input_shape, n_classes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if initialise is not None:
        initialise(model)
    sides = _split_sides(data, train_idx, val_idx, copies)
    (train_inputs, train_labels, train_distances), (val_inputs, val_labels, val_distances) = sides
    mean, std = _standardize_stats(train_inputs)
    model.standardize.mean.copy_(torch.from_numpy(mean))
    model.standardize.std.copy_(torch.from_numpy(std))
    model.to(device)

    x_train = torch.from_numpy(train_inputs).to(device)
    y_train = torch.from_numpy(train_labels).to(device)
    x_val = torch.from_numpy(val_inputs).to(device)
    y_val = torch.from_numpy(val_labels).to(device)
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
    del x_train, x_val
    _, train_features = batched_outputs(model, train_inputs)
    val_logits, val_features = batched_outputs(model, val_inputs)
    scored = ScoredAttributor(model, n_classes, bank_size=1, val_size=1, knn_k=1)
    open_set = calibrate(
        scored,
        train_features,
        train_labels,
        val_logits,
        val_features,
        val_labels,
        val_distances,
        train_distances,
        score=config.open_set_score,
        target_fpr=config.target_fpr,
        seed=config.seed,
    )
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSIONS[CHECKPOINT_FORMAT],
        **provenance(),
        "arch": arch,
        "input_shape": list(data.input_shape),
        "classes": list(data.samples.label_names),
        "space": data.space.value if data.space else None,
        "input": data.kind.value,
        "image_size": data.samples.image_size,
        "index_hash": data.samples.index_hash,
        "backbone": asdict(data.backbone) if data.backbone else None,
        "training": {
            **asdict(config),
            "arch": arch,
            "best_epoch": best.epoch,
            "val_accuracy": best.val_accuracy,
            "train_size": int(len(train_labels)),
            "val_size": int(len(val_labels)),
            "augmented_copies": 0 if copies is None else int(len(copies.origin)),
            "augment": [] if copies is None else copies.names,
            "history": [asdict(h) for h in history],
        },
        **open_set.card(),
        "has_real_class": REAL_LABEL in data.samples.label_names,
        "buffers": {"bank_size": int(len(scored.bank)), "val_size": int(len(scored.val_labels)), "knn_k": scored.knn_k},
    }
    return scored, metadata, history


@dataclass
class PerturbedCopies:
    """Perturbed copies of a training set's images (``train --augment``); ``origin`` are their rows."""

    data: TrainingSet
    origin: np.ndarray
    names: list[str]


def _split_sides(data: TrainingSet, train_idx, val_idx, copies: PerturbedCopies | None):
    """(inputs, labels, distances) of the training and the validation side, copies with their originals."""
    distances = data.distances if data.distances is not None else np.zeros(len(data.inputs))
    sides = []
    for rows in (train_idx, val_idx):
        inputs = [data.inputs[rows]]
        labels = [data.samples.labels[rows]]
        side_distances = [distances[rows]]
        if copies is not None:
            mine = np.flatnonzero(np.isin(copies.origin, rows))
            inputs.append(copies.data.inputs[mine])
            labels.append(copies.data.samples.labels[mine])
            side_distances.append(copies.data.distances[mine])
        sides.append(
            (
                np.concatenate(inputs).astype(np.float32, copy=False),
                np.concatenate(labels).astype(np.int64),
                np.concatenate(side_distances),
            )
        )
    return sides


def load_checkpoint(path: str | os.PathLike):
    """Load an attributor checkpoint safely (``weights_only=True``); returns (model in eval mode, metadata).

    Raises:
        FormatError: the file is not a manifpt attributor checkpoint.
    """
    from models import ScoredAttributor, create_model

    state, metadata = load_checkpoint_payload(path, CHECKPOINT_FORMAT)
    n_classes = len(metadata["classes"])
    sizes = metadata["buffers"]
    model = create_model(metadata["arch"], metadata["input_shape"], n_classes)
    scored = ScoredAttributor(model, n_classes, sizes["bank_size"], sizes["val_size"], sizes["knn_k"])
    scored.load_state_dict(state)
    return scored.eval(), metadata


def perturbed_copies(
    data: TrainingSet,
    artifacts_path: str | os.PathLike,
    perturbations: list[Perturbation],
    *,
    index_path: str | os.PathLike | None = None,
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    seed: int = 0,
) -> PerturbedCopies:
    """One perturbed copy of every image of ``data`` (a perturbation drawn at random from the list),
    its artifact searched afresh in the index the artifacts were extracted against."""
    pixels = load_pixels(artifacts_path).pixels
    rng = np.random.default_rng(seed)
    choices = [perturbations[i] for i in rng.integers(len(perturbations), size=len(pixels))]
    index_file = index_path or artifacts_index_path(artifacts_path)
    with RealIndex(index_file, verify=[data.space], searching=[data.space]) as index:
        if index.index_hash != data.samples.index_hash:
            raise MismatchError(
                f"{index.path} is not the index {artifacts_path} was extracted against (index hash differs); "
                "pass that index with --index"
            )
        embedder = index_embedders(index, [data.space], weights, settings.device)[data.space]
        settings.progress.log(f"augment: perturbing {len(pixels)} images ({', '.join(p.name for p in perturbations)})")
        copy, rows = perturbed_set(data, pixels, choices, index, embedder)
    return PerturbedCopies(copy, rows, [p.name for p in perturbations])


def select_score(data: TrainingSet, config: TrainConfig, *, folds: int = 3, settings: RunSettings = DEFAULT_SETTINGS):
    """Leave-one-generator-out choice of the open-set score (``--open-set-score auto``).

    For up to ``folds`` generators (spread over the class list), train without it, then measure how
    well each score separates the validation images of the known classes from all of the held-out
    generator's images (AUROC). The score with the best mean AUROC wins; ties go to the order of
    :data:`openset.SCORES`. The real class is never held out.
    """
    generators = [name for name in data.samples.label_names if name != REAL_LABEL]
    if len(data.samples.label_names) < 3 or len(generators) < 1:
        raise UsageError("choosing the open-set score needs at least three classes, one of them a generator")
    if folds < 1:
        raise UsageError(f"folds must be at least 1, got {folds}")
    picks = sorted({round(i * (len(generators) - 1) / max(1, folds - 1)) for i in range(min(folds, len(generators)))})
    per_fold = []
    for position in picks:
        held_out = generators[position]
        settings.progress.log(f"open-set score: leaving out {held_out}")
        known = data.without_class(held_out)
        model, _, _ = fit(known, replace(config, open_set_score=DEFAULT_SCORE), device=settings.device)
        _, val = stratified_split(known.samples.labels, config.val_fraction, config.seed, known.samples.sha256)
        unseen = data.subset(np.flatnonzero(data.samples.labels == data.samples.label_names.index(held_out)))
        known_scores = set_scores(model, known.subset(val))
        unseen_scores = set_scores(model, unseen)
        per_fold.append({"held_out": held_out, "auroc": {n: auroc(known_scores[n], unseen_scores[n]) for n in SCORES}})
    mean = {name: float(np.mean([fold["auroc"][name] for fold in per_fold])) for name in SCORES}
    chosen = max(SCORES, key=lambda name: (mean[name], -SCORES.index(name)))
    return {"chosen": chosen, "mean_auroc": mean, "folds": per_fold}


def set_scores(model, data: TrainingSet) -> dict[str, np.ndarray]:
    """Every open-set score of a trained (scored) model on ``data``."""
    logits, features = batched_outputs(model, data.inputs)
    distances = data.distances if data.distances is not None else np.zeros(len(logits))
    return all_scores(model, features, logits, distances)


def _fit_with_options(
    data: TrainingSet,
    config: TrainConfig,
    artifacts_path,
    settings: RunSettings,
    augment: list[Perturbation] | None,
    index_path,
    weights,
):
    """fit() after the options that shape it: the open-set score choice, then augmentation."""
    selection = None
    if config.open_set_score == "auto":
        selection = select_score(data, config, settings=settings)
        config = replace(config, open_set_score=selection["chosen"])
    copies = None
    if augment:
        copies = perturbed_copies(
            data, artifacts_path, augment, index_path=index_path, weights=weights, settings=settings, seed=config.seed
        )
    model, metadata, history = fit(data, config, device=settings.device, progress=settings.progress, copies=copies)
    if selection is not None:
        metadata["open_set"]["selection"] = selection
    return model, metadata, history


def train_auto(
    artifacts_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    augment: list[Perturbation] | None = None,
    index_path: str | os.PathLike | None = None,
    weights: dict[Space, str | None] | None = None,
    splits: int = 2,
    overwrite: bool = False,
) -> TrainResult:
    """``--space auto``: train on every candidate input, keep the best on validation data only.

    Each candidate is trained on ``splits`` seeded train/validation splits (seeds ``config.seed``,
    ``config.seed + 1``, …; the split depends only on the labels and the seed, so every candidate
    sees the same ones) and judged by its mean validation accuracy; ties go to the candidate
    listed first (the artifact spaces come first). The final model is the winner trained again
    with every option (open-set score choice, augmentation) on the first split. The choice and
    the whole validation table go into the metadata.
    """
    started = time.perf_counter()
    check_outputs([out], inputs=_inputs(artifacts_path, augment, index_path, weights), overwrite=overwrite)
    config = config or TrainConfig()
    if splits < 1:
        raise UsageError(f"splits must be at least 1, got {splits}")
    table, best = [], None
    screening = replace(config, open_set_score=DEFAULT_SCORE)
    for candidate in auto_candidates(artifacts_path):
        accuracies = []
        for split in range(splits):
            settings.progress.log(f"auto: trying {candidate.name} (validation split {split + 1}/{splits})")
            seeded = replace(screening, seed=config.seed + split)
            _, metadata, _ = fit(candidate, seeded, device=settings.device, progress=settings.progress)
            accuracies.append(metadata["training"]["val_accuracy"])
        accuracy = float(np.mean(accuracies))
        table.append(
            {"input": candidate.name, "arch": metadata["arch"], "val_accuracy": accuracy, "per_split": accuracies}
        )
        if best is None or accuracy > best[1]:
            best = (candidate, accuracy)
    chosen = best[0]
    model, metadata, history = _fit_with_options(chosen, config, artifacts_path, settings, augment, index_path, weights)
    metadata["auto"] = {"chosen": chosen.name, "splits": splits, "validation": table}
    return _save(out, model, metadata, history, artifacts_path, started, overwrite)


def _inputs(artifacts_path, augment, index_path, weights) -> list:
    """What a training run reads, which its checkpoint may not replace: the artifacts file and,
    with ``augment``, the index the copies are searched in and the backbone weights."""
    if not augment:
        return [artifacts_path]
    weight_files = [w for w in (weights or {}).values() if w and not str(w).startswith("random:")]
    return [artifacts_path, index_path or artifacts_index_path(artifacts_path), *weight_files]


def train_attributor(
    artifacts_path: str | os.PathLike,
    space: Space,
    out: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    augment: list[Perturbation] | None = None,
    index_path: str | os.PathLike | None = None,
    weights: dict[Space, str | None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Load one space of an artifacts file, train an attributor and save the best checkpoint to ``out``.

    ``augment`` adds one perturbed copy of every image (see :func:`perturbed_copies`); the index is
    the one recorded in the artifacts file unless ``index_path`` is given.
    """
    started = time.perf_counter()
    check_outputs([out], inputs=_inputs(artifacts_path, augment, index_path, weights), overwrite=overwrite)
    data = artifact_training_set(load_artifacts(artifacts_path, space))
    model, metadata, history = _fit_with_options(
        data, config or TrainConfig(), artifacts_path, settings, augment, index_path, weights
    )
    return _save(out, model, metadata, history, artifacts_path, started, overwrite)


def _save(out, model, metadata: dict, history, artifacts_path, started: float, overwrite: bool) -> TrainResult:
    metadata["training"]["artifacts_file"] = os.path.abspath(os.fspath(artifacts_path))
    save_checkpoint(out, model.state_dict(), metadata, overwrite=overwrite)
    return TrainResult(os.fspath(out), metadata, history, time.perf_counter() - started)
