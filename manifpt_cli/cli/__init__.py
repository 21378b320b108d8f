"""The manifpt command line: one Typer sub-app or command per file, mounted here once."""

from __future__ import annotations

import signal
from typing import Annotated, Optional

import typer

from .. import __version__
from .analyze import app as analyze_app
from .attribute import attribute
from .benchmark import benchmark
from .case_report import report
from .demo import demo
from .enroll import enroll
from .evaluate import evaluate
from .export import export
from .extract import extract
from .index import app as index_app
from .train import train
from .verify import verify
from .zoo import app as zoo_app

app = typer.Typer(
    name="manifpt",
    help="Attribute suspect images to the generative model that made them (ManiFPT, CVPR 2024).\n\n"
    "Workflow: index build → extract → train → export → attribute.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # evidence paths and contents stay out of tracebacks
    rich_markup_mode="rich",
)
app.add_typer(index_app, name="index")
app.command("extract")(extract)
app.command("train")(train)
app.command("export")(export)
app.command("attribute")(attribute)
app.command("report")(report)
app.command("enroll")(enroll)
app.command("verify")(verify)
app.command("evaluate")(evaluate)
app.command("benchmark")(benchmark)
app.add_typer(analyze_app, name="analyze")
app.add_typer(zoo_app, name="zoo")
app.command("demo")(demo)


def _version(value: bool) -> None:
    """The version, and those of the libraries that shape a report's rows (as report headers record them)."""
    if value:
        from ..attribute import library_versions

        typer.echo(f"manifpt {__version__}")
        for name, version in library_versions().items():
            if name != "manifpt":
                typer.echo(f"  {name} {version}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the versions of manifpt and its libraries, and exit.",
        ),
    ] = None,
) -> None:
    """Attribute suspect images to the generative model that made them (ManiFPT, CVPR 2024)."""


def _terminate(signum, frame) -> None:
    """SIGTERM (a `kill`, a container stop) cleans up as Ctrl-C does: no partial output is kept."""
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()
