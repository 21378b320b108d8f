"""`manifpt extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import EXIT_PARTIAL
from .console import RichProgress, errors_to_exit, label_column, literal, print_table, safe, stderr
from .failures import print_failures
from .options import BACKBONES, COMPUTE, DECODING, RunOptions, parse_source, run_options


@run_options(*BACKBONES, *DECODING, *COMPUTE, "quiet", "overwrite")
def extract(
    index: Annotated[
        Path, typer.Option("--index", metavar="FILE", help="Real-manifold index from `manifpt index build`.")
    ],
    source: Annotated[
        list[str],
        typer.Option(
            "--source", metavar="NAME=DIR", help="NAME=DIR: a class (source model) and its folder of images; repeat."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Artifacts file to write (HDF5).")],
    real: Annotated[
        str,
        typer.Option(
            "--real",
            metavar="index|none|DIR",
            help="The class 'real': 'index' draws it from the index's own images (leave-one-out; as many as "
            "the largest source), DIR takes a folder of real photos, 'none' leaves it out (then a real photo "
            "can only come out 'unknown').",
        ),
    ] = "index",
    space: Annotated[
        Optional[str],
        typer.Option(
            "--space", metavar="SPACES", show_default="every space of the index", help="Comma-separated spaces."
        ),
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Compute artifacts φ(x) − φ(x*) of labelled images against their nearest real image.

    Exit 0 when every file was used, 3 when some could not be decoded (listed; the rest are kept).
    """
    from ..artifacts import REAL_FROM_INDEX, extract_artifacts
    from ..spaces import parse_spaces

    with errors_to_exit():
        sources = [parse_source(text) for text in source]
        real_class = {"index": REAL_FROM_INDEX, "none": None}.get(real.strip().lower(), real)
        spaces = parse_spaces(space) if space else None
        with RichProgress(options.quiet) as progress:
            settings = options.settings(progress)
            weights = options.backbone_weights()
            result = extract_artifacts(
                index,
                sources,
                out,
                spaces=spaces,
                real=real_class,
                weights=weights,
                settings=settings,
                overwrite=options.overwrite,
            )
        table = Table(label_column("class", result.counts), "images")
        for name, count in result.counts.items():
            table.add_row(literal(name), str(count))
        print_table(stderr, table)
        spaces = ", ".join(s.value for s in result.spaces)
        stderr.print(f"[green]{result.n_samples} artifacts[/] in {spaces} → {safe(out)} ({result.seconds:.1f} s)")
        if result.skipped:
            stderr.print(f"{len(result.skipped)} skipped (not image files; listed in the artifacts file)")
        if result.failures:
            print_failures([(f.path, f"[{name}] {f.error}") for name, f in result.failures])
            raise typer.Exit(EXIT_PARTIAL)
