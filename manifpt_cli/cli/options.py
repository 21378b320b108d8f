"""Options shared by several commands: one definition, one help text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..progress import Progress
from ..settings import DEFAULT_MAX_PIXELS, RunSettings, cpu_count
from ..spaces import Space

BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per batch through the embedding and search.")
]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Threads decoding image files.")]
Threads = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        help="Compute threads for PyTorch, FAISS and ONNX Runtime "
        f"[default: cores left after --workers; {cpu_count()} cores here].",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="PyTorch device for embeddings and training: cpu, cuda, cuda:1, ...")
]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels", min=1, help="Refuse images whose header declares more pixels than this (decompression bombs)."
    ),
]
SlWeights = Annotated[
    Optional[Path],
    typer.Option(
        "--sl-weights", help="ImageNet ResNet50 state dict for 'sl' [default: the torch hub cache under TORCH_HOME]."
    ),
]
SslWeights = Annotated[
    Optional[Path],
    typer.Option(
        "--ssl-weights",
        help="Barlow Twins ResNet50 state dict for 'ssl' [default: the torch hub cache under TORCH_HOME].",
    ),
]
RandomWeights = Annotated[
    Optional[str],
    typer.Option(
        "--weights",
        help="'random:SEED' builds sl/ssl backbones with seeded random weights, for tests only; recorded in every output.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")]

DEFAULT_MAX = DEFAULT_MAX_PIXELS


def run_settings(
    progress: Progress,
    *,
    batch_size: int = 64,
    workers: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RunSettings:
    """The one RunSettings of a command, checked and applied (thread budget) before any work."""
    settings = RunSettings(batch_size, workers, threads, device, max_pixels, progress)
    settings.check_device()
    settings.apply()
    return settings


def backbone_weights(sl: Path | None, ssl: Path | None, random: str | None) -> dict[Space, str | None]:
    """Per-space weights arguments from the three options (an explicit file wins over random:SEED)."""
    if random is not None and not random.startswith("random:"):
        raise typer.BadParameter(
            "--weights takes random:SEED (as in random:0); use --sl-weights/--ssl-weights for files"
        )
    return {
        Space.SL: str(sl) if sl else random,
        Space.SSL: str(ssl) if ssl else random,
    }


def parse_source(text: str) -> tuple[str, str]:
    """``--source NAME=DIR`` → (NAME, DIR)."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder:
        raise UsageError(f"--source takes NAME=DIR (as in --source stylegan2=./fakes/stylegan2), got {text!r}")
    return name.strip(), folder
