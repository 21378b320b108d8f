"""`manifpt verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EXIT_FAILURE
from .console import errors_to_exit, literal, path_column, print_table, stderr, stdout


def verify(
    report: Annotated[
        Path, typer.Argument(help="A CSV (with its .meta.json) or JSON report from `manifpt attribute`.")
    ],
    show_all: Annotated[
        bool, typer.Option("--all", help="List every file checked, not only those that differ.")
    ] = False,
) -> None:
    """Check that the suspects, model and index a report names are still the files it was made from.

    Exit 0 when every file matches its recorded SHA-256 (and the model and index their own
    digests); 1 when any file changed, is missing, or could not be checked.
    """
    from ..verify import NOT_HASHED, verify_report

    with errors_to_exit():
        result = verify_report(report)
    table = Table(
        path_column(), "what", "result", "detail", title=f"{len(result.checks)} files checked against the report"
    )
    for check in result.checks:
        if show_all or not check.ok:
            style = "green" if check.ok else "red"
            table.add_row(literal(check.path), check.what, literal(check.result, style=style), literal(check.detail))
    if table.rows:
        print_table(stdout, table)
    counted = ("matches", "changed", "missing", NOT_HASHED)
    others = len(result.checks) - sum(result.count(name) for name in counted)
    summary = (
        f"{result.count('matches')} match, {result.count('changed')} changed, {result.count('missing')} missing, "
        f"{result.count(NOT_HASHED)} not hashed in the report (skipped or refused unread), {others} not checked"
    )
    stderr.print(f"[green]{summary}[/]" if result.ok else f"[red]{summary}[/]")
    raise typer.Exit(0 if result.ok else EXIT_FAILURE)
