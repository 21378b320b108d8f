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

from ..artifacts import REAL_LABEL, artifacts_index_path, index_embedders, load_artifacts, load_pixels
from ..errors import MismatchError, UsageError
from ..formats import provenance
from ..inputs import InputKind, TrainingSet, artifact_training_set
from ..manifold import RealIndex
from ..openset import (
    SCORES,
    all_scores,
    auroc,
    batched_outputs,
    brier_score,
    expected_calibration_error,
    oscr,
    reliability,
    softmax,
    tnr_at_tpr,
)
from ..outputs import atomic_output, results_folder
from ..perturb import Perturbation, perturbed_set
from ..settings import DEFAULT_SETTINGS, RunSettings
from ..spaces import Space
from ..train import PerturbedCopies, TrainConfig, fit, stratified_split
from ..verdicts import INCONCLUSIVE, UNKNOWN, VerdictRule
from .figures import annotated_heatmap, label_bars, pyplot, robust_view, row_shares, save_figure, set_title

OUTPUT_FILES = (
    "metrics.json",
    "per_class.csv",
    "confusion.csv",
    "confusion.png",
    "tsne.csv",
    "tsne.png",
    "reliability.png",
    "robustness.png",
)


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
    metrics: dict = field(default_factory=dict)

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


@dataclass
class Predictions:
    """A scored model's view of a test set: logits, features, and every open-set score."""

    logits: np.ndarray
    features: np.ndarray
    scores: dict[str, np.ndarray]
    temperature: float

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def calibrated(self) -> np.ndarray:
        return softmax(self.logits, self.temperature)


def predict(model, data: TrainingSet) -> Predictions:
    logits, features = batched_outputs(model, data.inputs)
    distances = data.distances if data.distances is not None else np.zeros(len(logits))
    scores = all_scores(model, features, logits, distances)
    return Predictions(logits, features, scores, float(model.temperature))


def verdict_rates(
    rule: VerdictRule,
    classes: list[str],
    predictions: Predictions,
    truth: np.ndarray,
    distances: np.ndarray,
    original_size: tuple[int, int] | None = None,
    jpeg_quality: int | None = None,
) -> dict[str, float]:
    """Share of each kind of verdict: the true source, another known class, unknown, inconclusive."""
    counts = dict.fromkeys(("correct", "wrong_source", UNKNOWN, INCONCLUSIVE), 0)
    score = predictions.scores[rule.score]
    for i, label in enumerate(predictions.predicted):
        notes = rule.notes(original_size, jpeg_quality, float(distances[i]))
        verdict = rule.decide(classes[label], float(score[i]), notes)
        if verdict in (UNKNOWN, INCONCLUSIVE):
            counts[verdict] += 1
        else:
            counts["correct" if label == truth[i] else "wrong_source"] += 1
    return {key: value / max(1, len(truth)) for key, value in counts.items()}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_output(path, overwrite=True) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def figure_details(evaluation: Evaluation, kind: InputKind, source: str = "") -> list[str]:
    """What every evaluation figure is about, for its title: the input, the network, the data."""
    data = f"{Path(source).name}: " if source else ""
    tested = sum(run.test_size for run in evaluation.runs)
    return [
        f"{evaluation.name} ({kind.value} input)",
        f"{evaluation.arch} attributor",
        f"{data}{len(evaluation.classes)} classes",
        f"{tested} test images over {len(evaluation.runs)} seed(s)",
    ]


def confusion_figure(confusion: np.ndarray, classes: list[str], details: list[str], headline: str):
    """The pooled confusion matrix, rows normalised to the share of each true class, counts beside."""
    plt = pyplot()
    share = row_shares(confusion)
    cells = np.vectorize(lambda s, n: f"{s:.2f}\n({n})")(share, confusion)
    if len(classes) > 12:
        cells = np.vectorize(lambda s: f"{s:.2f}")(share)
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    annotated_heatmap(
        ax,
        share,
        classes,
        classes,
        cells,
        colorbar_label="share of the true class (each row sums to 1)",
        cmap="Blues",
        vmin=0,
        vmax=1,
    )
    ax.set_xlabel("predicted source")
    ax.set_ylabel("true source")
    set_title(ax, "Confusion matrix, rows normalised (count in brackets)", [*details, headline])
    return fig


def tsne_points(features: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of ``features``, each dimension standardised first so that no single large
    feature decides the neighbourhoods."""
    from sklearn.manifold import TSNE

    x = features.reshape(len(features), -1).astype(np.float64)
    spread = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)


def tsne_figure(points: np.ndarray, labels: np.ndarray, classes: list[str], details: list[str], headline: str):
    """The t-SNE points coloured by source, on axes the bulk of the points fills; the few outliers
    are drawn on the edge as open triangles, and the title says how many."""
    plt = pyplot()
    view = robust_view(points)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    for index, name in enumerate(classes):
        chosen = labels == index
        inside, outside = chosen & ~view.clipped, chosen & view.clipped
        colour = f"C{index % 10}"
        ax.scatter(view.shown[inside, 0], view.shown[inside, 1], s=12, color=colour, label=name)
        ax.scatter(*view.shown[outside].T, s=60, marker="^", facecolors="none", edgecolors=colour, clip_on=False)
    ax.set_xlim(view.lower[0], view.upper[0])
    ax.set_ylim(view.lower[1], view.upper[1])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    clipped = int(view.clipped.sum())
    if clipped:
        ax.scatter([], [], s=60, marker="^", facecolors="none", edgecolors="black", label="outlier, on the edge")
    ax.legend(fontsize=8, markerscale=1.5, title="true source", title_fontsize=8)
    note = f"{clipped} outlier(s) beyond the axes drawn on the edge (△)" if clipped else "no point clipped"
    set_title(ax, "t-SNE of the attributor's penultimate features", [*details, headline, note])
    return fig


@dataclass
class Stress:
    """What ``evaluate`` does beyond the closed-set protocol, and what it needs for it.

    ``perturbations`` are applied to each seed's test images; ``augment`` trains every model with
    one perturbed copy of each training image. Both search the perturbed images afresh in the
    index (``index_path``, with ``weights`` for sl/ssl), starting from the decoded ``pixels``.
    """

    open_set: bool = False
    perturbations: list[Perturbation] = field(default_factory=list)
    augment: list[Perturbation] = field(default_factory=list)
    pixels: np.ndarray | None = None
    index_path: str | None = None
    weights: dict | None = None

    @property
    def needs_index(self) -> bool:
        return bool(self.perturbations or self.augment)


def evaluate(
    artifacts_path: str | os.PathLike,
    space: Space,
    out_dir: str | os.PathLike,
    *,
    seeds: int = 3,
    test_fraction: float = 0.2,
    config: TrainConfig | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    open_set: bool = False,
    perturbations: list[Perturbation] | None = None,
    augment: list[Perturbation] | None = None,
    index_path: str | os.PathLike | None = None,
    weights: dict | None = None,
    overwrite: bool = False,
) -> Evaluation:
    """Evaluate one space of an artifacts file; writes metrics, tables and figures to ``out_dir``.

    ``open_set`` adds leave-one-generator-out metrics; ``perturbations`` measure robustness on
    perturbed test images; ``augment`` trains with perturbed copies (``train --augment``).
    """
    data = artifact_training_set(load_artifacts(artifacts_path, space))
    source = os.path.abspath(os.fspath(artifacts_path))
    stress = Stress(open_set, list(perturbations or []), list(augment or []), weights=weights)
    if stress.needs_index:
        stress.pixels = load_pixels(artifacts_path).pixels
        stress.index_path = os.fspath(index_path or artifacts_index_path(artifacts_path))
    return evaluate_set(
        data,
        out_dir,
        seeds=seeds,
        test_fraction=test_fraction,
        config=config,
        settings=settings,
        source=source,
        stress=stress,
        overwrite=overwrite,
    )


class _Perturber:
    """Perturbed copies of rows of one training set, searched in the index (opened once)."""

    def __init__(self, data: TrainingSet, stress: Stress, settings: RunSettings) -> None:
        if data.space is None:
            raise UsageError(f"{data.name} inputs are not made from an embedding space; they cannot be perturbed")
        self.data, self.stress = data, stress
        self.index = RealIndex(stress.index_path, verify=[data.space])
        if self.index.index_hash != data.samples.index_hash:
            self.index.close()
            raise MismatchError(f"{stress.index_path} is not the index these artifacts were extracted against")
        self.embedder = index_embedders(self.index, [data.space], stress.weights, settings.device)[data.space]

    def close(self) -> None:
        self.index.close()

    def copies(self, rows: np.ndarray, choices: list[Perturbation]) -> tuple[TrainingSet, np.ndarray]:
        """(perturbed set, positions in ``rows`` it kept)."""
        part = self.data.subset(rows)
        return perturbed_set(part, self.stress.pixels[rows], choices, self.index, self.embedder)

    def training_copies(self, rows: np.ndarray, seed: int) -> PerturbedCopies:
        rng = np.random.default_rng(seed)
        augment = self.stress.augment
        choices = [augment[i] for i in rng.integers(len(augment), size=len(rows))]
        copy, kept = self.copies(rows, choices)
        return PerturbedCopies(copy, kept, [p.name for p in augment])


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
    stress: Stress | None = None,
    initialise=None,
    overwrite: bool = False,
) -> Evaluation:
    """Train and test on ``data`` ``seeds`` times (the protocol above); ``data.name`` labels the outputs.

    With ``test_data`` (cross-dataset), each seed trains on all of ``data`` (its own validation
    split still picks the epoch) and tests on all of ``test_data``, which must use the same labels.
    Calibration (ECE, Brier, before and after temperature scaling) and verdict rates are measured
    on the pooled test predictions of every seed; ``stress`` adds open-set and robustness metrics.
    """
    started = time.perf_counter()
    if seeds < 1:
        raise UsageError(f"seeds must be at least 1, got {seeds}")
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction (--test-fraction) must be between 0 and 1, got {test_fraction}")
    config = config or TrainConfig()
    stress = stress or Stress()
    inputs = [source] if source else []
    out = results_folder(out_dir, OUTPUT_FILES, inputs=inputs, overwrite=overwrite)
    name, classes, labels = data.name, data.samples.label_names, data.samples.labels
    n_classes = len(classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    runs: list[SeedResult] = []
    pooled: dict[str, list] = {"before": [], "after": [], "truth": [], "verdicts": []}
    robustness: dict[str, list] = {}
    perturber = _Perturber(data, stress, settings) if stress.needs_index else None
    last_features = last_labels = None
    try:
        for seed in range(seeds):
            settings.progress.log(f"{name}: seed {seed + 1}/{seeds}")
            if test_data is None:
                rest, test = stratified_split(labels, test_fraction, seed, data.samples.sha256)
                train_part, test_part = data.subset(rest), data.subset(test)
            else:
                rest, train_part, test_part = np.arange(len(labels)), data, test_data
            copies = perturber.training_copies(rest, seed) if perturber and stress.augment else None
            model, metadata, _ = fit(
                train_part,
                replace(config, seed=seed),
                device=settings.device,
                progress=settings.progress,
                augment=augment,
                copies=copies,
                initialise=initialise,
            )
            truth = test_part.samples.labels
            found = predict(model, test_part)
            rule = VerdictRule(metadata)
            distances = _distances(test_part)
            confusion += confusion_matrix(truth, found.predicted, n_classes)
            accuracy = float((found.predicted == truth).mean())
            best_epoch = metadata["training"]["best_epoch"]
            runs.append(SeedResult(seed, accuracy, fisher_ratio(found.features, truth), best_epoch, int(len(truth))))
            pooled["before"].append(softmax(found.logits))
            pooled["after"].append(found.calibrated)
            pooled["truth"].append(truth)
            pooled["verdicts"].append(verdict_rates(rule, classes, found, truth, distances))
            last_features, last_labels = found.features, truth
            for perturbation in stress.perturbations:
                robustness.setdefault(perturbation.name, []).append(
                    _perturbed_metrics(perturber, perturbation, test, test_part, model, rule, classes)
                )
    finally:
        if perturber is not None:
            perturber.close()

    fd_inputs = fisher_ratio(data.inputs.astype(np.float32, copy=False), labels)
    result = Evaluation(name, classes, metadata["arch"], runs, confusion, fd_inputs, out)
    files = {output: out / output for output in OUTPUT_FILES}
    per_class_rows = [list(row.values()) for row in result.per_class]
    _write_csv(files["per_class.csv"], ["class", "precision", "recall", "f1", "support"], per_class_rows)
    confusion_rows = [[label, *map(int, row)] for label, row in zip(classes, confusion)]
    _write_csv(files["confusion.csv"], ["true \\ predicted", *classes], confusion_rows)
    details = figure_details(result, data.kind, source)
    accuracy = f"accuracy {result.accuracy_mean:.3f} ± {result.accuracy_std:.3f}"
    save_figure(confusion_figure(confusion, classes, details, accuracy), files["confusion.png"])
    points = tsne_points(last_features, seeds - 1)
    tsne_rows = [[float(x), float(y), classes[c]] for (x, y), c in zip(points, last_labels)]
    _write_csv(files["tsne.csv"], ["x", "y", "label"], tsne_rows)
    last_split = [*details[:3], f"seed {seeds - 1}'s {len(last_labels)} test images"]
    fd_ratio = f"FD ratio {runs[-1].fd_ratio_features:.2f}"
    save_figure(tsne_figure(points, last_labels, classes, last_split, fd_ratio), files["tsne.png"])
    calibration = _calibration(pooled)
    save_figure(reliability_figure(calibration, details), files["reliability.png"])
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
            "augment": [p.name for p in stress.augment],
            **asdict(config),
        },
        "accuracy_mean": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "fd_ratio_inputs": result.fd_ratio_inputs,
        "fd_ratio_features_mean": result.fd_ratio_features_mean,
        "runs": [asdict(run) for run in runs],
        "per_class": result.per_class,
        "confusion": confusion.tolist(),
        "calibration": calibration,
        "verdicts": _mean_dicts(pooled["verdicts"]),
    }
    if stress.perturbations:
        metrics["robustness"] = {
            key: {**_mean_dicts(values), "accuracy_ratio": _mean_dicts(values)["accuracy"] / result.accuracy_mean}
            for key, values in robustness.items()
        }
        figure = robustness_figure(result.accuracy_mean, metrics["robustness"], details, stress.augment)
        save_figure(figure, files["robustness.png"])
    if stress.open_set:
        metrics["open_set"] = open_set_metrics(data, config, test_fraction, settings)
    result.seconds = time.perf_counter() - started
    metrics["seconds"] = round(result.seconds, 1)
    result.metrics = metrics
    with atomic_output(files["metrics.json"], overwrite=True) as partial:
        partial.write_text(json.dumps(metrics, indent=2))
    result.files = {key: path for key, path in files.items() if path.exists()}
    return result


def _distances(data: TrainingSet) -> np.ndarray:
    return data.distances if data.distances is not None else np.zeros(len(data.inputs))


def _mean_dicts(values: list[dict]) -> dict:
    return {key: float(np.mean([v[key] for v in values])) for key in values[0]}


def _calibration(pooled: dict) -> dict:
    truth = np.concatenate(pooled["truth"])
    before, after = np.concatenate(pooled["before"]), np.concatenate(pooled["after"])
    return {
        "ece": expected_calibration_error(after, truth),
        "brier": brier_score(after, truth),
        "ece_before": expected_calibration_error(before, truth),
        "brier_before": brier_score(before, truth),
        "bins": 15,
        "reliability": reliability(after, truth),
        "reliability_before": reliability(before, truth),
    }


def _perturbed_metrics(perturber, perturbation, test_rows, test_part, model, rule, classes) -> dict:
    """Accuracy and verdict rates of one seed's model on its test images, perturbed."""
    copy, kept = perturber.copies(test_rows, [perturbation] * len(test_rows))
    found = predict(model, copy)
    truth = copy.samples.labels
    size = rule.image_size
    side = max(1, round(size * perturbation.value))
    original = (side, side) if perturbation.kind in ("resize", "crop") else (size, size)
    quality = int(perturbation.value) if perturbation.kind == "jpeg" else None
    rates = verdict_rates(rule, classes, found, truth, _distances(copy), original, quality)
    return {"accuracy": float((found.predicted == truth).mean()), "kept": len(kept) / max(1, len(test_rows)), **rates}


def open_set_metrics(data: TrainingSet, config: TrainConfig, test_fraction: float, settings: RunSettings) -> dict:
    """Leave-one-generator-out: each generator in turn is never trained on (seed 0).

    Known: the test split of the other classes (the real class included). Unknown: every image of
    the held-out generator. AUROC, OSCR and TNR at 95 % TPR for every score; the headline figures
    are those of the score the model uses (``config.open_set_score``).
    """
    labels, classes = data.samples.labels, data.samples.label_names
    generators = [c for c in classes if c != REAL_LABEL]
    if len(classes) < 3:
        raise UsageError("open-set evaluation needs at least three classes (two stay known)")
    per_held_out = {}
    for held_out in generators:
        settings.progress.log(f"open set: leaving out {held_out}")
        known = data.without_class(held_out)
        rest, test = stratified_split(known.samples.labels, test_fraction, 0, known.samples.sha256)
        model, _, _ = fit(
            known.subset(rest), replace(config, seed=0), device=settings.device, progress=settings.progress
        )
        known_part = known.subset(test)
        unseen = data.subset(np.flatnonzero(labels == classes.index(held_out)))
        seen, new = predict(model, known_part), predict(model, unseen)
        correct = seen.predicted == known_part.samples.labels
        per_held_out[held_out] = {
            score: {
                "auroc": auroc(seen.scores[score], new.scores[score]),
                "oscr": oscr(seen.scores[score], correct, new.scores[score]),
                "tnr_at_tpr95": tnr_at_tpr(seen.scores[score], new.scores[score], 0.95),
            }
            for score in SCORES
        }
    chosen = config.open_set_score
    by_score = {
        score: {
            metric: float(np.mean([fold[score][metric] for fold in per_held_out.values()]))
            for metric in ("auroc", "oscr", "tnr_at_tpr95")
        }
        for score in SCORES
    }
    return {
        "score": chosen,
        **by_score[chosen],
        "per_held_out": {g: fold[chosen] for g, fold in per_held_out.items()},
        "by_score": by_score,
        "per_held_out_by_score": per_held_out,
    }


def reliability_figure(calibration: dict, details: list[str]):
    """Accuracy against confidence per bin, before and after temperature scaling."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for key, label, colour in (
        ("reliability_before", f"softmax (ECE {calibration['ece_before']:.3f})", "tab:orange"),
        ("reliability", f"temperature-scaled (ECE {calibration['ece']:.3f})", "tab:blue"),
    ):
        bins = [b for b in calibration[key] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=label, color=colour)
    ax.set_xlabel("confidence (largest probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    headline = f"ECE {calibration['ece_before']:.3f} → {calibration['ece']:.3f}"
    set_title(ax, f"Reliability ({calibration['bins']} bins)", [*details, headline])
    ax.legend(fontsize=8, loc="upper left")
    return fig


def robustness_figure(clean: float, robustness: dict, details: list[str], augment: list[Perturbation]):
    """Accuracy on clean and on each perturbation's test images, with the worst case in the title."""
    plt = pyplot()
    labels = ["clean", *robustness]
    accuracy = [clean, *(robustness[k]["accuracy"] for k in robustness)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 3), 4.5))
    bars = ax.bar(labels, accuracy, color=["tab:green", *["tab:blue"] * len(robustness)])
    label_bars(ax, bars, [f"{value:.3f}" for value in accuracy])
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("test images")
    ax.set_ylabel("accuracy")
    worst = min(robustness, key=lambda k: robustness[k]["accuracy"])
    headline = f"worst {worst}: accuracy {robustness[worst]['accuracy']:.3f} (clean {clean:.3f})"
    trained = f"trained with {', '.join(p.name for p in augment)}" if augment else "trained without augmentation"
    set_title(ax, "Robustness to perturbed test images", [*details, trained, headline])
    return fig


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

    Only classes present on both sides are kept; the rest are listed as dropped. The ``real``
    class (which `extract` adds by default) has no design factors: it is matched by its name.
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
        lookup.setdefault(REAL_LABEL, REAL_LABEL)
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
