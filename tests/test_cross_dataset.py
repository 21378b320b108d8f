"""The cross-dataset protocol: train on one dataset's generators, test on another's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.errors import UsageError
from manifpt_cli.research.evaluate import match_labels


def test_match_by_name_keeps_shared_classes():
    match = match_labels(["a", "b", "c"], ["b", "c", "d"])
    assert match.classes == ["b", "c"] and match.dropped_train == ["a"] and match.dropped_test == ["d"]


def test_match_by_design_factor():
    factors = {
        "sngan": {"family": "gan"},
        "dcgan": {"family": "gan"},
        "nvae": {"family": "vae"},
        "stylegan": {"family": "gan"},
        "betavae": {"family": "vae"},
        "glow": {"family": "flow"},
    }
    match = match_labels(["sngan", "nvae", "glow"], ["dcgan", "stylegan", "betavae"], by="family", factors=factors)
    assert match.classes == ["gan", "vae"] and match.dropped_train == ["glow"] and match.dropped_test == []
    # `extract` adds a real class by default; it has no design factors and matches by its name.
    with_real = match_labels(["sngan", "real"], ["dcgan", "real"], by="family", factors=factors)
    assert with_real.classes == ["gan", "real"] and with_real.dropped_train == with_real.dropped_test == []
    with pytest.raises(UsageError, match="no 'family' value for: other"):
        match_labels(["sngan", "other"], ["dcgan"], by="family", factors=factors)
    with pytest.raises(UsageError, match="fewer than two classes"):
        match_labels(["sngan"], ["nvae"], by="family", factors=factors)


def test_cross_dataset_cli(real_index, dataset, artifacts_file, tmp_path):
    from manifpt_cli.artifacts import extract_artifacts

    # A second "dataset": other images of the same four processes, one of them under another name.
    renamed = {"jpeg": "jpeg_q15", "blur": "blur", "nearest": "nearest", "noise": "noise"}
    other = tmp_path / "other.h5"
    extract_artifacts(real_index, [(renamed[n], str(dataset / "suspects" / n)) for n in renamed], other)
    factors = tmp_path / "factors.csv"
    factors.write_text(
        "generator,process\njpeg,compression\njpeg_q15,compression\nblur,filter\nnearest,resampling\nnoise,additive\n"
    )
    runner = CliRunner()

    def cross(out: str, *extra: str):
        args = [
            "evaluate",
            "--artifacts",
            artifacts_file,
            "--test-artifacts",
            other,
            "--space",
            "freq",
            "--out",
            tmp_path / out,
            "--seeds",
            "1",
            "--epochs",
            "3",
            *extra,
        ]
        return runner.invoke(app, [str(a) for a in args])

    by_name = cross("a")
    assert by_name.exit_code == 0, by_name.stderr
    assert "left out of the training set: jpeg" in by_name.stderr and "jpeg_q15" in by_name.stderr
    by_factor = cross("b", "--match-by", "process", "--factors", str(factors))
    assert by_factor.exit_code == 0, by_factor.stderr
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["classes"] == ["additive", "compression", "filter", "resampling"]
    assert metrics["protocol"]["cross_dataset"] is True
    assert metrics["runs"][0]["test_size"] == sum(1 for _ in (dataset / "suspects").rglob("*.png"))
    bad = runner.invoke(
        app,
        [
            "evaluate",
            "--artifacts",
            str(artifacts_file),
            "--space",
            "freq",
            "--out",
            str(tmp_path / "c"),
            "--match-by",
            "process",
        ],
    )
    assert bad.exit_code == 2
