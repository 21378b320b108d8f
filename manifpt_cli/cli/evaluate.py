"""`manifpt evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..openset import DEFAULT_SCORE, SCORES
from .console import RichProgress, errors_to_exit, label_column, literal, print_table, stderr, stdout
from .options import BACKBONES, COMPUTE, RunOptions, run_options


@run_options(*BACKBONES, *COMPUTE, "quiet", "overwrite")
def evaluate(
    artifacts: Annotated[
        Path, typer.Option("--artifacts", metavar="FILE", help="Labelled artifacts file from `manifpt extract`.")
    ],
    space: Annotated[
        str, typer.Option("--space", metavar="SPACE", help="Which space's artifacts to evaluate: rgb, freq, sl or ssl.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for metrics.json, CSV tables and PNG figures.")
    ],
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Training runs (seeds 0..N-1); accuracy is mean ± std.")
    ] = 3,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of each class held out for testing, per seed.")
    ] = 0.2,
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            metavar="ARCH",
            show_default="small for rgb/freq, mlp for sl/ssl",
            help="Attributor architecture: resnet50, resnet18, small or mlp.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs per run.")] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Artifacts per optimisation step.")] = 64,
    test_artifacts: Annotated[
        Optional[Path],
        typer.Option(
            "--test-artifacts",
            metavar="FILE",
            help="Cross-dataset: train on all of --artifacts, test on this other dataset's artifacts.",
        ),
    ] = None,
    match_by: Annotated[
        Optional[str],
        typer.Option(
            "--match-by",
            metavar="FACTOR",
            help="Cross-dataset: match classes by this design factor (e.g. family) instead of by name.",
        ),
    ] = None,
    zoo: Annotated[
        Optional[Path],
        typer.Option("--zoo", metavar="DIR", help="Design factors for --match-by, from zoo checkpoints."),
    ] = None,
    factors: Annotated[
        Optional[Path],
        typer.Option(
            "--factors", metavar="FILE", help="Design factors for --match-by, from a CSV (generator,factor,...)."
        ),
    ] = None,
    open_set: Annotated[
        bool,
        typer.Option(
            "--open-set",
            help="Also leave each generator out in turn: AUROC, OSCR and TNR at 95 % TPR of known vs unseen.",
        ),
    ] = False,
    perturb: Annotated[
        Optional[str],
        typer.Option(
            "--perturb",
            metavar="LIST",
            help="Accuracy and verdicts on perturbed test images, e.g. jpeg:90,jpeg:75,resize:0.5,blur:1.0,crop:0.9.",
        ),
    ] = None,
    augment: Annotated[
        Optional[str],
        typer.Option("--augment", metavar="LIST", help="Train every model as `train --augment LIST` does."),
    ] = None,
    index: Annotated[
        Optional[Path],
        typer.Option(
            "--index",
            metavar="FILE",
            show_default="the one the artifacts were extracted with",
            help="Index for --perturb/--augment.",
        ),
    ] = None,
    open_set_score: Annotated[
        str, typer.Option("--open-set-score", metavar="|".join(SCORES), help="The models' open-set score.")
    ] = DEFAULT_SCORE,
    *,
    options: RunOptions,
) -> None:
    """Measure how well one space's artifacts separate the sources: accuracy over seeds, and figures.

    Per-class precision/recall/F1, confusion matrix, FD ratios, a t-SNE plot, calibration (ECE,
    Brier, reliability diagram) and verdict rates; optionally open-set and robustness.

    With --test-artifacts it runs the cross-dataset protocol instead: train on one dataset's
    generators, test on another's, classes matched by name or by a design factor (--match-by).
    """
    from ..perturb import parse_perturbations
    from ..spaces import parse_spaces
    from ..train import TrainConfig

    with errors_to_exit(needs="train"):
        from ..research.analyze import csv_factors, zoo_factors
        from ..research.evaluate import evaluate as run_evaluation
        from ..research.evaluate import evaluate_cross_dataset

        spaces = parse_spaces(space)
        if len(spaces) != 1:
            raise typer.BadParameter("evaluate one space at a time", param_hint="--space")
        if (match_by or zoo or factors) and test_artifacts is None:
            raise typer.BadParameter("--match-by, --zoo and --factors go with --test-artifacts")
        if open_set_score not in SCORES:
            raise typer.BadParameter(f"choose one of: {', '.join(SCORES)}", param_hint="--open-set-score")
        if (open_set or perturb or augment) and test_artifacts is not None:
            raise typer.BadParameter("--open-set, --perturb and --augment do not go with --test-artifacts")
        config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, open_set_score=open_set_score)
        design = zoo_factors(zoo) if zoo else csv_factors(factors) if factors else None
        with RichProgress(options.quiet, unit="") as progress:
            settings = options.settings(progress)
            if test_artifacts is None:
                result = run_evaluation(
                    artifacts,
                    spaces[0],
                    out,
                    seeds=seeds,
                    test_fraction=test_fraction,
                    config=config,
                    settings=settings,
                    open_set=open_set,
                    perturbations=parse_perturbations(perturb) if perturb else None,
                    augment=parse_perturbations(augment) if augment else None,
                    index_path=index,
                    weights=options.backbone_weights(),
                    overwrite=options.overwrite,
                )
            else:
                result, match = evaluate_cross_dataset(
                    artifacts,
                    test_artifacts,
                    spaces[0],
                    out,
                    by=match_by,
                    factors=design,
                    seeds=seeds,
                    config=config,
                    settings=settings,
                    overwrite=options.overwrite,
                )
        if test_artifacts is not None:
            stderr.print(f"classes matched by {match.by}: {', '.join(match.classes)}")
            for side, dropped in (("training", match.dropped_train), ("test", match.dropped_test)):
                if dropped:
                    stderr.print(f"[yellow]not shared, left out of the {side} set:[/] {', '.join(dropped)}")
    table = Table(
        label_column("class", [row["class"] for row in result.per_class]),
        "precision",
        "recall",
        "F1",
        "test images",
        title=f"{result.name} / {result.arch}, pooled over {seeds} seed(s)",
    )
    for row in result.per_class:
        table.add_row(
            literal(row["class"]),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    print_table(stdout, table)
    stdout.print(
        f"[bold]accuracy {result.accuracy_mean:.3f} ± {result.accuracy_std:.3f}[/] over {seeds} seed(s); "
        f"FD ratio: artifacts {result.fd_ratio_inputs:.3f}, attributor features {result.fd_ratio_features_mean:.3f}"
    )
    calibration = result.metrics["calibration"]
    stdout.print(
        f"calibration: ECE {calibration['ece_before']:.3f} → {calibration['ece']:.3f}, Brier "
        f"{calibration['brier_before']:.3f} → {calibration['brier']:.3f} (temperature scaling)"
    )
    if "open_set" in result.metrics:
        found = result.metrics["open_set"]
        stdout.print(
            f"open set ({found['score']}, leave-one-generator-out): AUROC {found['auroc']:.3f}, "
            f"OSCR {found['oscr']:.3f}, TNR at 95 % TPR {found['tnr_at_tpr95']:.3f}"
        )
    for name, found in result.metrics.get("robustness", {}).items():
        stdout.print(
            f"{name}: accuracy {found['accuracy']:.3f} ({found['accuracy_ratio']:.1%} of clean), "
            f"unknown {found['unknown']:.1%}, inconclusive {found['inconclusive']:.1%}"
        )
    stderr.print(
        f"wrote {', '.join(p.name for p in result.files.values())} to {result.out_dir} ({result.seconds:.0f} s)"
    )
