"""`manifpt demo`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .attribute import attribution_table
from .console import RichProgress, errors_to_exit, label_column, print_table, stderr, stdout
from .options import RunOptions, run_options

SHOWN_ROWS = 15


@run_options("quiet")
def demo(
    workdir: Annotated[
        Optional[Path],
        typer.Option(
            "--workdir",
            metavar="DIR",
            show_default="a new temporary folder",
            help="Keep every file here to inspect and re-run steps.",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A reduced run (fewer iterations and images), as CI uses.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds crops, generators, samples and training.")] = 0,
    *,
    options: RunOptions,
) -> None:
    """Run the whole workflow offline on photographs bundled with scikit-image, with a zoo of 5 generators."""
    work = workdir or Path(tempfile.mkdtemp(prefix="manifpt-demo-"))
    with errors_to_exit(needs="train"), RichProgress(options.quiet) as progress:
        from ..research.demo import DemoPlan, run_demo

        plan = DemoPlan.quick() if quick else DemoPlan()
        settings = options.settings(progress)
        step = lambda message: progress.log(f"[bold cyan]▶[/] {message}")  # noqa: E731
        result = run_demo(work, plan, seed=seed, settings=settings, step=step)
    shown = result.rows[:: max(1, len(result.rows) // SHOWN_ROWS)][:SHOWN_ROWS]
    print_table(stdout, attribution_table(shown))
    stdout.print(
        f"(a sample of {min(SHOWN_ROWS, len(result.rows))} of {len(result.rows)} rows; all are in the reports)"
    )
    scores = Table(
        label_column("true source", result.per_source),
        "images",
        "predicted correctly",
        "verdict: the true source",
        "verdict: another source",
        "unknown",
        "inconclusive",
        title="Attribution of held-out suspects",
    )
    for source, (correct, total) in sorted(result.per_source.items()):
        verdicts = result.verdicts[source]
        named = verdicts["correct"]
        other = total - named - verdicts["unknown"] - verdicts["inconclusive"]
        shares = [f"{n / total:.2f}" for n in (correct, named, other, verdicts["unknown"], verdicts["inconclusive"])]
        scores.add_row(source, str(total), *shares)
    print_table(stdout, scores)
    chance = 1 / max(1, len(result.per_source))
    n_rows = len(result.rows)
    stdout.print(
        f"[bold]accuracy {result.accuracy:.3f}[/] over {n_rows} suspects (chance {chance:.3f}), {result.seconds:.0f} s in all"
    )
    stdout.print(f"reports: {result.reports['csv']} (+ .meta.json), {result.reports['json']}")
    stderr.print(f"\nEverything is in {result.workdir}. Each step again, with the normal commands:")
    for command in result.commands:
        stderr.print(f"  {command}", highlight=False)
