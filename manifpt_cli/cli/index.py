"""`manifpt index build` and `manifpt index info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EXIT_PARTIAL
from .console import RichProgress, errors_to_exit, literal, path_column, print_table, safe, stderr, stdout
from .failures import print_failures
from .help import App
from .options import BACKBONES, COMPUTE, DECODING, ENGINE, RunOptions, run_options

app = App(help="Build and inspect real-manifold indexes (HDF5 + FAISS).")


@app.command("build")
@run_options(*BACKBONES, *DECODING, *COMPUTE, *ENGINE, "quiet", "overwrite")
def build(
    real_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="REAL_DIR",
            help="Folders (searched recursively) or files of real images, or NumPy array files of them "
            "(.npy/.npz, uint8 N×H×W×3; row I is recorded as FILE#row=I).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Index file to write (HDF5).")],
    space: Annotated[
        str,
        typer.Option(
            "--space",
            metavar="SPACES",
            help="Comma-separated spaces: rgb, freq, sl, ssl (sl/ssl need ResNet50 weights).",
        ),
    ] = "rgb,freq",
    size: Annotated[
        int, typer.Option("--size", min=8, help="Images are centre-cropped and resized to SIZE×SIZE.")
    ] = 32,
    faiss_factory: Annotated[
        str,
        typer.Option(
            "--faiss",
            metavar="FACTORY",
            help="FAISS index-factory string; 'Flat' is exact search (e.g. 'IVF256,Flat' is faster).",
        ),
    ] = "Flat",
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            min=1,
            help="IVF factories: lists searched per query, stored in the index (FAISS's default 1 misses "
            "many neighbours; README, Approximate indexes).",
        ),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(
            "--ef-search",
            min=1,
            help="HNSW factories: search breadth (efSearch), stored in the index (FAISS's default: 16).",
        ),
    ] = None,
    backbone_input: Annotated[
        str,
        typer.Option(
            "--backbone-input",
            metavar="resize|crop",
            help="How sl/ssl bring an image to 224×224: resize the whole image (bilinear, antialiased), or the "
            "authors' crop (shorter side to 256, centre 224×224).",
        ),
    ] = "resize",
    *,
    options: RunOptions,
) -> None:
    """Embed every real image in each space and store embeddings + FAISS indexes in one HDF5 file.

    Exit 0 when every file was indexed, 3 when some could not be decoded (listed; the rest are indexed).
    """
    from ..manifold import build_index
    from ..spaces import parse_spaces

    with errors_to_exit(), RichProgress(options.quiet) as progress, options.make_engine() as engine:
        spaces = parse_spaces(space)
        if backbone_input not in ("resize", "crop"):
            raise typer.BadParameter("choose resize or crop", param_hint="--backbone-input")
        settings = options.settings(progress)
        weights = options.backbone_weights()
        result = build_index(
            real_dirs,
            out,
            spaces,
            size=size,
            faiss_factory=faiss_factory,
            faiss_parameters={
                name: value for name, value in (("nprobe", nprobe), ("efSearch", ef_search)) if value is not None
            },
            weights=weights,
            backbone_input=backbone_input,
            settings=settings,
            overwrite=options.overwrite,
            engine=engine,
        )
        stderr.print(
            f"[green]indexed {result.n_images} real images[/] in {', '.join(s.value for s in spaces)} "
            f"→ {safe(out)} ({result.seconds:.1f} s, index hash {result.index_hash[:12]}…)"
        )
        if result.failures:
            print_failures([(f.path, f.error) for f in result.failures])
            raise typer.Exit(EXIT_PARTIAL)


@app.command("info")
def info(
    index: Annotated[Path, typer.Argument(metavar="INDEX", help="Index file written by `manifpt index build`.")],
    failures: Annotated[
        bool,
        typer.Option("--failures", help="Also list every file the build left out, with the reason (all of them)."),
    ] = False,
) -> None:
    """Show what an index holds: images, spaces, FAISS indexes, backbone weights, provenance."""
    from ..manifold import describe_index

    with errors_to_exit():
        summary = describe_index(index, failures=failures)
    stdout.print(f"[bold]{safe(summary['path'])}[/]")
    for key in (
        "n_images",
        "n_failures",
        "image_size",
        "index_hash",
        "manifpt_version",
        "created_utc",
        "format_version",
    ):
        stdout.print(f"  {key:<16} {summary[key]}", highlight=False, soft_wrap=True)
    if not summary["provenance_verified"]:
        stdout.print(
            f"  [yellow]note[/]: a format {summary['format_version']} index has no digest over manifpt_version, "
            "created_utc or its failures (they are shown unverified); `manifpt index build` writes one that has",
            highlight=False,
            soft_wrap=True,
        )
    table = Table("space", "dim", "FAISS", "vectors", path_column("weights"), "weights sha256")
    for space in summary["spaces"]:
        weights_source, weights_sha256 = space["weights_source"] or "—", space["weights_sha256"][:16] or "—"
        table.add_row(
            space["space"],
            str(space["dim"]),
            space["faiss_factory"],
            str(space["faiss_ntotal"]),
            weights_source,
            weights_sha256,
        )
    print_table(stdout, table)
    if failures:
        left_out = Table(path_column(), "reason", title=f"{len(summary['failures'])} file(s) left out of the index")
        for path, reason in summary["failures"]:
            left_out.add_row(literal(path), literal(reason))
        print_table(stdout, left_out)
