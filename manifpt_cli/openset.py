"""Calibrated probabilities and open-set scores: "which known source, how sure, or none of them".

A closed-set softmax names a known source for everything it is shown. After training, on the
validation split the network never trained on (README, "Verdicts"):

- **Calibration**: one temperature T, fitted by minimising the negative log-likelihood of
  softmax(logits / T) (Guo et al., 2017). Reports carry the calibrated probabilities.
- **Open-set scores** (higher = more like a known source): the graph scores of
  :class:`models.ScoredAttributor` (``msp``, ``energy``, ``mahalanobis``, ``knn``) and
  ``manifold``, minus the squared distance to the nearest real image.
- **Thresholds**: for each score, the k-th lowest of the n validation images of the known
  classes, k = ⌊target_fpr·(n + 1)⌋ (:func:`known_threshold`). A suspect below the chosen score's
  threshold is ``unknown``. A new image of a known source, exchangeable with the validation ones,
  falls below with probability k/(n + 1) ≤ ``target_fpr``: the false-alarm rate (a known source
  called unknown) holds for new images, not only on the validation split; the card states it
  (``false_alarm_bound``), above the target only where the split is too small.

The metric functions here need only NumPy (``evaluate`` and ``enroll`` share them); fitting needs
PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UsageError

GRAPH_SCORES = ("msp", "energy", "mahalanobis", "knn")  # the order of the ONNX output ``scores``
SCORES = (*GRAPH_SCORES, "manifold")
DEFAULT_SCORE = "knn"  # the winner of leave-one-generator-out validation on our zoo (README, "Verdicts")
DEFAULT_TARGET_FPR = 0.05
KNN_K = 5
BANK_PER_CLASS = 256  # training features kept per class for knn and for enrolment
ECE_BINS = 15


def check_target_fpr(target_fpr: float) -> float:
    if not 0 < target_fpr < 1:
        raise UsageError(f"target_fpr must be between 0 and 1 (exclusive), got {target_fpr}")
    return float(target_fpr)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probabilities = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(probabilities, 1e-300)).mean())


TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in ``TEMPERATURE_RANGE`` minimising validation NLL: a log-spaced grid, then
    golden-section search. On a split the network separates perfectly the NLL falls as T → 0, so
    T stops at the range's low end (:func:`temperature_at_bound`)."""
    grid = np.exp(np.linspace(np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]), 61))
    best = int(np.argmin([_nll(logits, labels, t) for t in grid]))
    low, high = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if _nll(logits, labels, np.exp(a)) < _nll(logits, labels, np.exp(b)):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def temperature_at_bound(temperature: float) -> bool:
    """Whether a fitted T stopped at an end of ``TEMPERATURE_RANGE`` (within 1 %): the validation
    split did not determine it, and its probabilities near 0 and 1 are not calibrated."""
    low, high = TEMPERATURE_RANGE
    return temperature < low * 1.01 or temperature > high / 1.01


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: Σ_b |B_b|/n · |accuracy(B_b) − confidence(B_b)| over equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / max(1, len(labels)))


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of Σ_c (p_c − 1[c = label])²."""
    onehot = np.zeros_like(probabilities, dtype=np.float64)
    onehot[np.arange(len(labels)), labels] = 1
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its range, count, mean confidence and accuracy (a reliability diagram)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": int(members.sum()),
                "confidence": float(confidence[members].mean()) if members.any() else None,
                "accuracy": float(correct[members].mean()) if members.any() else None,
            }
        )
    return rows


def threshold_at(known_scores: np.ndarray, target_fpr: float) -> float:
    """The score below which at most ``target_fpr`` of ``known_scores`` fall (a false alarm each)."""
    ordered = np.sort(known_scores.astype(np.float64))
    return float(ordered[min(int(np.floor(target_fpr * len(ordered))), len(ordered) - 1)])


def known_threshold(known_scores: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """(threshold, its false-alarm rate for new images): the k-th lowest of the n ``known_scores``,
    k = ⌊target_fpr·(n + 1)⌋, below which a new image of a known source falls with probability
    k/(n + 1) ≤ ``target_fpr`` (its rank among the n + 1 scores is uniform; ties only lower it).

    The plain quantile (:func:`threshold_at`, index ⌊target_fpr·n⌋) holds the rate only on the
    scores it was set on: for a new image it is (⌊target_fpr·n⌋ + 1)/(n + 1), 7.3 % at 5 % and
    n = 40. Below n = 1/target_fpr − 1 no threshold can promise the target: the lowest score is
    taken, and the rate it gives, 1/(n + 1), is what the model card states.

    Raises:
        UsageError: no known score at all.
    """
    n = len(known_scores)
    if n == 0:
        raise UsageError("no validation image of a known source to set the 'unknown' threshold on")
    k = max(1, int(np.floor(target_fpr * (n + 1))))  # rounding can only lower it
    return float(np.sort(known_scores.astype(np.float64))[k - 1]), k / (n + 1)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known > score of an unknown), ties counting one half (Mann-Whitney U)."""
    values = np.concatenate([known, unknown]).astype(np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, averaged over ties
    u = ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def tnr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknowns rejected at the threshold that accepts ``tpr`` of the knowns."""
    threshold = threshold_at(known, 1 - tpr)
    return float((unknown < threshold).mean())


def oscr(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray) -> float:
    """Open-Set Classification Rate (Dhamija et al., 2018): the area under the curve of the correct
    classification rate of knowns (correct and accepted) against the share of unknowns accepted,
    as the threshold sweeps every score. Tied scores are accepted together: the curve goes
    straight across them (a saturated ``msp`` used to take the knowns first and score 1)."""
    scores = np.concatenate([known, unknown]).astype(np.float64)
    is_known = np.concatenate([np.ones(len(known), bool), np.zeros(len(unknown), bool)])
    hits = np.concatenate([correct.astype(bool), np.zeros(len(unknown), bool)])
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])  # the last of each run of equal scores
    ccr = np.concatenate([[0.0], np.cumsum(hits[order])[ends] / max(1, len(known))])
    fpr = np.concatenate([[0.0], np.cumsum(~is_known[order])[ends] / max(1, len(unknown))])
    return float(np.trapezoid(ccr, fpr))


@dataclass
class OpenSetFit:
    """What :func:`calibrate` fitted, for the model card."""

    temperature: float
    score: str
    thresholds: dict[str, float]
    target_fpr: float
    false_alarm_bound: float  # what the thresholds promise for new known images: ≤ target_fpr from enough
    unknown_share_by_class: list[float | None]  # per class (in class order), validation images below the threshold
    validation: dict  # ECE / Brier before and after, on the validation split
    manifold_reference: float  # the 99.5th percentile of training and validation distances to the real manifold

    def card(self) -> dict:
        return {
            "calibration": {"method": "temperature", "temperature": self.temperature, **self.validation},
            "open_set": {
                "score": self.score,
                "threshold": self.thresholds[self.score],
                "target_fpr": self.target_fpr,
                "false_alarm_bound": self.false_alarm_bound,
                "validation_unknown_share": self.unknown_share_by_class,
                "thresholds": self.thresholds,
                "graph_scores": list(GRAPH_SCORES),
                "knn_k": KNN_K,
            },
            "manifold_reference": {"percentile": 99.5, "distance": self.manifold_reference},
        }


def batched_outputs(module, inputs: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate features) of an attributor (or scored attributor) in eval mode."""
    import torch

    module.eval()
    logits, features = [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32))
            hidden = module.features(batch)
            head = module.attributor.head if hasattr(module, "attributor") else module.head
            logits.append(head(hidden).numpy())
            features.append(hidden.numpy())
    return np.concatenate(logits), np.concatenate(features)


def all_scores(scored, features: np.ndarray, logits: np.ndarray, distances: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` for precomputed features/logits and manifold distances."""
    import torch

    with torch.inference_mode():
        graph = scored.scores_from(torch.from_numpy(features), torch.from_numpy(logits)).numpy()
    scores = {name: graph[:, i].astype(np.float64) for i, name in enumerate(GRAPH_SCORES)}
    scores["manifold"] = -distances.astype(np.float64)
    return scores


def _bank_rows(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def fit_statistics(scored, train_features: np.ndarray, train_labels: np.ndarray, seed: int) -> None:
    """Class means, shared precision matrix and the kNN bank, from training features (in place)."""
    import torch

    n_classes, width = scored.class_means.shape
    x = train_features.astype(np.float64)
    means = np.zeros((n_classes, width))
    for c in range(n_classes):
        members = x[train_labels == c]
        if len(members):
            means[c] = members.mean(axis=0)
    centred = x - means[train_labels]
    covariance = centred.T @ centred / max(1, len(x))
    ridge = 1e-3 * max(float(np.trace(covariance)) / width, 1e-12)  # keeps a rank-deficient covariance invertible
    precision = np.linalg.inv(covariance + ridge * np.eye(width))
    rows = _bank_rows(train_labels, BANK_PER_CLASS, seed)
    scored.class_means.copy_(torch.from_numpy(means.astype(np.float32)))
    scored.precision.copy_(torch.from_numpy(((precision + precision.T) / 2).astype(np.float32)))
    scored.bank = torch.from_numpy(train_features[rows].astype(np.float32))
    scored.bank_labels = torch.from_numpy(train_labels[rows].astype(np.int64))
    scored.knn_k = min(KNN_K, len(rows))


def calibrate(
    scored,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_logits: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    val_distances: np.ndarray,
    train_distances: np.ndarray,
    *,
    score: str,
    target_fpr: float,
    seed: int,
) -> OpenSetFit:
    """Fit temperature, open-set statistics and thresholds of ``scored`` (a ScoredAttributor) in place."""
    import torch

    if score not in SCORES:
        raise UsageError(f"unknown open-set score {score!r}; choose one of: {', '.join(SCORES)}")
    fit_statistics(scored, train_features, train_labels, seed)
    before = softmax(val_logits)
    temperature = fit_temperature(val_logits, val_labels)
    after = softmax(val_logits, temperature)
    scored.temperature.fill_(temperature)
    scored.val_features = torch.from_numpy(val_features.astype(np.float32))
    scored.val_labels = torch.from_numpy(val_labels.astype(np.int64))
    scored.val_distances = torch.from_numpy(val_distances.astype(np.float32))
    scores = all_scores(scored, val_features.astype(np.float32), val_logits.astype(np.float32), val_distances)
    fitted = {name: known_threshold(values, target_fpr) for name, values in scores.items()}
    thresholds = {name: threshold for name, (threshold, _) in fitted.items()}
    false_alarm_bound = fitted[score][1]  # the same for every score: it depends on n alone
    # The threshold is pooled: each class's own share below it says where the false alarms fall.
    below = scores[score] < thresholds[score]
    by_class = [below[val_labels == c] for c in range(len(scored.class_means))]
    unknown_share = [float(members.mean()) if len(members) else None for members in by_class]
    validation = {
        "ece_before": expected_calibration_error(before, val_labels),
        "ece": expected_calibration_error(after, val_labels),
        "brier_before": brier_score(before, val_labels),
        "brier": brier_score(after, val_labels),
        "fitted_on": f"validation split ({len(val_labels)} images; the same split picks the best epoch)",
        "temperature_at_bound": temperature_at_bound(temperature),
    }
    reference = float(np.percentile(np.concatenate([train_distances, val_distances]), 99.5))
    return OpenSetFit(
        temperature, score, thresholds, target_fpr, false_alarm_bound, unknown_share, validation, reference
    )
