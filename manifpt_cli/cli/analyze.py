"""`manifpt analyze clusters`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import errors_to_exit, label_column, print_table, safe, stderr, stdout
from .help import App
from .options import RunOptions, run_options

app = App(help="Analyse the structure of fingerprints.")


@app.command("clusters")
@run_options("overwrite")
def clusters(
    artifacts: Annotated[
        Path, typer.Option("--artifacts", metavar="FILE", help="Artifacts file whose classes are generators.")
    ],
    space: Annotated[str, typer.Option("--space", metavar="SPACE", help="Space whose artifacts are the fingerprints.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for clusters.csv, distances.csv and PNG figures.")
    ],
    zoo: Annotated[
        Optional[Path], typer.Option("--zoo", metavar="DIR", help="Zoo folder: design factors from its checkpoints.")
    ] = None,
    factors: Annotated[
        Optional[Path],
        typer.Option("--factors", metavar="FILE", help="CSV: a 'generator' column, then one column per design factor."),
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Cluster generators' fingerprints and score each design factor by NMI (the paper's Table 5)."""
    from ..spaces import parse_spaces

    with errors_to_exit(needs="train"):
        from ..research.analyze import analyze_clusters

        chosen = parse_spaces(space)
        if len(chosen) != 1:
            raise typer.BadParameter("analyse one space at a time", param_hint="--space")
        result = analyze_clusters(artifacts, chosen[0], out, zoo, factors, overwrite=options.overwrite)
    table = Table(
        label_column("design factor", [row["factor"] for row in result.scores]),
        "values",
        "NMI",
        title=f"{len(result.generators)} generators, {chosen[0].value} fingerprints",
    )
    for row in result.scores:
        table.add_row(row["factor"], str(row["values"]), f"{row['nmi']:.3f}")
    print_table(stdout, table)
    for factor, why in result.skipped.items():
        stderr.print(f"not scored: {factor} ({why})")
    stderr.print(f"wrote {', '.join(p.name for p in result.files.values())} to {safe(out)}")
