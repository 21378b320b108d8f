"""Options shared by several commands: one definition, one help text, one place that builds the
run's :class:`RunSettings`.

A command declares its own options and asks for the shared ones with :func:`run_options`, which
adds them to its signature (as sqlite-utils' ``output_options`` does for Click) and hands the
command one :class:`RunOptions` instead of a dozen parameters.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..progress import Progress
from ..settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    SMALL_IMAGE_BATCH_SIZE,
    SMALL_IMAGE_SIDE,
    RunSettings,
    cpu_count,
)
from ..spaces import Space

# name → (annotation, default) of every shared option.
SHARED_OPTIONS = {
    "batch_size": (
        Annotated[
            Optional[int],
            typer.Option(
                "--batch-size",
                min=1,
                show_default=(
                    f"{SMALL_IMAGE_BATCH_SIZE} for rgb/freq images of up to {SMALL_IMAGE_SIDE} px, "
                    f"else {DEFAULT_BATCH_SIZE}"
                ),
                help="Images per batch through the embedding and search. Rows do not depend on it.",
            ),
        ],
        None,
    ),
    "workers": (Annotated[int, typer.Option("--workers", min=1, help="Threads decoding image files.")], 1),
    "threads": (
        Annotated[
            Optional[int],
            typer.Option(
                "--threads",
                min=1,
                show_default=f"the cores less the decoding threads (--workers, default 1); {cpu_count()} cores here",
                help="Compute threads for PyTorch, FAISS and ONNX Runtime.",
            ),
        ],
        None,
    ),
    "device": (
        Annotated[
            str,
            typer.Option(
                "--device", metavar="DEVICE", help="PyTorch device for backbones and training: cpu, cuda, cuda:1."
            ),
        ],
        "cpu",
    ),
    "max_pixels": (
        Annotated[
            int,
            typer.Option("--max-pixels", min=1, help="Refuse images whose header declares more pixels than this."),
        ],
        DEFAULT_MAX_PIXELS,
    ),
    "max_file_bytes": (
        Annotated[
            int,
            typer.Option(
                "--max-file-bytes", min=1, metavar="BYTES", help="Refuse files larger than this, without reading them."
            ),
        ],
        DEFAULT_MAX_FILE_BYTES,
    ),
    "sniff": (
        Annotated[
            bool,
            typer.Option(
                "--sniff", help="Find images by their content, whatever their name (default: by image file extension)."
            ),
        ],
        False,
    ),
    "sl_weights": (
        Annotated[
            Optional[Path],
            typer.Option(
                "--sl-weights",
                metavar="FILE",
                show_default="the torch hub cache under TORCH_HOME",
                help="ImageNet ResNet50 state dict for 'sl'.",
            ),
        ],
        None,
    ),
    "ssl_weights": (
        Annotated[
            Optional[Path],
            typer.Option(
                "--ssl-weights",
                metavar="FILE",
                show_default="the torch hub cache under TORCH_HOME",
                help="Barlow Twins ResNet50 state dict for 'ssl'.",
            ),
        ],
        None,
    ),
    "weights": (
        Annotated[
            Optional[str],
            typer.Option(
                "--weights",
                metavar="random:SEED",
                show_default=False,
                help="'random:SEED' builds sl/ssl backbones with seeded random weights, for tests only; "
                "recorded in every output.",
            ),
        ],
        None,
    ),
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")], False),
    "engine": (
        Annotated[
            str,
            typer.Option(
                "--engine",
                metavar="local|ray",
                help="local: this process; ray: a Ray cluster (needs manifpt's ray extra), local unless --ray-address.",
            ),
        ],
        "local",
    ),
    "ray_address": (
        Annotated[
            Optional[str],
            typer.Option(
                "--ray-address",
                metavar="ADDRESS",
                show_default="start a local one with --workers CPUs",
                help="Address of a running Ray cluster (e.g. ray://head:10001).",
            ),
        ],
        None,
    ),
    "overwrite": (
        Annotated[
            bool,
            typer.Option("--overwrite", help="Replace existing output files (inputs are never overwritten)."),
        ],
        False,
    ),
}
DECODING = ("batch_size", "workers", "max_pixels", "max_file_bytes", "sniff")
COMPUTE = ("threads", "device")
BACKBONES = ("sl_weights", "ssl_weights", "weights")
ENGINE = ("engine", "ray_address")


@dataclass(frozen=True)
class RunOptions:
    """The shared options a command was given (defaults for those it does not offer)."""

    batch_size: int | None = None
    workers: int = 1
    threads: int | None = None
    device: str = "cpu"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    sniff: bool = False
    sl_weights: Path | None = None
    ssl_weights: Path | None = None
    weights: str | None = None
    quiet: bool = False
    overwrite: bool = False
    engine: str = "local"
    ray_address: str | None = None

    def make_engine(self):
        """The engine the command runs its per-image work on (a context manager)."""
        from ..engines import make_engine

        return make_engine(self.engine, self.ray_address, self.workers)

    def settings(self, progress: Progress) -> RunSettings:
        """The command's one RunSettings, checked and applied (thread budget) before any work."""
        settings = RunSettings(
            batch_size=self.batch_size,
            workers=self.workers,
            threads=self.threads,
            device=self.device,
            max_pixels=self.max_pixels,
            progress=progress,
            max_file_bytes=self.max_file_bytes,
            sniff=self.sniff,
        )
        settings.check_device()
        settings.apply()
        return settings

    def backbone_weights(self) -> dict[Space, str | None]:
        """Per-space weights arguments (an explicit file wins over random:SEED)."""
        if self.weights is not None and not self.weights.startswith("random:"):
            raise typer.BadParameter(
                "--weights takes random:SEED (as in random:0); use --sl-weights/--ssl-weights for files"
            )
        return {
            Space.SL: str(self.sl_weights) if self.sl_weights else self.weights,
            Space.SSL: str(self.ssl_weights) if self.ssl_weights else self.weights,
        }


def run_options(*names: str):
    """Add the shared options ``names`` to a command; it receives them as ``options: RunOptions``."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [parameter for name, parameter in signature.parameters.items() if name != "options"]
        shared = []
        for name in names:
            annotation, default = SHARED_OPTIONS[name]
            shared.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            )

        @functools.wraps(command)
        def with_options(**kwargs):
            given = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, options=RunOptions(**given))

        with_options.__signature__ = signature.replace(parameters=own + shared)
        with_options.__annotations__ = {p.name: p.annotation for p in own + shared}
        return with_options

    return decorate


def parse_source(text: str) -> tuple[str, str]:
    """``--source NAME=DIR`` → (NAME, DIR)."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder:
        raise UsageError(f"--source takes NAME=DIR (as in --source stylegan2=./fakes/stylegan2), got {text!r}")
    return name.strip(), folder
