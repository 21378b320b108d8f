"""`manifpt evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import RichProgress, errors_to_exit, stderr, stdout
from .options import Device, Quiet, Threads


def evaluate(
    artifacts: Annotated[Path, typer.Option("--artifacts", help="Labelled artifacts file from `manifpt extract`.")],
    space: Annotated[str, typer.Option("--space", help="Which space's artifacts to evaluate: rgb, freq, sl or ssl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, CSV tables and PNG figures.")],
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Training runs (seeds 0..N-1); accuracy is mean ± std.")] = 3,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of each class held out for testing, per seed.")
    ] = 0.2,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Attributor architecture [default: per space].")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs per run.")] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Artifacts per optimisation step.")] = 64,
    device: Device = "cpu",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Accuracy over seeds, per-class precision/recall/F1, confusion matrix, FD ratios and a t-SNE plot."""
    from ..evaluate import evaluate as run_evaluation
    from ..spaces import check_device, parse_spaces
    from ..train import TrainConfig

    with errors_to_exit():
        spaces = parse_spaces(space)
        if len(spaces) != 1:
            raise typer.BadParameter("evaluate one space at a time", param_hint="--space")
        check_device(device)
        config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size)
        with RichProgress(quiet, unit="") as progress:
            result = run_evaluation(artifacts, spaces[0], out, seeds, test_fraction, config, device, threads, progress)
    table = Table("class", "precision", "recall", "F1", "test images", title=f"{result.name} / {result.arch}, pooled over {seeds} seed(s)")
    for row in result.per_class:
        table.add_row(row["class"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    stdout.print(table)
    stdout.print(
        f"[bold]accuracy {result.accuracy_mean:.3f} ± {result.accuracy_std:.3f}[/] over {seeds} seed(s); "
        f"FD ratio: artifacts {result.fd_ratio_inputs:.3f}, attributor features {result.fd_ratio_features_mean:.3f}"
    )
    stderr.print(f"wrote {', '.join(p.name for p in result.files.values())} to {result.out_dir} ({result.seconds:.0f} s)")
