"""`manifpt zoo train | sample | list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import EXIT_PARTIAL
from .console import RichProgress, errors_to_exit, label_column, literal, print_table, safe, stderr, stdout
from .failures import print_failures
from .help import App
from .options import COMPUTE, RunOptions, run_options

# (header, design key) of the zoo table's name columns.
DESIGN_COLUMNS = (("family", "family"), ("upsampling", "upsample"), ("norm", "norm"), ("loss", "loss"))

app = App(help="A reference zoo of small generators with known design choices.")


@app.command("train")
@run_options("workers", *COMPUTE, "quiet", "overwrite")
def train(
    real: Annotated[
        list[Path], typer.Option("--real", metavar="DIR", help="Folder of real training images (repeatable).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Model folder to create (its name is the model's name).")
    ],
    family: Annotated[str, typer.Option("--family", metavar="FAMILY", help="gan, vae, flow or diffusion.")],
    upsample: Annotated[
        Optional[str],
        typer.Option(
            "--upsample",
            metavar="UPSAMPLING",
            show_default="per family",
            help="tconv, nearest, bilinear or pixelshuffle.",
        ),
    ] = None,
    norm: Annotated[
        Optional[str], typer.Option("--norm", metavar="NORM", show_default="per family", help="batch, group or none.")
    ] = None,
    loss: Annotated[
        Optional[str],
        typer.Option(
            "--loss", metavar="LOSS", show_default="ns for a GAN", help="GAN loss: ns, hinge, lsgan or wgan-gp."
        ),
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Image size (a power of two ≥ 16).")] = 32,
    width: Annotated[int, typer.Option("--width", min=4, help="Base channel width of the networks.")] = 32,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Optimisation steps.")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Real images per step.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the weights and the batches.")] = 0,
    *,
    options: RunOptions,
) -> None:
    """Train a small generator on real images and record every design choice in its checkpoint.

    Exit codes: 0 trained on every file; 3 trained, but some files could not be decoded (each listed).
    """
    with errors_to_exit(needs="train"), RichProgress(options.quiet, unit="it") as progress:
        from ..research.zoo import make_design, train_generator

        settings = options.settings(progress)
        design = make_design(family, upsample, norm, loss, size, width)
        result = train_generator(
            real,
            out,
            design,
            iters=iters,
            batch_size=batch_size,
            seed=seed,
            settings=settings,
            overwrite=options.overwrite,
        )
        losses = "  ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items())
        stderr.print(f"[green]saved {safe(result.path)}[/] ({result.seconds:.1f} s; final {losses})")
    if result.failures:
        print_failures([(f.path, f.error) for f in result.failures])
        raise typer.Exit(EXIT_PARTIAL)


@app.command("sample")
@run_options("device", "quiet", "overwrite")
def sample(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Zoo model folder (or its generator.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder to write PNG samples into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many images.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives the same images.")] = 0,
    *,
    options: RunOptions,
) -> None:
    """Write N samples of a zoo generator as PNG files."""
    with errors_to_exit(needs="train"), RichProgress(options.quiet) as progress:
        from ..research.zoo import sample_generator

        settings = options.settings(progress)
        written = sample_generator(model, n, out, seed=seed, settings=settings, overwrite=options.overwrite)
    stderr.print(f"[green]wrote {len(written)} images[/] to {safe(out)}")


@app.command("list")
def list_models(
    root: Annotated[Path, typer.Argument(metavar="DIR", help="Folder searched for zoo models.")] = Path("zoo"),
) -> None:
    """Show the trained zoo models and their design choices."""
    with errors_to_exit(needs="train"):
        from ..research.zoo import list_zoo

        found = list_zoo(root)
    designs = [meta["design"] for meta in found]
    table = Table(
        label_column("name", [meta["name"] for meta in found]),
        *(label_column(header, [d[key] for d in designs]) for header, key in DESIGN_COLUMNS),
        "depth",
        "skips",
        "iters",
        "trained on",
        title=f"zoo models in {safe(root)}",
    )
    for meta in found:
        d, t = meta["design"], meta["training"]
        skips, trained_on = "yes" if d["skip_connections"] else "no", f"{t['n_real']} images"
        table.add_row(
            literal(meta["name"]),
            *(literal(d[key]) for _, key in DESIGN_COLUMNS),
            str(d["depth"]),
            skips,
            str(t["iters"]),
            trained_on,
        )
    print_table(stdout, table)
