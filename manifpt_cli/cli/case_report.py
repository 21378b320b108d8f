"""`manifpt report`: the HTML case report of an existing CSV or JSON report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from .console import RichProgress, errors_to_exit, literal, stderr
from .options import RunOptions, run_options


@run_options("quiet", "overwrite")
def report(
    source: Annotated[
        Path,
        typer.Argument(metavar="REPORT", help="A JSON report, or a CSV report with its .meta.json, from `attribute`."),
    ],
    html: Annotated[Path, typer.Option("--html", metavar="FILE", help="Write the HTML case report here.")],
    index: Annotated[
        Optional[Path],
        typer.Option(
            "--index",
            metavar="FILE",
            help="The index the report was made with, for the nearest real images.",
            show_default="the path the report records",
        ),
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Render the self-contained HTML case report of a report that `manifpt attribute` wrote.

    Each suspect's pictures are made again from its file, and shown only if the file still has the
    SHA-256 the report recorded; the nearest real images come from the index. Exit codes: 0 written;
    1 the report or index cannot be used; 2 usage error.
    """
    from ..casework import render_case_report

    with errors_to_exit(), RichProgress(options.quiet, unit="rows") as progress:
        summary = render_case_report(
            source, html, index=index, settings=options.settings(progress), overwrite=options.overwrite
        )
    problems = ", ".join(f"{name} not shown for {count}" for name, count in summary.problems.items())
    stderr.print(
        f"{summary.rows} rows, {summary.pictured} suspects pictured" + (f" ({problems})" if problems else ""),
        highlight=False,
    )
    stderr.print(Text("case report → ") + literal(str(html)))
