"""Baselines and the benchmark table: real runs, same splits, numbers traceable to metrics files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli.artifacts import load_pixels
from manifpt_cli.cli import app
from manifpt_cli.errors import UsageError
from manifpt_cli.research.baselines import BASELINES, azimuthal_spectrum, blur_jpeg_augment, parse_baselines

from .conftest import SOURCES


def test_azimuthal_spectrum_of_a_flat_image_is_all_dc():
    flat = np.full((1, 32, 32, 3), 100, np.uint8)
    profile = azimuthal_spectrum(flat)
    assert profile.shape == (1, int(round(16 * np.sqrt(2))) + 1)
    assert profile[0, 0] == 1.0 and np.allclose(profile[0, 1:], 0)


def test_spectrum_ignores_brightness_scale():
    # log power + per-image min-max: scaling the image by c shifts every bin by log(c²), which cancels.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 128, (3, 32, 32, 3)).astype(np.uint8)
    assert np.allclose(azimuthal_spectrum(image), azimuthal_spectrum(image * 2), atol=1e-5)


def test_wang20_augmentation_is_seeded_and_changes_images():
    batch = torch.rand(6, 3, 32, 32)
    first, again = blur_jpeg_augment(3)(batch), blur_jpeg_augment(3)(batch)
    assert first.shape == batch.shape and torch.equal(first, again)
    assert 0 <= first.min() and first.max() <= 1 and not torch.equal(first, batch)


def test_wang20_blur_reaches_four_sigma_and_imagenet_weights_initialise_all_but_the_stem():
    from manifpt_cli.research.baselines import blur_kernel_size, imagenet_initialiser
    from models import create_model

    assert [blur_kernel_size(s) for s in (0.001, 0.5, 1.0, 3.0)] == [3, 5, 9, 25]
    initialise, note = imagenet_initialiser("random:0")  # stands in for ImageNet weights on disk
    assert note.startswith("ImageNet init (random:0")
    model = create_model("resnet50", (3, 32, 32), 3)
    stem = model.body.conv1.weight.clone()
    initialise(model)
    from manifpt_cli.spaces import Space, load_backbone

    trunk = load_backbone(Space.SL, "random:0")[0].trunk
    assert torch.equal(model.body.layer3[1].conv2.weight, trunk.layer3[1].conv2.weight)
    assert torch.equal(model.body.conv1.weight, stem), "the 3×3 stem cannot take the 7×7 ImageNet stem"


def test_parse_baselines():
    assert [b.name for b in parse_baselines("all")] == list(BASELINES)
    assert parse_baselines("none") == [] and [b.name for b in parse_baselines("durall20")] == ["durall20"]
    with pytest.raises(UsageError, match="yu19, durall20, wang20"):
        parse_baselines("marra19")


def test_samples_keep_the_decoded_pixels(artifacts_file):
    samples = load_pixels(artifacts_file)
    assert samples.pixels.dtype == np.uint8 and samples.pixels.shape[1:] == (32, 32, 3)
    assert samples.samples.label_names == list(SOURCES)


def test_benchmark_table_comes_from_the_runs(real_index, dataset, tmp_path):
    sources = [arg for name in SOURCES for arg in ("--source", f"{name}={dataset / 'train' / name}")]
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            "--index",
            str(real_index),
            *sources,
            "--out",
            str(tmp_path),
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--baseline-arch",
            "small",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "estimated training time" in result.stderr and "wang20 (small)" in result.stderr
    assert "epoch   1/2" not in result.stderr, "the bar replaces the per-epoch lines"
    with Image.open(tmp_path / "summary.png") as chart:
        assert chart.format == "PNG" and chart.width >= 1200 and chart.height >= 400
    with open(tmp_path / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = ["ManiFPT rgb", "ManiFPT freq", "joint image+rgb", "joint image+freq", "yu19", "durall20", "wang20"]
    assert [row["method"] for row in rows] == methods
    for row, folder in zip(rows, ["rgb", "freq", "image_rgb", "image_freq", "yu19", "durall20", "wang20"]):
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert float(row["accuracy_mean"]) == pytest.approx(metrics["accuracy_mean"], abs=1e-4)
        assert float(row["fd_ratio_inputs"]) == pytest.approx(metrics["fd_ratio_inputs"], rel=1e-3, abs=1e-4)
        assert (
            metrics["runs"][0]["test_size"]
            == json.loads((tmp_path / "rgb" / "metrics.json").read_text())["runs"][0]["test_size"]
        )
    assert "ManiFPT freq" in (tmp_path / "table.md").read_text() and "durall20" in result.stdout


def test_benchmark_bar_weights_epochs_by_cost_and_sums_to_the_total():
    from manifpt_cli.progress import Progress
    from manifpt_cli.research.benchmark import Estimate, _WeightedEpochs

    class Recorder(Progress):
        def start(self, description, total):
            self.total, self.done, self.fields = total, 0.0, {}

        def advance(self, steps=1, **fields):
            self.done += steps
            self.fields = fields

    recorder = Recorder()
    estimate = Estimate({"fast": 1.0, "slow": 9.0}, runs_per_method=2, epochs=3, probe_samples=128)
    bar = _WeightedEpochs(recorder, estimate, ["fast", "slow"])
    assert recorder.total == 12
    bar.begin("fast")
    bar.start("Training small on fast", 3)
    bar.advance(3)
    assert recorder.done == pytest.approx(3 * 0.2) and recorder.fields == {"run": "1/4 fast"}
    bar.start("Training small on fast", 3)
    bar.advance(3)
    bar.begin("slow")
    for _ in range(2):
        bar.start("Training resnet50 on slow", 3)
        bar.advance(3)
    assert recorder.done == pytest.approx(12) and recorder.fields == {"run": "4/4 slow"}
    assert estimate.total_seconds == pytest.approx(2 * 3 * 10)


def test_summary_chart_title_names_the_data_and_the_best_method():
    from manifpt_cli.research.benchmark import duration, summary_figure
    from manifpt_cli.research.figures import pyplot

    rows = [
        {
            "method": "ManiFPT freq",
            "accuracy_mean": 0.85,
            "accuracy_std": 0.054,
            "fd_ratio_features": 6.5,
            "fd_ratio_inputs": 1.5,
        },
        {
            "method": "yu19",
            "accuracy_mean": 0.49,
            "accuracy_std": 0.031,
            "fd_ratio_features": 0.8,
            "fd_ratio_inputs": 0.001,
        },
    ]
    fig = summary_figure(rows, ["jpeg", "blur", "noise"], seeds=3, epochs=15)
    title = fig._suptitle.get_text()
    assert "3 classes" in title and "3 seed(s) × 15 epochs" in title
    assert "best: ManiFPT freq, accuracy 85.0 ± 5.4 %" in title
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["yu19", "ManiFPT freq"]
    pyplot().close(fig)
    assert [duration(s) for s in (2.5, 45, 600, 11_100)] == ["2.5 s", "45 s", "10 min", "3 h 05 min"]
