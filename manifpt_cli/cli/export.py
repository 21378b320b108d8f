"""`manifpt export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..export import DEFAULT_TOLERANCE
from .console import errors_to_exit, safe, stderr
from .options import RunOptions, run_options


@run_options("overwrite")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from `manifpt train`.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="FILE", help="ONNX file to write (NAME.onnx; sl/ssl add NAME.backbone.onnx)."
        ),
    ],
    weights: Annotated[
        Optional[str],
        typer.Option(
            "--weights",
            metavar="FILE|random:SEED",
            help="sl/ssl backbone weights FILE (or random:SEED) if not where the index found them.",
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Largest allowed |ONNX Runtime − PyTorch| on probabilities.")
    ] = DEFAULT_TOLERANCE,
    *,
    options: RunOptions,
) -> None:
    """Export an attributor to ONNX with its model card, and check ONNX Runtime against PyTorch."""
    from ..export import export_onnx

    with errors_to_exit(needs="train"):
        result = export_onnx(
            checkpoint, out, backbone_weights=weights, tolerance=tolerance, overwrite=options.overwrite
        )
    stderr.print(
        f"[green]wrote {safe(result.path)}[/] "
        f"(max |Δp| ONNX Runtime vs PyTorch {result.max_probability_diff:.1e} ≤ {tolerance:.0e})"
    )
    if result.backbone_path:
        stderr.print(
            f"[green]wrote {safe(result.backbone_path)}[/] (max relative |Δφ| {result.max_embedding_diff:.1e})"
        )
