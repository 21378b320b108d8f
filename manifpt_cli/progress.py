"""A progress hook the library reports to; the CLI plugs in a Rich bar, scripts may ignore it."""

from __future__ import annotations


class Progress:
    """Does nothing; subclass it (as the CLI does) to show progress."""

    def start(self, description: str, total: int | None) -> None:
        """A new phase begins, with ``total`` steps if known."""

    def advance(self, steps: int = 1, **fields: object) -> None:
        """``steps`` more are done; ``fields`` are extra figures to show (loss, accuracy, ...)."""

    def log(self, message: str) -> None:
        """A line worth showing the user (an epoch summary, a skipped file)."""


SILENT = Progress()
