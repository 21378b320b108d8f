"""`manifpt benchmark`: ManiFPT spaces and baselines on the same data, in a table shaped like the
paper's Table 2 (accuracy mean ± std over seeds, FD ratios), written as Markdown and CSV, and drawn
as one summary chart.

Every number in the table comes from the runs made here; nothing is copied from the paper.

The runs can take hours on a CPU (ResNet50 baselines), so before training the benchmark times one
epoch of every method on a small stratified sample and reports the estimate; the progress bar then
counts epochs weighted by those estimates, so its ETA holds when methods differ in speed.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..artifacts import extract_artifacts, load_pixels
from ..inputs import InputKind, TrainingSet, auto_candidates
from ..outputs import atomic_output, results_folder
from ..progress import Progress
from ..settings import DEFAULT_SETTINGS, RunSettings
from ..spaces import Space
from ..train import TrainConfig, fit, stratified_split
from .baselines import Baseline, baseline_inputs, imagenet_initialiser
from .evaluate import Evaluation, evaluate_set
from .figures import label_bars, pyplot, save_figure

PROBE_SAMPLES = 128  # images the timing of each method trains on

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
    summary_png: Path | None = None
    estimate: Estimate | None = None

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


@dataclass
class PlannedRun:
    """One method of the benchmark: what it trains on (made when needed: baseline inputs are big)
    and how it trains."""

    method: str
    input: str
    folder: Path
    make_data: Callable[[], TrainingSet]
    config: TrainConfig
    augment: Callable | None = None
    initialise: Callable | None = None


@dataclass
class Estimate:
    """Training time per method from one timed epoch on a sample, scaled to the full runs."""

    epoch_seconds: dict[str, float]  # method → estimated seconds per full training epoch
    runs_per_method: int  # seeds
    epochs: int
    probe_samples: int

    def method_seconds(self, method: str) -> float:
        return self.epoch_seconds[method] * self.runs_per_method * self.epochs

    @property
    def total_seconds(self) -> float:
        return sum(self.method_seconds(method) for method in self.epoch_seconds)


def duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"3 h 05 min"``: how long, at the precision an estimate has."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


class _EpochClock(Progress):
    """Records how long each epoch of a training run takes."""

    def start(self, description: str, total: int | None) -> None:
        self.last, self.epochs = time.perf_counter(), []

    def advance(self, steps: int = 1, **fields: object) -> None:
        now = time.perf_counter()
        self.epochs.append(now - self.last)
        self.last = now


def time_one_epoch(run: PlannedRun, test_fraction: float, device: str) -> tuple[float, str]:
    """(seconds one full training epoch of ``run`` should take, its network): the second of two
    epochs on at most :data:`PROBE_SAMPLES` images (stratified), scaled by how many more a seed
    trains on. The first epoch is not timed: it carries one-off costs (thread pools, kernels)."""
    data = run.make_data()
    labels = data.samples.labels
    rows = np.arange(len(labels))
    if len(rows) > PROBE_SAMPLES:
        rows = stratified_split(labels, PROBE_SAMPLES / len(rows), 0)[1]
    clock = _EpochClock()
    probe_config = replace(run.config, epochs=2, seed=0)
    fit(data.subset(rows), probe_config, device=device, progress=clock, augment=run.augment)
    return clock.epochs[-1] * len(labels) * (1 - test_fraction) / len(rows), run.config.arch or data.default_arch


class _WeightedEpochs(Progress):
    """Every run's epochs on one bar, each weighted by its method's estimated cost; the runs' own
    per-epoch lines are left out (the bar and the final table say enough)."""

    def __init__(self, outer: Progress, estimate: Estimate, methods: list[str]) -> None:
        self.outer, self.estimate = outer, estimate
        self.mean_epoch = sum(estimate.epoch_seconds.values()) / max(1, len(estimate.epoch_seconds))
        self.runs = len(methods) * estimate.runs_per_method
        self.started_runs, self.method = 0, ""
        outer.start("Benchmark (epochs weighted by cost)", self.runs * estimate.epochs)

    def begin(self, method: str) -> None:
        self.method = method

    def start(self, description: str, total: int | None) -> None:
        self.started_runs += 1

    def advance(self, steps: int = 1, **fields: object) -> None:
        weight = self.estimate.epoch_seconds[self.method] / max(self.mean_epoch, 1e-9)
        self.outer.advance(steps * weight, run=f"{self.started_runs}/{self.runs} {self.method}")


def _plan(
    artifacts: Path,
    out: Path,
    config: TrainConfig,
    baselines: Sequence[Baseline],
    baseline_arch: str | None,
    weights: dict[Space, str | None] | None,
    progress: Progress,
) -> list[PlannedRun]:
    """The spaces' artifacts, then image+artifact for each image space, then the baselines. The bare
    image is yu19's input with yu19's network, so it appears once, as the yu19 row."""
    plan = []
    for candidate in auto_candidates(artifacts):
        if candidate.kind is InputKind.IMAGE:
            continue
        method = f"ManiFPT {candidate.name}" if candidate.kind is InputKind.ARTIFACT else f"joint {candidate.name}"
        folder = out / candidate.name.replace("+", "_")
        plan.append(PlannedRun(method, candidate.kind.value, folder, lambda c=candidate: c, config))
    pixels = load_pixels(artifacts) if baselines else None
    for baseline in baselines:
        arch = baseline_arch if baseline_arch and baseline.input_kind is InputKind.IMAGE else baseline.arch
        initialise, note = (None, "")
        if baseline.imagenet_init and arch == "resnet50":
            initialise, note = imagenet_initialiser((weights or {}).get(Space.SL))
            progress.log(f"{baseline.name}: {note}")
        plan.append(
            PlannedRun(
                f"{baseline.name} ({note})" if note else baseline.name,
                baseline.input_kind.value,
                out / baseline.name,
                lambda b=baseline: baseline_inputs(pixels, b),
                replace(config, arch=arch),
                baseline.augment(0) if baseline.augment else None,
                initialise,
            )
        )
    return plan


def summary_figure(rows: list[dict], classes: list[str], seeds: int, epochs: int):
    """Accuracy ± std per method (chance marked) beside both FD ratios (log scale), one row per
    method in table order; the suptitle names the data and the best method."""
    plt = pyplot()
    methods = [row["method"] for row in rows][::-1]  # top to bottom in table order
    accuracy = 100 * np.array([row["accuracy_mean"] for row in rows][::-1])
    spread = 100 * np.array([row["accuracy_std"] for row in rows][::-1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.5 + 0.55 * len(rows)), sharey=True)
    positions = np.arange(len(rows))
    best = int(np.argmax(accuracy))
    colours = ["tab:green" if i == best else "tab:blue" for i in positions]
    bars = left.barh(positions, accuracy, xerr=spread, color=colours, capsize=3)
    labels = [f"{a:.1f} ± {s:.1f} %" for a, s in zip(accuracy, spread)]
    label_bars(left, bars, labels, ends=list(accuracy + spread), horizontal=True)
    chance = 100 / len(classes)
    left.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.1f} %)")
    left.set_yticks(positions, methods)
    left.set_xlim(0, 125)
    left.set_xlabel(f"test accuracy, % (mean ± std over {seeds} seed(s))")
    left.set_ylabel("method")
    left.legend(fontsize=8, loc="lower right")
    left.set_title("Accuracy", fontsize=10)
    height = 0.4
    for offset, key, label, colour in (
        (height / 2, "fd_ratio_features", "attributor features", "tab:purple"),
        (-height / 2, "fd_ratio_inputs", "inputs", "tab:orange"),
    ):
        values = np.array([row[key] for row in rows][::-1], dtype=np.float64)
        drawable = np.where(np.isfinite(values) & (values > 0), values, np.nan)
        bars = right.barh(positions + offset, drawable, height=height, color=colour, label=label)
        label_bars(right, bars, [f"{v:.3g}" for v in values], ends=list(np.nan_to_num(drawable)), horizontal=True)
    right.set_xscale("log")
    right.set_xlabel("FD ratio trace(S_b)/trace(S_w) (log scale; higher: sources further apart)")
    right.legend(fontsize=8, loc="best")
    right.set_title("Separability (FD ratio)", fontsize=10)
    winner = rows[::-1][best]
    fig.suptitle(
        f"Benchmark — {len(classes)} classes ({', '.join(classes)}), {seeds} seed(s) × {epochs} epochs; "
        f"best: {winner['method']}, accuracy {100 * winner['accuracy_mean']:.1f} ± {100 * winner['accuracy_std']:.1f} %",
        fontsize=10,
    )
    return fig


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
    """Extract artifacts, time an epoch of every method (logged as an estimate before training),
    evaluate every space and baseline with one protocol, write the table and its summary chart."""
    config = config or TrainConfig()
    inputs = [index_path, *(folder for _, folder in sources), *([real] if real else [])]
    names = ["artifacts.h5", "table.md", "table.csv", "summary.png"]
    out = results_folder(out_dir, names, inputs=inputs, overwrite=overwrite)
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
    progress = settings.progress
    plan = _plan(artifacts, out, config, baselines, baseline_arch, weights, progress)
    progress.start("Timing an epoch of each method", len(plan))
    epoch_seconds, archs = {}, {}
    for run in plan:
        epoch_seconds[run.method], archs[run.method] = time_one_epoch(run, test_fraction, settings.device)
        progress.advance(1)
    estimate = Estimate(epoch_seconds, seeds, config.epochs, PROBE_SAMPLES)
    progress.log(
        f"estimated training time: {duration(estimate.total_seconds)} on {settings.device} "
        f"({len(plan)} methods × {seeds} seed(s) × {config.epochs} epochs, each timed over an epoch on at most "
        f"{PROBE_SAMPLES} images)"
    )
    for method, seconds in epoch_seconds.items():
        progress.log(
            f"  {method} ({archs[method]}): {duration(seconds)}/epoch, {duration(estimate.method_seconds(method))}"
        )
    bar = _WeightedEpochs(progress, estimate, [run.method for run in plan])
    bar_settings = replace(settings, progress=bar)
    result = BenchmarkResult(out, estimate=estimate)
    for run in plan:
        bar.begin(run.method)
        evaluation = evaluate_set(
            run.make_data(),
            run.folder,
            config=run.config,
            augment=run.augment,
            initialise=run.initialise,
            seeds=seeds,
            test_fraction=test_fraction,
            settings=bar_settings,
            overwrite=overwrite,
        )
        result.evaluations.append((run.method, run.input, evaluation))

    rows = result.rows()
    result.table_markdown, result.table_csv, result.summary_png = (out / name for name in names[1:])
    with atomic_output(result.table_markdown, overwrite=True) as partial:
        partial.write_text(markdown_table(rows, extracted.label_names, seeds), encoding="utf-8")
    with (
        atomic_output(result.table_csv, overwrite=True) as partial,
        open(partial, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    save_figure(summary_figure(rows, extracted.label_names, seeds, config.epochs), result.summary_png)
    return result
