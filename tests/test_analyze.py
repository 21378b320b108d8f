"""Fingerprint cluster analysis: NMI of clusters against design factors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.errors import UsageError
from manifpt_cli.research.analyze import cluster_fingerprints, fingerprint_summaries

from .conftest import SOURCES


def nmi_of_saved_tree(out: Path, factor: dict[str, str]) -> float:
    """NMI recomputed from the files the analysis wrote: its linkage cut into as many clusters as
    the factor has values, against those values (independent of the code under test)."""
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import normalized_mutual_info_score

    with open(out / "distances.csv", newline="") as handle:
        generators = next(csv.reader(handle))[1:]
    with open(out / "linkage.csv", newline="") as handle:
        tree = np.array([[float(v) for v in row.values()] for row in csv.DictReader(handle)])
    values = [factor[name] for name in generators]
    clusters = fcluster(tree, t=len(set(values)), criterion="maxclust")
    return normalized_mutual_info_score(values, clusters)


def test_clusters_that_follow_a_factor_score_one():
    rng = np.random.default_rng(0)
    names = [f"g{i}" for i in range(6)]
    centres = {"tconv": rng.normal(0, 1, 16) * 10, "nearest": rng.normal(0, 1, 16) * 10}
    upsample = ["tconv"] * 3 + ["nearest"] * 3
    summaries = {n: centres[u] + rng.normal(0, 0.1, 16) for n, u in zip(names, upsample)}
    factors = {
        n: {"upsample": u, "loss": ["ns", "hinge"][i % 2], "norm": "batch"}
        for i, (n, u) in enumerate(zip(names, upsample))
    }
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
    factors.write_text(
        "generator,operation,domain\njpeg,compress,frequency\nblur,filter,spatial\n"
        "nearest,resample,spatial\nnoise,additive,spatial\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "analyze",
            "clusters",
            "--artifacts",
            str(artifacts_file),
            "--space",
            "freq",
            "--factors",
            str(factors),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    with open(tmp_path / "out" / "clusters.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["factor"] for row in rows] == ["domain"]
    domain = {"jpeg": "frequency", "blur": "spatial", "nearest": "spatial", "noise": "spatial"}
    assert float(rows[0]["nmi"]) == pytest.approx(nmi_of_saved_tree(tmp_path / "out", domain))
    assert "operation" in result.stderr  # four values for four generators: not scored, and said so
    for name in ("dendrogram.png", "heatmap.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "out" / "distances.csv", newline="") as handle:
        assert next(csv.reader(handle))[1:] == list(SOURCES)


def test_zoo_generators_through_extract_evaluate_and_clusters(tmp_path, dataset):
    """The issue's setting in small: real photos → zoo generators → artifacts → evaluate + clusters."""
    from manifpt_cli.artifacts import extract_artifacts
    from manifpt_cli.manifold import build_index
    from manifpt_cli.research.analyze import analyze_clusters
    from manifpt_cli.research.evaluate import evaluate
    from manifpt_cli.research.zoo import make_design, sample_generator, train_generator
    from manifpt_cli.spaces import Space
    from manifpt_cli.train import TrainConfig

    zoo = tmp_path / "zoo"
    plan = [
        ("gan-tconv", "gan", "tconv", "batch", "ns"),
        ("gan-nearest", "gan", "nearest", "batch", "hinge"),
        ("vae-tconv", "vae", "tconv", "batch", None),
        ("flow", "flow", None, None, None),
    ]
    for name, family, upsample, norm, loss in plan:
        design = make_design(family, upsample, norm, loss, size=16, width=8)
        train_generator([dataset / "real"], zoo / name, design, iters=5, batch_size=8)
        sample_generator(zoo / name, 16, tmp_path / "fakes" / name, seed=1)
    build_index([dataset / "real"], tmp_path / "real16.h5", [Space.FREQ], size=16)
    extract_artifacts(tmp_path / "real16.h5", [(n, str(tmp_path / "fakes" / n)) for n, *_ in plan], tmp_path / "zoo.h5")

    evaluation = evaluate(tmp_path / "zoo.h5", Space.FREQ, tmp_path / "eval", seeds=1, config=TrainConfig(epochs=3))
    assert evaluation.accuracy_mean > 0.25, "four generators: above chance"
    analysis = analyze_clusters(tmp_path / "zoo.h5", Space.FREQ, tmp_path / "clusters", zoo_dir=zoo)
    scored = {row["factor"]: row["nmi"] for row in analysis.scores}
    assert {"family", "upsample"} <= set(scored)
    for factor in ("family", "upsample"):
        values = {name: str(getattr(make_design(*choices, size=16, width=8), factor)) for name, *choices in plan}
        assert scored[factor] == pytest.approx(nmi_of_saved_tree(tmp_path / "clusters", values)), factor
    with open(tmp_path / "clusters" / "linkage.csv", newline="") as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == len(plan) - 1  # n − 1 merges
