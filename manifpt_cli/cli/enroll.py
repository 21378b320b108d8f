"""`manifpt enroll`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EXIT_PARTIAL
from .console import RichProgress, errors_to_exit, label_column, literal, print_table, safe, stderr
from .failures import print_failures
from .options import BACKBONES, COMPUTE, DECODING, RunOptions, parse_source, run_options


@run_options(*BACKBONES, *DECODING, *COMPUTE, "quiet", "overwrite")
def enroll(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from `manifpt train` (or an earlier enrol).")],
    index: Annotated[
        Path, typer.Option("--index", metavar="FILE", help="The real-manifold index the model was trained against.")
    ],
    source: Annotated[
        list[str],
        typer.Option(
            "--source", metavar="NAME=DIR", help="NAME=DIR: a new source and a folder of its images (10–100); repeat."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="FILE", help="New ONNX model (NAME.onnx); its checkpoint NAME.pt is written beside."
        ),
    ],
    seed: Annotated[int, typer.Option("--seed", help="Seeds the held-out part and the head fit.")] = 0,
    *,
    options: RunOptions,
) -> None:
    """Add a source to a trained attributor from a few samples, without retraining the network.

    The last layer is refitted on frozen features; calibration and open-set thresholds are fitted
    again so they hold for the new class list. The model card records the enrolment.

    Exit codes: 0 every file enrolled; 3 enrolled, but some files gave no sample (each listed).
    """
    from ..enroll import enroll as run_enroll

    with errors_to_exit(needs="train"):
        folders = [parse_source(text) for text in source]
        with RichProgress(options.quiet) as progress:
            result = run_enroll(
                checkpoint,
                index,
                folders,
                out,
                weights=options.backbone_weights(),
                settings=options.settings(progress),
                seed=seed,
                overwrite=options.overwrite,
            )
    table = Table(label_column("new source", result.counts), "samples")
    for name, count in result.counts.items():
        table.add_row(literal(name), str(count))
    print_table(stderr, table)
    stderr.print(
        f"[green]wrote {safe(result.model)}[/] and {safe(result.checkpoint)}: "
        f"{len(result.classes)} classes ({result.seconds:.1f} s)"
    )
    if result.failures:
        print_failures([(f.path, f"[{name}] {f.error}") for name, f in result.failures])
        raise typer.Exit(EXIT_PARTIAL)
