"""A verdict for every suspect, and the notes that can weaken it (README, "Verdicts").

The rule, in order:

1. ``inconclusive`` if a note weakens the evidence: the image was resampled to the index's size,
   JPEG-compressed harder than anything the model was trained on, or lies further from the real
   images than 99.5 % of the training images did (see :meth:`VerdictRule.notes`).
2. ``unknown`` if the open-set score is below the model's threshold (set on validation data at the
   model's target false-alarm rate): none of the known sources. Without a ``real`` class, a real
   photograph also lands here, so ``unknown`` then means "not one of the known generators".
3. Otherwise the predicted class: a known source, or ``real``.
"""

from __future__ import annotations

from dataclasses import dataclass

REAL = "real"
UNKNOWN = "unknown"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Note:
    """Something about a suspect that bears on its verdict; ``weakens`` notes make it inconclusive."""

    code: str  # resampled, jpeg, off-manifold
    text: str
    weakens: bool

    def __str__(self) -> str:
        return f"{self.code}: {self.text}" + ("" if self.weakens else " (trained for)")


class VerdictRule:
    """The verdict rule of one model, from its card."""

    def __init__(self, card: dict) -> None:
        open_set = card["open_set"]
        self.score: str = open_set["score"]
        self.threshold = float(open_set["threshold"])
        self.target_fpr = float(open_set["target_fpr"])
        bound = open_set.get("false_alarm_bound")  # models exported before it was recorded lack it
        self.false_alarm_bound = float(bound) if bound is not None else None
        self.graph_scores: list[str] = list(open_set["graph_scores"])
        self.image_size = int(card["image_size"])
        self.reference_distance = float(card["manifold_reference"]["distance"])
        self.has_real_class = bool(card.get("has_real_class", False))
        augment = card.get("training", {}).get("augment", [])
        kinds = {name.split(":")[0] for name in augment}
        self.trained_resampling = bool(kinds & {"resize", "crop"})
        qualities = [float(name.split(":")[1]) for name in augment if name.startswith("jpeg:")]
        self.lowest_trained_quality = min(qualities) if qualities else None

    def score_of(self, graph_scores, distance: float) -> float:
        """This model's open-set score of one suspect, from the graph's scores and its manifold distance."""
        if self.score == "manifold":
            return -float(distance)
        return float(graph_scores[self.graph_scores.index(self.score)])

    def notes(self, original_size: tuple[int, int] | None, jpeg_quality: int | None, distance: float) -> list[Note]:
        notes = []
        size = self.image_size
        if original_size is not None and tuple(original_size) != (size, size):
            width, height = original_size
            notes.append(
                Note("resampled", f"{width}×{height} brought to {size}×{size}", weakens=not self.trained_resampling)
            )
        if jpeg_quality is not None:
            covered = self.lowest_trained_quality is not None and self.lowest_trained_quality <= jpeg_quality
            notes.append(Note("jpeg", f"JPEG, estimated quality {jpeg_quality}", weakens=not covered))
        if distance > self.reference_distance:
            notes.append(
                Note(
                    "off-manifold",
                    f"distance {distance:.4g} to the nearest real image is above {self.reference_distance:.4g}, "
                    "the 99.5th percentile of the training images'",
                    weakens=True,
                )
            )
        return notes

    def decide(self, predicted: str, score: float, notes: list[Note]) -> str:
        if any(note.weakens for note in notes):
            return INCONCLUSIVE
        if not score >= self.threshold:  # NaN is never above a threshold
            return UNKNOWN
        return predicted

    def describe(self) -> dict:
        """The rule as the report header states it."""
        return {
            "open_set_score": self.score,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            **({"false_alarm_bound": self.false_alarm_bound} if self.false_alarm_bound is not None else {}),
            "has_real_class": self.has_real_class,
            "unknown_means": "none of the known sources"
            if self.has_real_class
            else "none of the known generators (the model has no real class: real photos are unknown too)",
            "inconclusive_when": [
                "resampled to the index size"
                + (" (not: the model was trained with resizing)" if self.trained_resampling else ""),
                "JPEG below the lowest quality trained with"
                + (
                    f" ({self.lowest_trained_quality:g})"
                    if self.lowest_trained_quality
                    else " (any JPEG: none trained)"
                ),
                f"manifold distance above {self.reference_distance:.6g} (99.5th percentile of training)",
            ],
        }
