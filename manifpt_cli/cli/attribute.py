"""`manifpt attribute`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..report import ReportFormat
from .console import (
    RichProgress,
    errors_to_exit,
    label_column,
    literal,
    path_column,
    print_table,
    relative_paths,
    safe,
    stderr,
    stdout,
)
from .options import DECODING, ENGINE, RunOptions, run_options


def _file_format(report: ReportFormat, out: Path | None) -> ReportFormat | None:
    """The format written to --out (or stdout): csv/json as asked, or from --out's extension with `table`."""
    if report is not ReportFormat.TABLE:
        return report
    if out is None:
        return None
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in ("csv", "json", "html"):
        raise typer.BadParameter(
            f"with --report table, --out must end in .csv, .json or .html (got {out.name})", param_hint="--out"
        )
    return ReportFormat(suffix)


def attribution_table(rows) -> Table:
    """The terminal form of attribution rows: names whole, paths relative to the suspects' folder."""
    paths, root = relative_paths([row.path for row in rows])
    runners = [f"{row.top_k[1][0]} ({row.top_k[1][1]:.2f})" if row.ok and len(row.top_k) > 1 else "—" for row in rows]
    names = [name for row in rows if row.ok for name in (row.verdict, row.predicted)]
    table = Table(
        path_column(),
        label_column("verdict", names),
        label_column("predicted", names),
        "prob.",
        label_column("runner-up", runners),
        "dist. to real",
        "notes / status",
        caption=f"paths relative to {root}" if root else None,
    )
    for row, path, runner in zip(rows, paths, runners):  # names and labels are shown literally: they come from outside
        if row.ok:
            distance = f"{row.manifold_distance:.4g}"
            verdict = literal(row.verdict, style="bold" if row.verdict == row.predicted else "yellow")
            notes = literal("; ".join(row.notes) or "ok")
            table.add_row(
                literal(path),
                verdict,
                literal(row.predicted),
                f"{row.probability:.3f}",
                literal(runner),
                distance,
                notes,
            )
        else:
            style = "yellow" if row.skipped else "red"
            table.add_row(literal(path), "", "", "", "", "", literal(f"{row.status}: {row.error}", style=style))
    return table


@run_options(*DECODING, "threads", *ENGINE, "quiet", "overwrite")
def attribute(
    suspects: Annotated[
        list[Path], typer.Argument(metavar="SUSPECT", help="Folders (searched recursively) or files of suspect images.")
    ],
    model: Annotated[
        Path, typer.Option("--model", "-m", metavar="FILE", help="Attributor exported by `manifpt export` (NAME.onnx).")
    ],
    index: Annotated[
        Path, typer.Option("--index", metavar="FILE", help="The real-manifold index the model was trained against.")
    ],
    report: Annotated[
        ReportFormat,
        typer.Option(
            "--report",
            help="table: Rich table on the terminal; csv/json: machine-readable rows; html: the case report (needs --out).",
        ),
    ] = ReportFormat.TABLE,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            show_default="standard output",
            help="Write the csv/json report here (a CSV also gets FILE.meta.json).",
        ),
    ] = None,
    html: Annotated[
        Optional[Path],
        typer.Option(
            "--html",
            metavar="FILE",
            help="Also write the self-contained HTML case report here: summary, provenance, model card, "
            "limitations, and per suspect its image, nearest real image, artifact, spectrum and verdict.",
        ),
    ] = None,
    operator: Annotated[
        Optional[str],
        typer.Option(
            "--operator",
            metavar="NAME",
            help="Who runs the case, recorded in every report.",
            show_default="$MANIFPT_OPERATOR, else the login name",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many ranked sources each row lists.")] = 3,
    *,
    options: RunOptions,
) -> None:
    """Name the source model of every suspect image (ONNX Runtime + FAISS; no PyTorch at run time).

    Exit codes: 0 every file attributed; 3 finished, but some files failed (each is an error row);
    1 the run could not start (e.g. the model does not match the index); 2 usage error.
    """
    from ..casework import ReportTarget, run_attribution

    file_format = _file_format(report, out)
    if file_format is ReportFormat.HTML and out is None:
        raise typer.BadParameter(
            "an HTML case report needs a file: give --out FILE or --html FILE", param_hint="--report"
        )
    streaming = file_format is not None and out is None
    targets = [ReportTarget(file_format, out)] if file_format else []
    if html is not None:
        targets.append(ReportTarget(ReportFormat.HTML, html))
    kept = []
    with errors_to_exit(), RichProgress(options.quiet) as progress, options.make_engine() as engine:
        settings = options.settings(progress)
        try:
            summary = run_attribution(
                model,
                index,
                suspects,
                reports=targets,
                top_k=top_k,
                settings=settings,
                on_row=kept.append if report is ReportFormat.TABLE else None,
                overwrite=options.overwrite,
                engine=engine,
                operator=operator,
            )
        except BaseException:
            if streaming:
                stderr.print(
                    f"[bold yellow]warning:[/] the {file_format.value} report on standard output is incomplete"
                )
            raise
    if report is ReportFormat.TABLE:
        print_table(stdout, attribution_table(kept))
    tally = ", ".join(f"{name} {count}" for name, count in summary.verdicts.most_common())
    stderr.print(
        f"[green]{summary.attributed} attributed[/] ({safe(tally or 'none')}), [red]{summary.failed} failed[/], "
        f"{summary.skipped} skipped (not image files)",
        highlight=False,
    )
    if out is not None:
        sidecar = f" (provenance: {out}.meta.json)" if file_format is ReportFormat.CSV else ""
        digest = summary.content_sha256.get(os.fspath(out))
        sealed = f", content_sha256 {digest}" if digest else ""
        stderr.print(Text("report → ") + literal(f"{out}{sidecar}{sealed}"))
    if html is not None:
        stderr.print(Text("case report → ") + literal(str(html)))
    raise typer.Exit(summary.exit_code)
