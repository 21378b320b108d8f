"""One attribution run, from folders of suspects to written reports: what `manifpt attribute` does.

The CLI and scripts call :func:`run_attribution` and only render its :class:`AttributionSummary`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import index_images
from .attribute import Attribution, AttributionRow
from .case_report import evidence_record
from .engines import LocalEngine
from .errors import EXIT_OK, EXIT_PARTIAL, FormatError, ImageDecodeError, MismatchError, UsageError
from .evidence import Evidence, render_evidence
from .formats import utc_now
from .images import FailedImage, count_images, decode_image, display_path, path_from_display
from .manifold import RealIndex, image_folders
from .outputs import check_outputs
from .report import COLUMNS, ReportFormat, open_report, sidecar_path
from .settings import DEFAULT_SETTINGS, RunSettings
from .spaces import PixelEmbedder, Space


@dataclass(frozen=True)
class ReportTarget:
    """One report to write: its format and file (None: standard output)."""

    format: ReportFormat
    out: str | os.PathLike | None = None


@dataclass
class AttributionSummary:
    """What a run attributed: counts, the provenance header, and where the reports went."""

    header: dict
    total: int = 0
    failed: int = 0
    skipped: int = 0
    predicted: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)
    reports: list[ReportTarget] = field(default_factory=list)
    # Each report file's content_sha256 (a JSON report's, a CSV's sidecar's), for the case notes.
    content_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def attributed(self) -> int:
        return self.total - self.failed - self.skipped

    @property
    def exit_code(self) -> int:
        """0 when every file was attributed, 3 when some failed (README, "Exit codes")."""
        return EXIT_PARTIAL if self.failed else EXIT_OK


OPERATOR_VARIABLE = "MANIFPT_OPERATOR"


def operator_of_run(given: str | None = None) -> dict[str, str]:
    """Who ran the case, and where that came from: ``--operator``, ``$MANIFPT_OPERATOR``, or the login name."""
    if given:
        return {"name": given, "source": "--operator"}
    if os.environ.get(OPERATOR_VARIABLE):
        return {"name": os.environ[OPERATOR_VARIABLE], "source": f"${OPERATOR_VARIABLE}"}
    import getpass

    try:
        return {"name": getpass.getuser(), "source": "login name (no --operator given)"}
    except (KeyError, OSError):
        return {"name": "unknown", "source": "no --operator given and no login name"}


def run_attribution(
    model: str | os.PathLike,
    index: str | os.PathLike,
    suspects: Sequence[str | os.PathLike],
    *,
    reports: Sequence[ReportTarget] = (),
    top_k: int = 3,
    settings: RunSettings = DEFAULT_SETTINGS,
    on_row: Callable[[AttributionRow], None] | None = None,
    overwrite: bool = False,
    engine=None,
    operator: str | None = None,
) -> AttributionSummary:
    """Attribute every image under ``suspects`` and stream the rows into each of ``reports``.

    ``on_row`` sees every row as it is written (the CLI keeps them for its terminal table). No
    report may be one of the inputs or lie in a suspect folder; an existing report (or its
    ``.meta.json``) is replaced only with ``overwrite``. ``engine`` (default: this process)
    does the per-image work; rows come back in discovery order whatever the engine. ``operator``
    (default: :func:`operator_of_run`) is recorded in every report as who ran the case.

    Raises:
        UsageError: no image file under ``suspects``; a report format that is not a file format.
        MismatchError, FormatError: the model and index do not belong together, or are unreadable.
    """
    for target in reports:
        if target.format is ReportFormat.TABLE:
            raise UsageError("the table is drawn by the CLI; reports are written as csv or json")
    files = [t.out for t in reports if t.out is not None]
    files += [sidecar_path(t.out) for t in reports if t.out is not None and t.format is ReportFormat.CSV]
    evidence = any(t.format is ReportFormat.HTML for t in reports)
    # A model's backbone is named in its card, which need not match the model's own file name
    # (a renamed copy): every backbone beside it is protected.
    backbones = sorted(Path(model).parent.glob("*.backbone.onnx"))
    inputs = [model, *backbones, index, *suspects]
    check_outputs(files, inputs=inputs + (image_folders(index) if evidence else []), overwrite=overwrite)
    if len({os.path.realpath(f) for f in files}) < len(files):
        raise UsageError("two reports would be written to the same file")
    with Attribution(model, index, top_k=top_k, settings=settings, evidence=evidence) as run:
        total = count_images(suspects, sniff=settings.sniff)
        if total == 0:
            folders = ", ".join(display_path(root) for root in suspects)
            raise UsageError(f"no image files under: {folders} (searched recursively)")
        engine = engine or LocalEngine()
        header = {**run.header(suspects), **engine.describe(), "operator": operator_of_run(operator)}
        summary = AttributionSummary(header, reports=list(reports))
        with contextlib.ExitStack() as stack:
            # HTML pages are opened first, so they are committed last: a report that fails to be
            # put in place leaves no page drawn from it.
            first = sorted(range(len(reports)), key=lambda i: reports[i].format is not ReportFormat.HTML)
            opened = {
                i: stack.enter_context(
                    open_report(reports[i].format, reports[i].out, summary.header, overwrite=overwrite)
                )
                for i in first
            }
            writers = [opened[i] for i in range(len(reports))]
            settings.progress.start("Attributing", total)
            for row in engine.attribution_rows(run, model, index, suspects, top_k, settings):
                for writer in writers:
                    writer.write(row)
                if on_row is not None:
                    on_row(row)
                summary.total += 1
                summary.failed += row.status == "error"
                summary.skipped += row.skipped
                if row.ok:
                    summary.predicted[row.predicted] += 1
                    summary.verdicts[row.verdict] += 1
        for target, writer in zip(reports, writers):
            if target.out is not None and writer.content_sha256:
                summary.content_sha256[os.fspath(target.out)] = writer.content_sha256
    return summary


def _record(row: dict) -> dict:
    """A report row in its JSON form, whether it was read from JSON or from CSV text cells."""
    missing = [column for column in COLUMNS if column not in row]
    if missing:
        raise KeyError(f"a row lacks {', '.join(missing)}")
    if not isinstance(row["top_k"], str):
        return row
    number = lambda text: float(text) if text not in ("", None) else None  # noqa: E731
    top_k = []
    for item in filter(None, row["top_k"].split(";")):
        label, _, probability = item.rpartition(":")
        top_k.append({"label": label, "probability": float(probability)})
    return {
        **row,
        "probability": number(row["probability"]),
        "runner_up_probability": number(row["runner_up_probability"]),
        "top_k": top_k,
        "open_set_score": number(row["open_set_score"]),
        "manifold_distance": number(row["manifold_distance"]),
        "notes": [note for note in row["notes"].split("; ") if note],
        "width": int(row["width"]) if row["width"] else None,
        "height": int(row["height"]) if row["height"] else None,
    }


@dataclass
class CaseReportSummary:
    """What :func:`render_case_report` wrote: rows, and how many suspects' pictures could be shown."""

    out: str
    rows: int = 0
    pictured: int = 0
    problems: Counter = field(default_factory=Counter)


def render_case_report(
    report: str | os.PathLike,
    out: str | os.PathLike,
    *,
    index: str | os.PathLike | None = None,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> CaseReportSummary:
    """The HTML case report of an existing CSV or JSON report from :func:`run_attribution`.

    The pictures are made again from the files: each suspect is read from its recorded path and
    shown only if it still has its recorded SHA-256; its nearest real image comes from the index
    (``index``, default the one the report names, which must have the report's ``index_hash``).
    rgb and freq artifacts are recomputed from those pixels and must give the report's distance;
    sl/ssl artifacts need the model's backbone, so only ``manifpt attribute --html`` shows them.

    Raises:
        UsageError, FormatError: the report, or the index, is missing or not manifpt's.
        IntegrityError: the report changed after it was written (its ``report_sha256`` or
            ``content_sha256``), or has no digest to tell.
        MismatchError: the index is not the one the report was made with.
    """
    from .integrity import IntegrityError
    from .verify import CHANGED, MATCHES, read_report

    report = os.fspath(report)
    header, rows, report_checks = read_report(report)
    changed = [check for check in report_checks if check.result == CHANGED]
    if changed:
        raise IntegrityError(
            f"refusing to render {display_path(report)}: it changed after manifpt wrote it "
            f"({display_path(changed[0].path)} no longer matches its recorded digest); render the report as "
            "written, and run `manifpt verify` on it to see what changed"
        )
    unchecked = [check for check in report_checks if check.result != MATCHES]
    if unchecked:
        raise IntegrityError(
            f"refusing to render {display_path(report)}: {display_path(unchecked[0].path)} has no digest to check "
            "it against (removed, or written before reports carried one), so an edit could not be told"
        )
    try:
        space = Space(header["space"])
        index_path = os.fspath(index) if index is not None else os.fsdecode(path_from_display(header["index"]))
        rows = [_record(row) for row in rows]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{report} is not a manifpt report (or is damaged): {type(exc).__name__}: {exc}") from None
    # The suspects and the index's images are read again for the pictures: none may be replaced.
    inputs = [report, sidecar_path(report), index_path, *_recorded_paths(header.get("suspects", []))]
    check_outputs([out], inputs=inputs + image_folders(index_path), overwrite=overwrite)
    summary = CaseReportSummary(os.fspath(out))
    with RealIndex(index_path, verify=[space]) as real:
        if real.index_hash != header.get("index_hash"):
            raise MismatchError(
                f"index {display_path(index_path)} (hash {real.index_hash[:12]}…) is not the one report {report} "
                f"was made with (hash {str(header.get('index_hash'))[:12]}…)"
            )
        row_of_path = {path: i for i, path in enumerate(real.paths(np.arange(real.n_images)))}
        embed = PixelEmbedder(space) if not space.needs_backbone else None
        header = {**header, "rendered_from": f"{display_path(report)}, re-rendered {utc_now()}"}
        settings.progress.start("Rendering the case report", len(rows))
        with open_report(ReportFormat.HTML, out, header, overwrite=overwrite) as writer:
            for row in rows:
                evidence = None
                if row["status"] == "ok":
                    evidence = _evidence_again(row, real, row_of_path, embed, space, settings)
                    summary.pictured += evidence.suspect is not None
                    summary.problems.update(evidence.missing.keys())
                writer.write_case_record(row, evidence_record(evidence))
                summary.rows += 1
                settings.progress.advance(1)
    return summary


def _recorded_paths(shown: list[str]) -> list[str]:
    """The paths a report shows (:func:`display_path`), as paths; one manifpt never writes is left out."""
    paths = []
    for text in shown:
        with contextlib.suppress(ValueError):
            paths.append(os.fsdecode(path_from_display(text)))
    return paths


def _evidence_again(row, real, row_of_path, embed, space, settings) -> Evidence:
    """A report row's pictures, made again from its suspect file and the index."""
    try:
        suspect = decode_image(
            os.fsdecode(path_from_display(row["path"])), real.image_size, settings.max_pixels, settings.max_file_bytes
        )
    except (ImageDecodeError, ValueError) as exc:
        return Evidence(missing={"suspect": f"the file cannot be read now ({exc})"})
    if suspect.sha256 != row["sha256"]:
        return Evidence(missing={"suspect": "the file changed since the report (SHA-256 differs), so it is not shown"})
    found = row_of_path.get(row["nearest_real"])
    nearest: np.ndarray | str = "the report's nearest real image is not in this index"
    if found is not None:
        (image,) = index_images(real, np.array([found]), settings)
        nearest = image.error if isinstance(image, FailedImage) else image.pixels
    artifact: np.ndarray | str = (
        f"{space.value} artifacts need the model's backbone; `manifpt attribute --html` shows them"
    )
    if isinstance(nearest, str):
        artifact = "no nearest real image to subtract"
    elif embed is not None:
        difference = embed(suspect.pixels[None])[0].astype(np.float64) - embed(nearest[None])[0].astype(np.float64)
        distance = float(np.square(difference).sum())
        recorded = row["manifold_distance"]
        if recorded is None or not math.isclose(distance, recorded, rel_tol=1e-5, abs_tol=1e-5):
            artifact = f"recomputed distance {distance:.6g} differs from the report's {recorded}"
        else:
            artifact = difference.astype(np.float32).reshape(space.artifact_shape(real.image_size))
    return render_evidence(space, suspect.pixels, nearest, artifact)
