"""Consoles, the Rich progress bar, and the error boundary shared by every command."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from rich.segment import Segments
from rich.table import Column, Table
from rich.text import Text

from ..errors import EXIT_INTERRUPTED, ManifptError
from ..extras import missing_extra, require_extra
from ..progress import Progress

stdout = Console(soft_wrap=False)
stderr = Console(stderr=True, soft_wrap=True)  # a message is one line, however long: logs keep it whole


CONTROL_NAMES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def literal(text: object, style: str = "") -> Text:
    """``text`` shown exactly as it is: no Rich markup is read from it, and control characters
    (which could rewrite the terminal) are shown as escapes such as ``\\r``; a path's byte that is
    not UTF-8 (a surrogate escape) as ``\\xNN``, as reports write it (:func:`images.display_path`)."""
    return Text("".join(_shown(c) for c in str(text)), style=style)


def _shown(c: str) -> str:
    if ord(c) < 32 or ord(c) == 127:
        return CONTROL_NAMES.get(c, f"\\x{ord(c):02x}")
    if 0xDC80 <= ord(c) <= 0xDCFF:
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c


def safe(text: object) -> str:
    """``text`` made safe to put inside a markup string (see :func:`literal`)."""
    return escape(literal(text).plain)


def label_column(header: str, labels: Iterable[object], **options) -> Column:
    """A column of names (classes, sources, verdicts) that are never cut or folded: it is as wide
    as its widest name, and a table too wide for the console is printed wider (see print_table)."""
    widest = max((Text(str(label)).cell_len for label in labels), default=0)
    return Column(header, no_wrap=True, min_width=max(widest, Text(header).cell_len), **options)


def path_column(header: str = "file") -> Column:
    """A column of file paths: they fold at any character rather than being cut."""
    return Column(header, overflow="fold")


def relative_paths(paths: list[str]) -> tuple[list[str], str | None]:
    """``paths`` relative to their common folder and that folder (None when they share none), so a
    table shows what differs; its caption must say what they are relative to."""
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    if not folders:
        return paths, None
    try:
        root = os.path.commonpath(folders)
    except ValueError:  # a mix of drives, or of absolute and relative paths
        return paths, None
    if root == os.path.dirname(root):  # the filesystem root says nothing
        return paths, None
    return [os.path.relpath(os.path.abspath(path), root) for path in paths], root


FOLDED_MIN_WIDTH = 12  # the narrowest a folded path column gets before a table is printed wider


def _narrowest(console: Console, table: Table) -> int:
    """The narrowest ``table`` can be without cutting a cell: names at their width, words whole,
    paths folded into FOLDED_MIN_WIDTH columns."""
    unbounded = console.options.update_width(10_000)
    widths = []
    for column in table.columns:
        if column.no_wrap:
            widths.append(column.min_width or 0)
        elif column.overflow == "fold":
            widths.append(FOLDED_MIN_WIDTH)
        else:
            cells = [column.header, *column.cells]
            widths.append(max(console.measure(cell, options=unbounded).minimum for cell in cells))
    left, right = table.padding[3], table.padding[1]
    return sum(widths) + len(widths) * (left + right) + len(widths) + 1  # the box's vertical lines


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` without cutting a cell (Rich would cut names with "…" to fit). On a terminal
    too narrow for it, it is printed as wide as it must be; in a pipe or a file (where Rich assumes
    80 columns), as wide as its widest row, so that paths are not folded either."""
    if console.is_terminal:
        width = _narrowest(console, table)
    else:
        width = console.measure(table, options=console.options.update_width(10_000)).maximum
    if width <= console.width:
        console.print(table)
    else:
        console.print(Segments(console.render(table, console.options.update_width(width))), soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, blank until Rich has measured a rate."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        if not self.unit or task.speed is None:
            return Text("")
        return Text(f"{task.speed:,.1f} {self.unit}/s", style="cyan")


class RichProgress(Progress):
    """Shows library progress on stderr as a Rich bar with a rate (items/s) and extra fields."""

    def __init__(self, quiet: bool = False, unit: str = "images") -> None:
        self.quiet = quiet
        self.unit = unit
        self.bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(unit),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            # Never capture stdout: with --report csv|json it carries the report and nothing else.
            redirect_stdout=False,
            redirect_stderr=False,
            disable=quiet or not stderr.is_terminal,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(description, total=total, extra="")

    def advance(self, steps: int = 1, **fields: object) -> None:
        extra = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self.bar.update(self.task, advance=steps, extra=extra)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.bar.console.print(message, highlight=False)


def _fail(exc: ManifptError) -> None:
    # One line, however long (a log keeps it whole), right after what came before.
    stderr.print(Text("error: ", style="bold red") + literal(exc), highlight=False)
    raise typer.Exit(exc.exit_code) from None


class Interrupts:
    """Ctrl-C and SIGTERM, remembered: a signal that lands inside a C extension (h5py converting an
    attribute, say) can surface as that library's own error instead of KeyboardInterrupt, and the
    investigator must still be told "interrupted" and get exit 130, not a misleading failure."""

    received: int | None = None

    @classmethod
    def handle(cls, signum, frame) -> None:
        cls.received = signum
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, cls.handle)


@contextlib.contextmanager
def errors_to_exit(needs: str | None = None) -> Iterator[None]:
    """Turn a ManifptError into a red message on stderr and its exit code (no traceback, no locals).

    ``needs`` names an optional extra the command cannot run without; its absence is reported
    before any work starts. An interrupt wins over whatever error it caused on its way up.
    """
    Interrupts.received = None  # a signal counts for the command it lands in
    try:
        if needs:
            require_extra(needs)
        yield
    except typer.Exit:  # a command's own exit code (partial results, say) stays its own
        raise
    except (KeyboardInterrupt, Exception) as exc:
        if isinstance(exc, KeyboardInterrupt) or Interrupts.received is not None:
            stderr.print("[yellow]interrupted: no partial output was kept under the final name[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if isinstance(exc, ManifptError):
            _fail(exc)
        extra = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
        if extra is None:
            raise
        _fail(extra)
