"""Listing files that failed, on stderr, in one shape for every command."""

from __future__ import annotations

from rich.table import Table

from .console import literal, path_column, print_table, stderr

MAX_LISTED = 50


def print_failures(failures: list[tuple[str, str]]) -> None:
    """A table of (path, reason) on stderr; long lists are cut, with the count."""
    table = Table(path_column(), "error", title=f"{len(failures)} file(s) could not be read", title_style="bold yellow")
    for path, error in failures[:MAX_LISTED]:
        table.add_row(literal(path), literal(error))
    print_table(stderr, table)
    if len(failures) > MAX_LISTED:
        stderr.print(f"… and {len(failures) - MAX_LISTED} more (all are listed in the output file's /failures group)")
