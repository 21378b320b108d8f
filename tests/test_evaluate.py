"""Evaluation: FD ratio, per-class scores, and the evaluate command on real artifacts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.openset import DEFAULT_SCORE, SCORES
from manifpt_cli.perturb import parse_perturbations
from manifpt_cli.research.evaluate import confusion_matrix, evaluate, fisher_ratio, per_class_scores
from manifpt_cli.spaces import Space
from manifpt_cli.train import TrainConfig


def test_fisher_ratio_matches_the_scatter_matrix_definition():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [10, 15, 20])
    x = rng.normal(size=(45, 4)) + labels[:, None] * np.array([1.0, 0.5, 0.0, 2.0])
    mu = x.mean(0)
    s_b = sum(
        (labels == c).sum() * np.outer(x[labels == c].mean(0) - mu, x[labels == c].mean(0) - mu) for c in range(3)
    )
    s_w = sum((x[labels == c] - x[labels == c].mean(0)).T @ (x[labels == c] - x[labels == c].mean(0)) for c in range(3))
    assert fisher_ratio(x, labels) == pytest.approx(np.trace(s_b) / np.trace(s_w))


def test_fisher_ratio_orders_separability():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 50)
    noise = rng.normal(size=(100, 8))
    assert fisher_ratio(noise + labels[:, None] * 5, labels) > 10 * fisher_ratio(noise + labels[:, None] * 0.5, labels)


def test_per_class_scores_from_a_known_confusion():
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    confusion = confusion_matrix(truth, predicted, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = per_class_scores(confusion, ["a", "b", "c"])
    assert scores[0] == {
        "class": "a",
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert scores[1]["precision"] == pytest.approx(0.5) and scores[1]["recall"] == pytest.approx(0.5)
    assert scores[2]["precision"] == pytest.approx(0.5) and scores[2]["recall"] == 1.0


def test_evaluate_writes_consistent_metrics_and_figures(artifacts_file, tmp_path):
    result = evaluate(
        artifacts_file,
        Space.FREQ,
        tmp_path / "eval",
        seeds=2,
        test_fraction=0.25,
        config=TrainConfig(arch="small", epochs=4),
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in metrics["runs"]]))
    test_size = metrics["runs"][0]["test_size"]
    assert np.array(metrics["confusion"]).sum() == 2 * test_size
    assert np.trace(np.array(metrics["confusion"])) / (2 * test_size) == pytest.approx(result.accuracy_mean)
    assert result.accuracy_mean > 0.4, "four separable sources: well above chance (0.25)"
    with open(tmp_path / "eval" / "per_class.csv", newline="") as handle:
        assert [row["class"] for row in csv.DictReader(handle)] == ["jpeg", "blur", "nearest", "noise"]
    for name in ("confusion.png", "tsne.png", "reliability.png"):
        with Image.open(tmp_path / "eval" / name) as figure:
            assert figure.format == "PNG" and figure.width >= 600 and figure.height >= 500, name
    with open(tmp_path / "eval" / "tsne.csv", newline="") as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == test_size


def test_evaluate_cli(artifacts_file, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--artifacts",
            str(artifacts_file),
            "--space",
            "rgb",
            "--out",
            str(tmp_path / "e"),
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--perturb",
            "blur:1",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "accuracy" in result.stdout and "FD ratio" in result.stdout
    assert "calibration: ECE" in result.stdout and "blur:1: accuracy" in result.stdout


def test_evaluate_open_set_calibration_and_robustness(artifacts_file, tmp_path):
    perturbations = parse_perturbations("jpeg:75,resize:0.5")
    result = evaluate(
        artifacts_file,
        Space.FREQ,
        tmp_path / "stress",
        seeds=1,
        test_fraction=0.25,
        config=TrainConfig(epochs=4),
        open_set=True,
        perturbations=perturbations,
        augment=parse_perturbations("jpeg:75"),
    )
    metrics = json.loads((tmp_path / "stress" / "metrics.json").read_text())
    open_set = metrics["open_set"]
    assert set(open_set["per_held_out"]) == {"jpeg", "blur", "nearest", "noise"}
    assert open_set["auroc"] == pytest.approx(np.mean([f["auroc"] for f in open_set["per_held_out"].values()]))
    assert set(open_set["by_score"]) == set(SCORES) and open_set["score"] == DEFAULT_SCORE
    for fold in open_set["per_held_out"].values():
        assert 0 <= fold["oscr"] <= 1 and 0 <= fold["auroc"] <= 1
        assert 0 <= fold["tnr_at_tpr95"] <= 1
    calibration = metrics["calibration"]
    assert sum(b["count"] for b in calibration["reliability"]) == metrics["runs"][0]["test_size"]
    assert {"ece", "brier", "ece_before", "brier_before"} <= set(calibration)
    assert metrics["protocol"]["augment"] == ["jpeg:75"]
    jpeg, resize = metrics["robustness"]["jpeg:75"], metrics["robustness"]["resize:0.5"]
    assert resize["inconclusive"] == 1.0, "resampled test images, a model not trained with resizing"
    assert jpeg["inconclusive"] == 0.0, "JPEG q75 is covered by the jpeg:75 augmentation"
    assert jpeg["accuracy_ratio"] == pytest.approx(jpeg["accuracy"] / metrics["accuracy_mean"])
    verdicts = metrics["verdicts"]
    assert sum(verdicts.values()) == pytest.approx(1.0)
    for name in ("reliability.png", "robustness.png"):
        assert result.files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_rows_are_normalised_and_the_title_carries_the_accuracy():
    from manifpt_cli.research.evaluate import confusion_figure
    from manifpt_cli.research.figures import pyplot, row_shares

    confusion = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 3]])
    shares = row_shares(confusion)
    assert shares.sum(axis=1).tolist() == pytest.approx([1.0, 0.0, 1.0]), "an empty class stays zero"
    assert shares[0].tolist() == pytest.approx([0.8, 0.2, 0.0])
    details = ["freq (artifact input)", "small attributor", "artifacts.h5: 3 classes", "18 test images over 3 seed(s)"]
    fig = confusion_figure(confusion, ["gan", "vae", "diffusion-unet"], details, "accuracy 0.992 ± 0.004")
    title = fig.axes[0].get_title()
    assert "rows normalised" in title and "accuracy 0.992 ± 0.004" in title and "small attributor" in title
    cells = [text.get_text() for text in fig.axes[0].texts]
    assert "0.80\n(8)" in cells and len(cells) == 9
    pyplot().close(fig)


def test_tsne_view_keeps_the_bulk_spread_when_two_points_are_far_out():
    from manifpt_cli.research.figures import robust_view

    rng = np.random.default_rng(0)
    points = rng.uniform(-130, 130, (200, 2))
    points[:2] = [[700, 700], [-700, -700]]
    view = robust_view(points)
    assert view.clipped.sum() == 2 and view.clipped[:2].all()
    inner = np.percentile(points[2:], [1, 99], axis=0)
    assert ((inner[1] - inner[0]) / (view.upper - view.lower) > 0.7).all(), "the bulk fills most of each axis"
    assert (view.shown >= view.lower).all() and (view.shown <= view.upper).all()
    plain = robust_view(points[2:])
    assert not plain.clipped.any(), "without outliers nothing is clipped"
