"""Fingerprint structure (the paper's Table 5): do generators' fingerprints cluster by design choice?

Method:
1. Each generator's fingerprint is summarised as the per-dimension mean and standard deviation of
   its artifacts in one space, and each summary dimension is standardised across generators.
2. The summaries are clustered hierarchically (Ward linkage on Euclidean distance).
3. For each design factor with k ≥ 2 distinct values (upsampling, loss, normalisation, family…),
   the tree is cut into k clusters and scored against the factor's values with normalised mutual
   information (NMI, arithmetic mean; 1 = the clusters are the factor's groups, 0 = unrelated).

Factors come from zoo checkpoints (their ``design``) or from a CSV with a ``generator`` column and
one column per factor.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import load_artifacts
from ..errors import UsageError
from ..outputs import atomic_output, results_folder
from ..spaces import Space
from .figures import annotated_heatmap, pyplot, save_figure, set_title

ZOO_FACTORS = ("family", "upsample", "norm", "loss", "depth", "skip_connections")


def zoo_factors(zoo_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """generator name → {factor: value} from every zoo checkpoint under ``zoo_dir``."""
    from .zoo import list_zoo

    return {meta["name"]: {f: str(meta["design"][f]) for f in ZOO_FACTORS} for meta in list_zoo(zoo_dir)}


def csv_factors(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """generator name → {factor: value} from a CSV whose first column is ``generator``."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "generator" not in rows[0]:
        raise UsageError(f"{path} needs a header with a 'generator' column and one column per design factor")
    return {row["generator"]: {k: v for k, v in row.items() if k != "generator"} for row in rows}


def fingerprint_summaries(artifacts: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """name → concatenated per-dimension mean and std of that class's flattened artifacts."""
    flat = artifacts.reshape(len(artifacts), -1).astype(np.float64)
    return {
        name: np.concatenate([flat[labels == i].mean(axis=0), flat[labels == i].std(axis=0)])
        for i, name in enumerate(names)
        if (labels == i).any()
    }


@dataclass
class ClusterAnalysis:
    generators: list[str]
    scores: list[dict]  # factor, values, nmi
    distances: np.ndarray  # (g, g) Euclidean distances between standardised fingerprints
    linkage: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)  # factor → why it was not scored
    files: dict[str, Path] = field(default_factory=dict)


def cluster_fingerprints(summaries: dict[str, np.ndarray], factors: dict[str, dict[str, str]]) -> ClusterAnalysis:
    """Cluster the generators that have both a fingerprint and factors; score each factor by NMI."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import normalized_mutual_info_score

    generators = [name for name in summaries if name in factors]
    if len(generators) < 3:
        raise UsageError(
            f"need at least 3 generators with both artifacts and design factors; matched {generators or 'none'} "
            f"(artifact classes: {', '.join(summaries)}; factor rows: {', '.join(factors)})"
        )
    matrix = np.stack([summaries[name] for name in generators])
    spread = matrix.std(axis=0)
    standardised = (matrix - matrix.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    tree = linkage(standardised, method="ward")
    scores, skipped = [], {}
    for factor in sorted({f for name in generators for f in factors[name]}):
        values = [factors[name].get(factor, "") for name in generators]
        distinct = sorted(set(values))
        if len(distinct) < 2:
            skipped[factor] = f"one value only ({distinct[0]!r})"
            continue
        if len(distinct) == len(generators):
            skipped[factor] = "every generator has its own value"
            continue
        clusters = fcluster(tree, t=len(distinct), criterion="maxclust")
        nmi = normalized_mutual_info_score(values, clusters)
        scores.append({"factor": factor, "values": len(distinct), "nmi": float(nmi)})
    scores.sort(key=lambda row: -row["nmi"])
    return ClusterAnalysis(generators, scores, squareform(pdist(standardised)), tree, skipped)


def figure_details(analysis: ClusterAnalysis, space: Space, source: str | os.PathLike) -> list[str]:
    """What the cluster figures are about, and their headline: the factor the tree follows best."""
    details = [f"{space.value} artifacts of {Path(source).name}", f"{len(analysis.generators)} generators"]
    if analysis.scores:
        top = analysis.scores[0]["nmi"]
        best = [row["factor"] for row in analysis.scores if row["nmi"] == top]
        details.append(f"best factor{'s' * (len(best) > 1)} {' and '.join(best)} (NMI {top:.2f})")
    return details


def dendrogram_figure(analysis: ClusterAnalysis, details: list[str]):
    plt = pyplot()
    from scipy.cluster.hierarchy import dendrogram

    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(analysis.generators) + 2.5))
    dendrogram(analysis.linkage, labels=analysis.generators, orientation="right", ax=ax)
    ax.set_xlabel("Ward linkage distance (standardised fingerprints)")
    ax.set_ylabel("generator")
    set_title(ax, "Fingerprint dendrogram", details)
    return fig


def distance_figure(analysis: ClusterAnalysis, details: list[str]):
    plt = pyplot()
    size = 3 + 0.6 * len(analysis.generators)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    cells = np.vectorize(lambda d: f"{d:.1f}")(analysis.distances)
    generators = analysis.generators
    annotated_heatmap(
        ax, analysis.distances, generators, generators, cells, colorbar_label="Euclidean distance (standardised)"
    )
    ax.set_xlabel("generator")
    ax.set_ylabel("generator")
    set_title(ax, "Distances between fingerprints", details)
    return fig


def analyze_clusters(
    artifacts_path: str | os.PathLike,
    space: Space,
    out_dir: str | os.PathLike,
    zoo_dir: str | os.PathLike | None = None,
    factors_csv: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> ClusterAnalysis:
    """Run the analysis on one space of an artifacts file; writes CSV tables and PNG figures."""
    if (zoo_dir is None) == (factors_csv is None):
        raise UsageError("give the design factors with exactly one of zoo_dir (--zoo) or factors_csv (--factors)")
    factors = zoo_factors(zoo_dir) if zoo_dir is not None else csv_factors(factors_csv)
    data = load_artifacts(artifacts_path, space)
    summaries = fingerprint_summaries(data.artifacts, data.samples.labels, data.samples.label_names)
    analysis = cluster_fingerprints(summaries, factors)
    names = ("clusters.csv", "distances.csv", "linkage.csv", "dendrogram.png", "heatmap.png")
    inputs = [artifacts_path, *(path for path in (zoo_dir, factors_csv) if path is not None)]
    out = results_folder(out_dir, names, inputs=inputs, overwrite=overwrite)
    analysis.files = {name: out / name for name in names}
    with (
        atomic_output(analysis.files["clusters.csv"], overwrite=True) as partial,
        open(partial, "w", newline="") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=["factor", "values", "nmi"])
        writer.writeheader()
        writer.writerows(analysis.scores)
    with (
        atomic_output(analysis.files["distances.csv"], overwrite=True) as partial,
        open(partial, "w", newline="") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["generator", *analysis.generators])
        writer.writerows([name, *map(float, row)] for name, row in zip(analysis.generators, analysis.distances))
    with (
        atomic_output(analysis.files["linkage.csv"], overwrite=True) as partial,
        open(partial, "w", newline="") as handle,
    ):
        writer = csv.writer(handle)  # scipy's linkage matrix: the dendrogram's data
        writer.writerow(["cluster_a", "cluster_b", "distance", "size"])
        writer.writerows([int(a), int(b), float(d), int(n)] for a, b, d, n in analysis.linkage)
    details = figure_details(analysis, space, artifacts_path)
    save_figure(dendrogram_figure(analysis, details), analysis.files["dendrogram.png"])
    save_figure(distance_figure(analysis, details), analysis.files["heatmap.png"])
    return analysis
