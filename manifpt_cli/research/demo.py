"""The offline demo: the whole workflow on real photographs that ship with scikit-image/scikit-learn.

Steps (each one is a public library call, so the printed CLI commands re-run it):
1. crop the bundled photos into a real set (the generators' training data and the index) and a
   held-out real set (the ``real`` class);
2. train a small zoo: two GANs (different upsampling and loss), a VAE, a flow and a diffusion model;
3. sample training and suspect images from each;
4. index build → extract → train → export → attribute the mixed suspect folder;
5. score the attribution against the known sources.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import extract_artifacts
from ..attribute import AttributionRow
from ..casework import ReportTarget, run_attribution
from ..export import export_onnx
from ..manifold import build_index
from ..report import ReportFormat
from ..settings import DEFAULT_SETTINGS, RunSettings
from ..spaces import Space
from ..train import TrainConfig, train_attributor
from .samples import bundled_photo_paths, write_photo_crops
from .zoo import make_design, sample_generator, train_generator

# (name, family, upsampling, normalisation, loss): four families' worth of design choices.
ZOO = (
    ("gan-tconv-ns", "gan", "tconv", "batch", "ns"),
    ("gan-nearest-hinge", "gan", "nearest", "batch", "hinge"),
    ("vae-bilinear", "vae", "bilinear", "batch", None),
    ("flow-realnvp", "flow", None, None, None),
    ("diffusion-unet", "diffusion", "nearest", "group", None),
)


@dataclass
class DemoPlan:
    """Sizes of the demo; ``quick`` is the CI-sized run."""

    n_real: int = 800
    n_real_heldout: int = 200
    gan_iters: int = 300
    other_iters: int = 250
    zoo_width: int = 16
    zoo_batch_size: int = 32
    n_train_per_source: int = 150
    n_suspects_per_source: int = 40
    epochs: int = 25
    space: Space = Space.FREQ
    size: int = 32

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(
            n_real=240,
            n_real_heldout=60,
            gan_iters=40,
            other_iters=30,
            n_train_per_source=40,
            n_suspects_per_source=12,
            epochs=6,
        )


@dataclass
class DemoResult:
    workdir: Path
    rows: list[AttributionRow]
    accuracy: float
    per_source: dict[str, tuple[int, int]]  # source → (correct, total)
    verdicts: dict[str, Counter]  # source → verdict counts ("correct" when the verdict is the source)
    reports: dict[str, Path]
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _commands(work: Path, plan: DemoPlan, sources: list[str]) -> list[str]:
    """The normal CLI commands that repeat each step on the demo's files (replacing them: --overwrite)."""
    w = os.fspath(work)
    source_args = " ".join(f"--source {name}={w}/train/{name}" for name in sources)
    first = ZOO[0]
    return [
        f"manifpt zoo train --real {w}/real --out {w}/zoo/{first[0]} --family {first[1]} --upsample {first[2]} "
        f"--norm {first[3]} --loss {first[4]} --width {plan.zoo_width} --iters {plan.gan_iters} "
        f"--batch-size {plan.zoo_batch_size} --overwrite",
        f"manifpt zoo sample {w}/zoo/{first[0]} --n {plan.n_suspects_per_source} --out {w}/suspects/{first[0]} "
        "--seed 2 --overwrite",
        f"manifpt zoo list {w}/zoo",
        f"manifpt index build {w}/real --out {w}/real.h5 --space rgb,freq --size {plan.size} --overwrite",
        f"manifpt extract --index {w}/real.h5 {source_args} --real {w}/train/real --out {w}/artifacts.h5 --overwrite",
        f"manifpt train --artifacts {w}/artifacts.h5 --space {plan.space.value} --epochs {plan.epochs} "
        f"--out {w}/attributor.pt --overwrite",
        f"manifpt export {w}/attributor.pt --out {w}/attributor.onnx --overwrite",
        f"manifpt attribute {w}/suspects --model {w}/attributor.onnx --index {w}/real.h5 "
        f"--report csv --out {w}/report.csv --overwrite",
    ]


def run_demo(
    workdir: str | os.PathLike,
    plan: DemoPlan | None = None,
    *,
    seed: int = 0,
    settings: RunSettings = DEFAULT_SETTINGS,
    step: Callable[[str], None] = lambda message: None,
) -> DemoResult:
    """Run the demo in ``workdir`` (kept for inspection); ``step`` hears a line per stage."""
    started = time.perf_counter()
    plan = plan or DemoPlan()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    photos = bundled_photo_paths()

    step(f"Cropping {len(photos)} bundled photographs into {plan.n_real} real images (+{plan.n_real_heldout} held out)")
    write_photo_crops(work / "real", plan.n_real, plan.size, seed=seed, photos=photos)
    heldout = write_photo_crops(work / "real_heldout", plan.n_real_heldout, plan.size, seed=seed + 1, photos=photos)
    for i, path in enumerate(heldout):  # the real class: some for training, the rest as suspects
        split = "suspects" if i % 4 == 0 else "train"
        (work / split / "real").mkdir(parents=True, exist_ok=True)
        path.rename(work / split / "real" / path.name)

    sources = []
    for name, family, upsample, norm, loss in ZOO:
        step(f"Training zoo generator {name}")
        design = make_design(family, upsample, norm, loss, size=plan.size, width=plan.zoo_width)
        iters = plan.gan_iters if family == "gan" else plan.other_iters
        model = work / "zoo" / name
        train_generator(
            [work / "real"], model, design, iters=iters, batch_size=plan.zoo_batch_size, seed=seed, settings=settings
        )
        sample_generator(model, plan.n_train_per_source, work / "train" / name, seed=seed + 1, settings=settings)
        sample_generator(model, plan.n_suspects_per_source, work / "suspects" / name, seed=seed + 2, settings=settings)
        sources.append(name)

    step("Building the real-manifold index (rgb, freq)")
    build_index([work / "real"], work / "real.h5", [Space.RGB, Space.FREQ], size=plan.size, settings=settings)
    step("Extracting artifacts")
    labelled = [(name, str(work / "train" / name)) for name in sources]
    extract_artifacts(
        work / "real.h5", labelled, work / "artifacts.h5", real=work / "train" / "real", settings=settings
    )
    step(f"Training the attributor on {plan.space.value} artifacts")
    config = TrainConfig(epochs=plan.epochs, seed=seed)
    train_attributor(work / "artifacts.h5", plan.space, work / "attributor.pt", config=config, settings=settings)
    step("Exporting to ONNX")
    export_onnx(work / "attributor.pt", work / "attributor.onnx")

    step("Attributing the held-out suspects")
    reports = {"csv": work / "report.csv", "json": work / "report.json"}
    rows: list[AttributionRow] = []
    run_attribution(
        work / "attributor.onnx",
        work / "real.h5",
        [work / "suspects"],
        reports=[ReportTarget(ReportFormat.CSV, reports["csv"]), ReportTarget(ReportFormat.JSON, reports["json"])],
        settings=settings,
        on_row=rows.append,
    )

    per_source: dict[str, tuple[int, int]] = {}
    verdicts: dict[str, Counter] = {}
    for row in rows:
        truth = Path(row.path).parent.name
        correct, total = per_source.get(truth, (0, 0))
        per_source[truth] = (correct + (row.predicted == truth), total + 1)
        verdicts.setdefault(truth, Counter())[row.verdict if row.verdict != truth else "correct"] += 1
    accuracy = sum(c for c, _ in per_source.values()) / max(1, len(rows))
    commands = _commands(work, plan, sources)
    return DemoResult(work, rows, accuracy, per_source, verdicts, reports, commands, time.perf_counter() - started)
