"""`manifpt benchmark`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markdown import Markdown

from .console import RichProgress, errors_to_exit, stderr, stdout
from .options import BACKBONES, COMPUTE, RunOptions, parse_source, run_options


@run_options(*BACKBONES, *COMPUTE, "quiet", "overwrite")
def benchmark(
    index: Annotated[Path, typer.Option("--index", help="Real-manifold index from `manifpt index build`.")],
    source: Annotated[list[str], typer.Option("--source", help="NAME=DIR: a source model and its images; repeat.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for artifacts.h5, per-method evaluations, table.md/.csv and summary.png."
        ),
    ],
    real: Annotated[
        Optional[Path], typer.Option("--real", help="Folder of real images to add as class 'real'.")
    ] = None,
    spaces: Annotated[
        Optional[str], typer.Option("--spaces", help="ManiFPT spaces to compare \\[default: every space of the index].")
    ] = None,
    baselines: Annotated[str, typer.Option("--baselines", help="all, none, or some of yu19,durall20,wang20.")] = "all",
    seeds: Annotated[
        Optional[int],
        typer.Option("--seeds", min=1, help="Training runs per method (seeds 0..N-1) \\[default: 3; 1 with --quick]."),
    ] = None,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of each class held out per seed.")
    ] = 0.2,
    epochs: Annotated[
        Optional[int],
        typer.Option("--epochs", min=1, help="Training epochs per run, every method \\[default: 30; 10 with --quick]."),
    ] = None,
    baseline_arch: Annotated[
        Optional[str],
        typer.Option(
            "--baseline-arch",
            help="Override yu19/wang20's network (e.g. small for a fast CPU run) \\[default: theirs; small with --quick].",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="CPU-sized first look: 1 seed, 10 epochs, the small CNN for yu19/wang20 instead of ResNet50. "
            "Minutes instead of hours on a CPU; not the paper's protocol.",
        ),
    ] = False,
    *,
    options: RunOptions,
) -> None:
    """Compare ManiFPT's spaces with baselines on your generators: a table shaped like the paper's Table 2,
    and summary.png (accuracy ± std and FD ratios per method).

    The defaults follow the paper (3 seeds × 30 epochs, wang20 on ResNet50): hours on a CPU. Before
    training, an epoch of every method is timed on a small sample and the estimated time is printed;
    the progress bar shows the ETA. Use --quick for a CPU-sized first look.
    """
    from ..spaces import parse_spaces
    from ..train import TrainConfig

    with errors_to_exit(needs="train"):
        from ..research.baselines import parse_baselines
        from ..research.benchmark import run_benchmark

        chosen_spaces = parse_spaces(spaces) if spaces else None
        chosen_baselines = parse_baselines(baselines)
        sources = [parse_source(text) for text in source]
        seeds = seeds or (1 if quick else 3)
        epochs = epochs or (10 if quick else 30)
        baseline_arch = baseline_arch or ("small" if quick else None)
        with RichProgress(options.quiet, unit="") as progress:
            result = run_benchmark(
                index,
                sources,
                out,
                spaces=chosen_spaces,
                baselines=chosen_baselines,
                real=real,
                seeds=seeds,
                test_fraction=test_fraction,
                config=TrainConfig(epochs=epochs),
                baseline_arch=baseline_arch,
                weights=options.backbone_weights(),
                settings=options.settings(progress),
                overwrite=options.overwrite,
            )
    stdout.print(Markdown(result.table_markdown.read_text(encoding="utf-8")))
    stderr.print(
        f"table → {result.table_markdown}, {result.table_csv}; chart → {result.summary_png}; "
        f"per-method figures in {result.out_dir}/<method>/"
    )
