"""Fingerprint cluster analysis: NMI of clusters against design factors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from manifpt_cli.analyze import cluster_fingerprints, fingerprint_summaries
from manifpt_cli.cli import app
from manifpt_cli.errors import UsageError

from .conftest import SOURCES


def test_clusters_that_follow_a_factor_score_one():
    rng = np.random.default_rng(0)
    names = [f"g{i}" for i in range(6)]
    centres = {"tconv": rng.normal(0, 1, 16) * 10, "nearest": rng.normal(0, 1, 16) * 10}
    upsample = ["tconv"] * 3 + ["nearest"] * 3
    summaries = {n: centres[u] + rng.normal(0, 0.1, 16) for n, u in zip(names, upsample)}
    factors = {n: {"upsample": u, "loss": ["ns", "hinge"][i % 2], "norm": "batch"} for i, (n, u) in enumerate(zip(names, upsample))}
    analysis = cluster_fingerprints(summaries, factors)
    scores = {row["factor"]: row["nmi"] for row in analysis.scores}
    assert scores["upsample"] == pytest.approx(1.0)
    assert scores["loss"] < 0.5
    assert analysis.skipped == {"norm": "one value only ('batch')"}
    assert analysis.distances.shape == (6, 6) and np.allclose(np.diag(analysis.distances), 0)


def test_summaries_are_per_class_mean_and_std():
    artifacts = np.array([[1.0, 2.0], [3.0, 2.0], [10.0, 10.0], [10.0, 12.0]])
    summaries = fingerprint_summaries(artifacts, np.array([0, 0, 1, 1]), ["a", "b"])
    assert summaries["a"].tolist() == [2.0, 2.0, 1.0, 0.0] and summaries["b"].tolist() == [10.0, 11.0, 0.0, 1.0]


def test_too_few_matched_generators_is_a_usage_error():
    with pytest.raises(UsageError, match="at least 3 generators"):
        cluster_fingerprints({"a": np.zeros(2), "b": np.ones(2)}, {"a": {"f": "x"}, "c": {"f": "y"}})


def test_analyze_clusters_cli_with_a_factors_csv(artifacts_file, tmp_path):
    factors = tmp_path / "factors.csv"
    factors.write_text("generator,operation,domain\njpeg,compress,frequency\nblur,filter,spatial\n"
                       "nearest,resample,spatial\nnoise,additive,spatial\n")  # fmt: skip
    result = CliRunner().invoke(app, ["analyze", "clusters", "--artifacts", str(artifacts_file), "--space", "freq",
                                      "--factors", str(factors), "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with open(tmp_path / "out" / "clusters.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["factor"] for row in rows] == ["domain"] and 0 <= float(rows[0]["nmi"]) <= 1
    assert "operation" in result.stderr  # four values for four generators: not scored, and said so
    for name in ("dendrogram.png", "heatmap.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "out" / "distances.csv", newline="") as handle:
        assert next(csv.reader(handle))[1:] == list(SOURCES)
