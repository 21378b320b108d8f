"""`manifpt benchmark`: ManiFPT spaces and baselines on the same data, in a table shaped like the
paper's Table 2 (accuracy mean ± std over seeds, FD ratios), written as Markdown and CSV.

Every number in the table comes from the runs made here; nothing is copied from the paper.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifacts import extract_artifacts, load_pixels
from ..inputs import InputKind, auto_candidates
from ..outputs import atomic_output, results_folder
from ..settings import DEFAULT_SETTINGS, RunSettings
from ..spaces import Space
from ..train import TrainConfig
from .baselines import Baseline, baseline_inputs, imagenet_initialiser
from .evaluate import Evaluation, evaluate_set

COLUMNS = (
    "method",
    "input",
    "arch",
    "accuracy_mean",
    "accuracy_std",
    "fd_ratio_features",
    "fd_ratio_inputs",
    "seconds",
)


@dataclass
class BenchmarkResult:
    out_dir: Path
    evaluations: list[tuple[str, str, Evaluation]] = field(default_factory=list)  # (method, input, result)
    table_markdown: Path | None = None
    table_csv: Path | None = None

    def rows(self) -> list[dict]:
        return [
            {
                "method": method,
                "input": what,
                "arch": e.arch,
                "accuracy_mean": round(e.accuracy_mean, 4),
                "accuracy_std": round(e.accuracy_std, 4),
                "fd_ratio_features": round(e.fd_ratio_features_mean, 4),
                "fd_ratio_inputs": round(e.fd_ratio_inputs, 4),
                "seconds": round(e.seconds, 1),
            }
            for method, what, e in self.evaluations
        ]


def markdown_table(rows: list[dict], classes: list[str], seeds: int) -> str:
    lines = [
        f"Attribution among {len(classes)} sources ({', '.join(classes)}); mean ± std over {seeds} seed(s).",
        "",
        "| method | input | arch | accuracy % | FD ratio (features) | FD ratio (inputs) |",
        "|---|---|---|---:|---:|---:|",
    ]
    best = max(row["accuracy_mean"] for row in rows)
    for row in rows:
        accuracy = f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}"
        if row["accuracy_mean"] == best:
            accuracy = f"**{accuracy}**"
        features, inputs = f"{row['fd_ratio_features']:.2f}", f"{row['fd_ratio_inputs']:.3f}"
        lines.append(f"| {row['method']} | {row['input']} | {row['arch']} | {accuracy} | {features} | {inputs} |")
    return "\n".join(lines) + "\n"


def run_benchmark(
    index_path: str | os.PathLike,
    sources: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    spaces: Sequence[Space] | None = None,
    baselines: Sequence[Baseline] = (),
    real: str | os.PathLike | None = None,
    seeds: int = 3,
    test_fraction: float = 0.2,
    config: TrainConfig | None = None,
    baseline_arch: str | None = None,
    weights: dict[Space, str | None] | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> BenchmarkResult:
    """Extract artifacts, evaluate every space and baseline with one protocol, write the table."""
    config = config or TrainConfig()
    inputs = [index_path, *(folder for _, folder in sources), *([real] if real else [])]
    out = results_folder(out_dir, ["artifacts.h5", "table.md", "table.csv"], inputs=inputs, overwrite=overwrite)
    artifacts = out / "artifacts.h5"
    extracted = extract_artifacts(
        index_path,
        sources,
        artifacts,
        spaces=spaces,
        real=real,
        weights=weights,
        settings=settings,
        overwrite=overwrite,
    )
    protocol = {"seeds": seeds, "test_fraction": test_fraction, "settings": settings, "overwrite": overwrite}
    result = BenchmarkResult(out)
    # The spaces' artifacts, then image+artifact for each image space. The bare image is yu19's
    # input with yu19's network, so it appears once, as the yu19 row.
    for candidate in auto_candidates(artifacts):
        if candidate.kind is InputKind.IMAGE:
            continue
        folder = out / candidate.name.replace("+", "_")
        evaluation = evaluate_set(candidate, folder, config=config, **protocol)
        method = f"ManiFPT {candidate.name}" if candidate.kind is InputKind.ARTIFACT else f"joint {candidate.name}"
        result.evaluations.append((method, candidate.kind.value, evaluation))
    pixels = load_pixels(artifacts) if baselines else None
    for baseline in baselines:
        arch = baseline_arch if baseline_arch and baseline.input_kind is InputKind.IMAGE else baseline.arch
        augment = baseline.augment(0) if baseline.augment else None
        initialise, note = (None, "")
        if baseline.imagenet_init and arch == "resnet50":
            initialise, note = imagenet_initialiser((weights or {}).get(Space.SL))
            settings.progress.log(f"{baseline.name}: {note}")
        evaluation = evaluate_set(
            baseline_inputs(pixels, baseline),
            out / baseline.name,
            config=replace(config, arch=arch),
            augment=augment,
            initialise=initialise,
            **protocol,
        )
        name = f"{baseline.name} ({note})" if note else baseline.name
        result.evaluations.append((name, baseline.input_kind.value, evaluation))

    rows = result.rows()
    result.table_markdown, result.table_csv = out / "table.md", out / "table.csv"
    with atomic_output(result.table_markdown, overwrite=True) as partial:
        partial.write_text(markdown_table(rows, extracted.label_names, seeds), encoding="utf-8")
    with (
        atomic_output(result.table_csv, overwrite=True) as partial,
        open(partial, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return result
