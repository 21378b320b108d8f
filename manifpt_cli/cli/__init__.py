"""The manifpt command line: one Typer sub-app or command per file, mounted here once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from .analyze import app as analyze_app
from .attribute import attribute
from .benchmark import benchmark
from .case_report import report
from .console import Interrupts
from .demo import demo
from .enroll import enroll
from .evaluate import evaluate
from .export import export
from .extract import extract
from .help import App
from .index import app as index_app
from .train import train
from .verify import verify
from .zoo import app as zoo_app

# Workflow order, then evaluation and research, then the demo: `manifpt --help` lists them so.
COMMANDS = {
    "index": index_app,
    "extract": extract,
    "train": train,
    "export": export,
    "attribute": attribute,
    "report": report,
    "enroll": enroll,
    "verify": verify,
    "evaluate": evaluate,
    "benchmark": benchmark,
    "analyze": analyze_app,
    "zoo": zoo_app,
    "demo": demo,
}

app = App(
    name="manifpt",
    help="Attribute suspect images to the generative model that made them (ManiFPT, CVPR 2024).\n\n"
    "Workflow: index build → extract → train → export → attribute.",
    order=tuple(COMMANDS),
    pretty_exceptions_show_locals=False,  # evidence paths and contents stay out of tracebacks
)
for name, command in COMMANDS.items():
    if isinstance(command, typer.Typer):
        app.add_typer(command, name=name)
    else:
        app.command(name)(command)


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


def main() -> None:
    Interrupts.install()  # SIGTERM (a `kill`, a container stop) cleans up as Ctrl-C does
    app()
