"""Evaluation of attribution on a labelled artifacts file: accuracy over seeds, per-class scores,
confusion matrix, separability (FD ratio) and a t-SNE view of the attributor's features.

Protocol: for each seed, a stratified test split (``test_fraction`` of every class) is held out
first; the attributor is trained on the rest, which :func:`train.fit` splits again into train and
validation (the validation part picks the best epoch). The test split is only ever predicted, so
test data never tunes anything.

FD ratio: Fisher's discriminant ratio trace(S_b) / trace(S_w), with
S_b = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ and S_w = Σ_c Σ_{x∈c} (x − μ_c)(x − μ_c)ᵀ. Higher means classes
are further apart relative to their spread. It is computed on the raw (flattened) artifacts of the
whole file and on the attributor's penultimate features of each seed's test split.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..artifacts import load_artifacts
from ..errors import UsageError
from ..formats import provenance
from ..inputs import TrainingSet, artifact_training_set
from ..outputs import atomic_output, results_folder
from ..settings import DEFAULT_SETTINGS, RunSettings
from ..spaces import Space
from ..train import TrainConfig, fit, stratified_split
from .figures import pyplot, save_figure

OUTPUT_FILES = ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "tsne.csv", "tsne.png")


def fisher_ratio(features: np.ndarray, labels: np.ndarray) -> float:
    """trace(S_b) / trace(S_w) of (n, d) features, without forming d×d matrices."""
    x = features.reshape(len(features), -1).astype(np.float64)
    overall = x.mean(axis=0)
    between = within = 0.0
    for label in np.unique(labels):
        members = x[labels == label]
        centre = members.mean(axis=0)
        between += len(members) * float(((centre - overall) ** 2).sum())
        within += float(((members - centre) ** 2).sum())
    return between / within if within > 0 else float("inf")


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: rows are true classes, columns predictions."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def per_class_scores(confusion: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    rows = []
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "precision": float(precision),
                "recall": float(recall),
                "f1": float(f1),
                "support": int(actual),
            }
        )
    return rows


@dataclass
class SeedResult:
    seed: int
    accuracy: float
    fd_ratio_features: float
    best_epoch: int
    test_size: int


@dataclass
class Evaluation:
    """What :func:`evaluate` measured; ``confusion`` pools the test predictions of every seed."""

    name: str  # the space (rgb, freq, sl, ssl) or the baseline
    classes: list[str]
    arch: str
    runs: list[SeedResult]
    confusion: np.ndarray
    fd_ratio_inputs: float  # on what the attributor reads: artifacts, or a baseline's inputs
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy_mean(self) -> float:
        return float(np.mean([r.accuracy for r in self.runs]))

    @property
    def accuracy_std(self) -> float:
        return float(np.std([r.accuracy for r in self.runs]))

    @property
    def fd_ratio_features_mean(self) -> float:
        return float(np.mean([r.fd_ratio_features for r in self.runs]))

    @property
    def per_class(self) -> list[dict]:
        return per_class_scores(self.confusion, self.classes)


def _predict(model, artifacts: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, penultimate features) in eval mode."""
    import torch

    model.eval()
    predictions, features = [], []
    with torch.inference_mode():
        for start in range(0, len(artifacts), batch_size):
            batch = torch.from_numpy(artifacts[start : start + batch_size].astype(np.float32, copy=False))
            hidden = model.features(batch)
            predictions.append(model.head(hidden).argmax(1).numpy())
            features.append(hidden.numpy())
    return np.concatenate(predictions), np.concatenate(features)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_output(path, overwrite=True) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _plot_confusion(path: Path, confusion: np.ndarray, classes: list[str]) -> None:
    plt = pyplot()

    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted source")
    ax.set_ylabel("true source")
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="share of the true class")
    save_figure(fig, path)


def _tsne(
    path_png: Path, path_csv: Path, features: np.ndarray, labels: np.ndarray, classes: list[str], seed: int
) -> None:
    plt = pyplot()
    from sklearn.manifold import TSNE

    perplexity = float(max(2, min(30, (len(features) - 1) // 3)))
    points = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)
    _write_csv(path_csv, ["x", "y", "label"], [[float(x), float(y), classes[c]] for (x, y), c in zip(points, labels)])
    fig, ax = plt.subplots(figsize=(7, 6))
    for index, name in enumerate(classes):
        chosen = labels == index
        ax.scatter(points[chosen, 0], points[chosen, 1], s=10, label=name)
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("t-SNE of the attributor's penultimate features (test split)")
    save_figure(fig, path_png)


def evaluate(
    artifacts_path: str | os.PathLike,
    space: Space,
    out_dir: str | os.PathLike,
    *,
    seeds: int = 3,
    test_fraction: float = 0.2,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> Evaluation:
    """Evaluate one space of an artifacts file; writes metrics, tables and figures to ``out_dir``."""
    data = artifact_training_set(load_artifacts(artifacts_path, space))
    source = os.path.abspath(os.fspath(artifacts_path))
    return evaluate_set(
        data,
        out_dir,
        seeds=seeds,
        test_fraction=test_fraction,
        config=config,
        settings=settings,
        source=source,
        overwrite=overwrite,
    )


def evaluate_set(
    data: TrainingSet,
    out_dir: str | os.PathLike,
    *,
    seeds: int = 3,
    test_fraction: float = 0.2,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    augment=None,
    source: str = "",
    test_data: TrainingSet | None = None,
    overwrite: bool = False,
) -> Evaluation:
    """Train and test on ``data`` ``seeds`` times (the protocol above); ``data.name`` labels the outputs.

    With ``test_data`` (cross-dataset), each seed trains on all of ``data`` (its own validation
    split still picks the epoch) and tests on all of ``test_data``, which must use the same labels.
    """
    started = time.perf_counter()
    if seeds < 1:
        raise UsageError(f"seeds must be at least 1, got {seeds}")
    config = config or TrainConfig()
    inputs = [source] if source else []
    out = results_folder(out_dir, OUTPUT_FILES, inputs=inputs, overwrite=overwrite)
    name, classes, labels = data.name, data.samples.label_names, data.samples.labels
    n_classes = len(classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    runs: list[SeedResult] = []
    last_features = last_labels = None
    for seed in range(seeds):
        settings.progress.log(f"{name}: seed {seed + 1}/{seeds}")
        if test_data is None:
            rest, test = stratified_split(labels, test_fraction, seed)
            train_part, test_inputs, truth = data.subset(rest), data.inputs[test], labels[test]
        else:
            train_part, test_inputs, truth = data, test_data.inputs, test_data.samples.labels
        model, metadata, _ = fit(
            train_part, replace(config, seed=seed), device=settings.device, progress=settings.progress, augment=augment
        )
        predicted, features = _predict(model, test_inputs)
        confusion += confusion_matrix(truth, predicted, n_classes)
        accuracy = float((predicted == truth).mean())
        best_epoch = metadata["training"]["best_epoch"]
        runs.append(SeedResult(seed, accuracy, fisher_ratio(features, truth), best_epoch, int(len(truth))))
        last_features, last_labels = features, truth

    fd_inputs = fisher_ratio(data.inputs.astype(np.float32, copy=False), labels)
    result = Evaluation(name, classes, metadata["arch"], runs, confusion, fd_inputs, out)
    files = {output: out / output for output in OUTPUT_FILES}
    per_class_rows = [list(row.values()) for row in result.per_class]
    _write_csv(files["per_class.csv"], ["class", "precision", "recall", "f1", "support"], per_class_rows)
    confusion_rows = [[label, *map(int, row)] for label, row in zip(classes, confusion)]
    _write_csv(files["confusion.csv"], ["true \\ predicted", *classes], confusion_rows)
    _plot_confusion(files["confusion.png"], confusion, classes)
    _tsne(files["tsne.png"], files["tsne.csv"], last_features, last_labels, classes, seeds - 1)
    result.seconds = time.perf_counter() - started
    metrics = {
        **provenance(),
        "source": source,
        "name": name,
        "arch": result.arch,
        "classes": classes,
        "protocol": {
            "seeds": seeds,
            "test_fraction": None if test_data else test_fraction,
            "cross_dataset": test_data is not None,
            **asdict(config),
        },
        "accuracy_mean": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "fd_ratio_inputs": result.fd_ratio_inputs,
        "fd_ratio_features_mean": result.fd_ratio_features_mean,
        "runs": [asdict(run) for run in runs],
        "per_class": result.per_class,
        "confusion": confusion.tolist(),
        "seconds": round(result.seconds, 1),
    }
    with atomic_output(files["metrics.json"], overwrite=True) as partial:
        partial.write_text(json.dumps(metrics, indent=2))
    result.files = files
    return result


def relabel(data: TrainingSet, mapping: dict[str, str], names: list[str]) -> TrainingSet:
    """Map each class through ``mapping`` onto ``names``; classes mapped to nothing are dropped."""
    new_index = {name: i for i, name in enumerate(names)}
    old_to_new = np.array([new_index.get(mapping.get(old, ""), -1) for old in data.samples.label_names])
    labels = old_to_new[data.samples.labels]
    keep = np.flatnonzero(labels >= 0)
    kept = data.subset(keep)
    return replace(kept, samples=replace(kept.samples, labels=labels[keep], label_names=list(names)))


@dataclass
class LabelMatch:
    """How the two datasets' classes were matched, for the report."""

    by: str  # "name" or a design factor
    classes: list[str]
    train_mapping: dict[str, str]
    test_mapping: dict[str, str]
    dropped_train: list[str]
    dropped_test: list[str]


def match_labels(
    train_names: list[str],
    test_names: list[str],
    by: str | None = None,
    factors: dict[str, dict[str, str]] | None = None,
) -> LabelMatch:
    """Match classes by name, or by the value of design factor ``by`` (from ``factors``).

    Only classes present on both sides are kept; the rest are listed as dropped.
    """
    if by is None:
        identity = {name: name for name in train_names + test_names}
        train_map, test_map = identity, identity
    else:
        if not factors:
            raise UsageError(
                f"matching by {by!r} needs design factors (factors; --zoo DIR or --factors CSV on the command line)"
            )
        lookup = {name: values.get(by, "") for name, values in factors.items()}
        missing = [name for name in train_names + test_names if not lookup.get(name)]
        if missing:
            raise UsageError(f"no {by!r} value for: {', '.join(missing)} (add them to the factors)")
        train_map = {name: lookup[name] for name in train_names}
        test_map = {name: lookup[name] for name in test_names}
    shared = sorted({train_map[n] for n in train_names} & {test_map[n] for n in test_names})
    if len(shared) < 2:
        raise UsageError(f"the datasets share fewer than two classes when matched by {by or 'name'}: {shared}")
    dropped_train = [n for n in train_names if train_map[n] not in shared]
    dropped_test = [n for n in test_names if test_map[n] not in shared]
    return LabelMatch(by or "name", shared, train_map, test_map, dropped_train, dropped_test)


def evaluate_cross_dataset(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike,
    space: Space,
    out_dir: str | os.PathLike,
    *,
    by: str | None = None,
    factors: dict[str, dict[str, str]] | None = None,
    seeds: int = 3,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> tuple[Evaluation, LabelMatch]:
    """Train on one dataset's generators, test on another's (the paper's Table 4 protocol)."""
    train = artifact_training_set(load_artifacts(train_path, space))
    test = artifact_training_set(load_artifacts(test_path, space))
    if train.input_shape != test.input_shape:
        raise UsageError(f"artifact shapes differ: {train.input_shape} vs {test.input_shape} (same image size?)")
    match = match_labels(train.samples.label_names, test.samples.label_names, by, factors)
    train_set = replace(relabel(train, match.train_mapping, match.classes), name=f"{space.value} cross-dataset")
    test_set = relabel(test, match.test_mapping, match.classes)
    evaluation = evaluate_set(
        train_set,
        out_dir,
        seeds=seeds,
        config=config,
        settings=settings,
        source=os.path.abspath(os.fspath(train_path)),
        test_data=test_set,
        overwrite=overwrite,
    )
    return evaluation, match
