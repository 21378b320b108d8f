"""`manifpt train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..openset import DEFAULT_SCORE, SCORES
from .console import RichProgress, errors_to_exit, label_column, print_table, safe, stderr
from .options import BACKBONES, COMPUTE, RunOptions, run_options


@run_options(*BACKBONES, *COMPUTE, "quiet", "overwrite")
def train(
    artifacts: Annotated[
        Path, typer.Option("--artifacts", metavar="FILE", help="Artifacts file from `manifpt extract`.")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="FILE", help="Checkpoint to write (NAME.pt: state dict + JSON metadata)."),
    ],
    space: Annotated[
        str,
        typer.Option(
            "--space",
            metavar="auto|SPACE",
            help="auto: try every space's artifacts, the image, and image+artifact, keep the best mean validation "
            "accuracy over --auto-splits splits; or one space: rgb, freq, sl or ssl.",
        ),
    ] = "auto",
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            metavar="ARCH",
            show_default="small for rgb/freq, mlp for sl/ssl",
            help="resnet50 (the paper's), resnet18, small or mlp.",
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Training epochs; the best epoch on validation is kept.")
    ] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Artifacts per optimisation step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate (cosine decay).")] = 1e-3,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of each class held out for validation.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the split, the initial weights and the batch order.")] = 0,
    target_fpr: Annotated[
        float,
        typer.Option(
            "--target-fpr",
            help="False-alarm rate the 'unknown' threshold is set at: the share of validation images of "
            "known classes it would call unknown.",
        ),
    ] = 0.05,
    auto_splits: Annotated[
        int, typer.Option("--auto-splits", min=1, help="Validation splits each --space auto candidate is judged on.")
    ] = 2,
    open_set_score: Annotated[
        str,
        typer.Option(
            "--open-set-score",
            metavar="|".join(("auto", *SCORES)),
            help="Score behind 'unknown'; auto picks it by leave-one-generator-out validation (3 extra trainings).",
        ),
    ] = DEFAULT_SCORE,
    augment: Annotated[
        Optional[str],
        typer.Option(
            "--augment",
            metavar="LIST",
            help="Add one perturbed copy of every image, e.g. jpeg:90,jpeg:75,resize:0.5,blur:1.0,crop:0.9 "
            "(its artifact searched afresh in the index).",
        ),
    ] = None,
    index: Annotated[
        Optional[Path],
        typer.Option(
            "--index",
            metavar="FILE",
            show_default="the one the artifacts were extracted with",
            help="Index for --augment.",
        ),
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Train an attributor (cross-entropy) on one space's artifacts; keep the best validation checkpoint."""
    from ..openset import check_target_fpr
    from ..perturb import parse_perturbations
    from ..spaces import parse_spaces
    from ..train import TrainConfig, train_attributor, train_auto

    with errors_to_exit(needs="train"):
        auto = space.strip().lower() == "auto"
        spaces = [] if auto else parse_spaces(space)
        if not auto and len(spaces) != 1:
            raise typer.BadParameter("train one space at a time (or --space auto)", param_hint="--space")
        if open_set_score not in ("auto", *SCORES):
            raise typer.BadParameter(f"choose auto or one of: {', '.join(SCORES)}", param_hint="--open-set-score")
        config = TrainConfig(
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            val_fraction=val_fraction,
            seed=seed,
            target_fpr=check_target_fpr(target_fpr),
            open_set_score=open_set_score,
        )
        shaping = {
            "augment": parse_perturbations(augment) if augment else None,
            "index_path": index,
            "weights": options.backbone_weights(),
        }
        with RichProgress(options.quiet, unit="") as progress:
            settings = options.settings(progress)
            if auto:
                result = train_auto(
                    artifacts,
                    out,
                    config=config,
                    settings=settings,
                    splits=auto_splits,
                    overwrite=options.overwrite,
                    **shaping,
                )
            else:
                result = train_attributor(
                    artifacts, spaces[0], out, config=config, settings=settings, overwrite=options.overwrite, **shaping
                )
        if auto:
            rows = result.metadata["auto"]["validation"]
            table = Table(
                label_column("input", [row["input"] for row in rows]),
                label_column("arch", [row["arch"] for row in rows]),
                "mean validation accuracy",
                "per split",
                title="--space auto (validation splits only)",
            )
            for row in rows:
                splits = ", ".join(f"{a:.3f}" for a in row["per_split"])
                table.add_row(row["input"], row["arch"], f"{row['val_accuracy']:.3f}", splits)
            print_table(stderr, table)
        chosen = result.metadata["auto"]["chosen"] if auto else spaces[0].value
        training = result.metadata["training"]
        stderr.print(
            f"[green]saved {safe(out)}[/]: {training['arch']} on {chosen}, best epoch {training['best_epoch']}, "
            f"validation accuracy {training['val_accuracy']:.3f} ({training['val_size']} held out, "
            f"{len(result.metadata['classes'])} classes, {result.seconds:.1f} s)"
        )
        calibration, open_set = result.metadata["calibration"], result.metadata["open_set"]
        stderr.print(
            f"calibrated: temperature {calibration['temperature']:.3f}, validation ECE "
            f"{calibration['ece_before']:.3f} → {calibration['ece']:.3f}; 'unknown' below {open_set['score']} "
            f"{open_set['threshold']:.4g} (target false-alarm rate {open_set['target_fpr']:g}; "
            f"{open_set['false_alarm_bound']:.3g} for new images)"
        )
        if calibration["temperature_at_bound"]:
            stderr.print(
                "[yellow]temperature at the end of its range:[/] the validation split is separated perfectly, "
                "so it cannot calibrate; probabilities near 1 overstate the certainty (give more, or harder, "
                "validation images)"
            )
        if open_set["false_alarm_bound"] > open_set["target_fpr"]:
            stderr.print(
                f"[yellow]too few validation images for the target:[/] a new image of a known source is called "
                f"'unknown' with probability up to {open_set['false_alarm_bound']:.3g}; give more images, a larger "
                "--val-fraction, or a larger --target-fpr"
            )
        if not result.metadata["has_real_class"]:
            stderr.print(
                "[yellow]no 'real' class:[/] real photos will come out 'unknown' at best "
                "(extract with --real index or --real DIR)"
            )
