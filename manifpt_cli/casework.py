"""One attribution run, from folders of suspects to written reports: what `manifpt attribute` does.

The CLI and scripts call :func:`run_attribution` and only render its :class:`AttributionSummary`.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .attribute import Attribution, AttributionRow
from .engines import LocalEngine
from .errors import EXIT_OK, EXIT_PARTIAL, UsageError
from .formats import backbone_path_for
from .images import count_images, display_path
from .outputs import check_outputs
from .report import ReportFormat, open_report, sidecar_path
from .settings import DEFAULT_SETTINGS, RunSettings


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

    @property
    def attributed(self) -> int:
        return self.total - self.failed - self.skipped

    @property
    def exit_code(self) -> int:
        """0 when every file was attributed, 3 when some failed (README, "Exit codes")."""
        return EXIT_PARTIAL if self.failed else EXIT_OK


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
) -> AttributionSummary:
    """Attribute every image under ``suspects`` and stream the rows into each of ``reports``.

    ``on_row`` sees every row as it is written (the CLI keeps them for its terminal table). No
    report may be one of the inputs or lie in a suspect folder; an existing report (or its
    ``.meta.json``) is replaced only with ``overwrite``. ``engine`` (default: this process)
    does the per-image work; rows come back in discovery order whatever the engine.

    Raises:
        UsageError: no image file under ``suspects``; a report format that is not a file format.
        MismatchError, FormatError: the model and index do not belong together, or are unreadable.
    """
    for target in reports:
        if target.format is ReportFormat.TABLE:
            raise UsageError("the table is drawn by the CLI; reports are written as csv or json")
    files = [t.out for t in reports if t.out is not None]
    files += [sidecar_path(t.out) for t in reports if t.out is not None and t.format is ReportFormat.CSV]
    check_outputs(files, inputs=[model, backbone_path_for(model), index, *suspects], overwrite=overwrite)
    if len({os.path.realpath(f) for f in files}) < len(files):
        raise UsageError("two reports would be written to the same file")
    with Attribution(model, index, top_k=top_k, settings=settings) as run:
        total = count_images(suspects, sniff=settings.sniff)
        if total == 0:
            folders = ", ".join(display_path(root) for root in suspects)
            raise UsageError(f"no image files under: {folders} (searched recursively)")
        engine = engine or LocalEngine()
        summary = AttributionSummary({**run.header(suspects), **engine.describe()}, reports=list(reports))
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(open_report(t.format, t.out, summary.header, overwrite=overwrite)) for t in reports
            ]
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
    return summary
