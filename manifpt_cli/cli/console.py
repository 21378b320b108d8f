"""Consoles, the Rich progress bar, and the error boundary shared by every command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
from rich.text import Text

from ..errors import EXIT_INTERRUPTED, ManifptError
from ..extras import missing_extra, require_extra
from ..progress import Progress

stdout = Console(soft_wrap=False)
stderr = Console(stderr=True)


CONTROL_NAMES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def literal(text: object, style: str = "") -> Text:
    """``text`` shown exactly as it is: no Rich markup is read from it, and control characters
    (which could rewrite the terminal) are shown as escapes such as ``\\r``."""
    shown = "".join(
        CONTROL_NAMES.get(c, f"\\x{ord(c):02x}") if (ord(c) < 32 or ord(c) == 127) else c for c in str(text)
    )
    return Text(shown, style=style)


def safe(text: object) -> str:
    """``text`` made safe to put inside a markup string (see :func:`literal`)."""
    return escape(literal(text).plain)


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
    stderr.print(Text("error: ", style="bold red") + literal(exc), highlight=False)
    raise typer.Exit(exc.exit_code) from None


@contextlib.contextmanager
def errors_to_exit(needs: str | None = None) -> Iterator[None]:
    """Turn a ManifptError into a red message on stderr and its exit code (no traceback, no locals).

    ``needs`` names an optional extra the command cannot run without; its absence is reported
    before any work starts.
    """
    try:
        if needs:
            require_extra(needs)
        yield
    except ManifptError as exc:
        _fail(exc)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        _fail(extra)
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted: no partial output was kept under the final name[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
