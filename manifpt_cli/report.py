"""Stage 6: attribution rows → CSV / JSON / HTML reports (the Rich table lives in the CLI).

CSV columns and JSON keys are a public contract (README, "Reports"); changes go in CHANGELOG.
CSV reports get a ``<report>.meta.json`` sidecar with the provenance header; JSON reports carry it
as ``"header"``, and the HTML case report (:mod:`manifpt_cli.case_report`) shows it. A JSON
report and a CSV's sidecar end with ``content_sha256``, a digest of all they hold
(:func:`canonical_json`), so an edit anywhere in them is found by ``manifpt verify``. CSV and
JSON rows are written as they come; every file appears under its final name only when the run
completes, and records when it finished (``finished_utc``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from enum import Enum
from typing import TextIO

from .attribute import AttributionRow
from .case_report import CaseReport, evidence_record
from .errors import UsageError
from .formats import file_sha256, utc_now
from .images import display_path
from .outputs import atomic_outputs

COLUMNS = (
    "path",
    "status",
    "verdict",
    "predicted",
    "probability",
    "runner_up",
    "runner_up_probability",
    "top_k",
    "open_set_score",
    "manifold_distance",
    "nearest_real",
    "notes",
    "width",
    "height",
    "sha256",
    "error",
)


class ReportFormat(str, Enum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    HTML = "html"


def _number(value: float) -> float | None:
    """A JSON-safe number: NaN and infinities (never in an ``ok`` row) become null."""
    return round(value, 6) if math.isfinite(value) else None


def row_record(row: AttributionRow) -> dict:
    """The JSON form of a row (CSV flattens ``top_k``)."""
    runner_up = row.top_k[1] if len(row.top_k) > 1 else ("", float("nan"))
    width, height = row.original_size or (None, None)
    return {
        "path": row.path,
        "status": row.status,
        "verdict": row.verdict,
        "predicted": row.predicted,
        "probability": _number(row.probability),
        "runner_up": runner_up[0],
        "runner_up_probability": _number(runner_up[1]),
        "top_k": [{"label": label, "probability": round(p, 6)} for label, p in row.top_k],
        "open_set_score": _number(row.open_set_score),
        "manifold_distance": _number(row.manifold_distance),
        "nearest_real": row.nearest_real,
        "notes": list(row.notes),
        "width": width,
        "height": height,
        "sha256": row.sha256,
        "error": row.error,
    }


# OWASP's advice against CSV injection: a cell a spreadsheet would read as a formula starts with a
# quote. A cell that already starts with a quote gets one more, so the rule can be undone exactly.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise(cell: object) -> object:
    """Prefix text cells that a spreadsheet would run as a formula with ``'`` (numbers are left alone)."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def unneutralise(cell: str) -> str:
    """The text :func:`neutralise` was given."""
    return cell[1:] if cell.startswith("'") else cell


def _csv_record(row: AttributionRow) -> dict:
    record = row_record(row)
    record["top_k"] = ";".join(f"{k['label']}:{k['probability']:.6f}" for k in record["top_k"])
    record["notes"] = "; ".join(record["notes"])
    return {key: "" if value is None else neutralise(value) for key, value in record.items()}


def canonical_json(value: object) -> str:
    """The JSON that report digests are taken over: compact, keys sorted, UTF-8 as it is (README,
    "Reports"), so that anyone can recompute a digest from the parsed report."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ContentDigest:
    """SHA-256 of a JSON report's content, ``{"header":H,"rows":[R,…],"finished_utc":F}`` with each
    part in :func:`canonical_json`, taken as the rows are written (a case's rows are never all held)."""

    def __init__(self, header: dict) -> None:
        self._sha256 = hashlib.sha256(('{"header":' + canonical_json(header) + ',"rows":[').encode("utf-8"))
        self._first = True

    def add_row(self, record: dict) -> None:
        self._sha256.update(("" if self._first else ",").encode() + canonical_json(record).encode("utf-8"))
        self._first = False

    def finish(self, finished_utc: str) -> str:
        self._sha256.update(('],"finished_utc":' + canonical_json(finished_utc) + "}").encode("utf-8"))
        return self._sha256.hexdigest()


def json_report_digest(header: dict, rows: list[dict], finished_utc: str) -> str:
    """The ``content_sha256`` a JSON report with this content carries."""
    digest = ContentDigest(header)
    for record in rows:
        digest.add_row(record)
    return digest.finish(finished_utc)


def sidecar_digest(sidecar: dict) -> str:
    """The ``content_sha256`` of a CSV report's sidecar: of everything else in it, which includes
    the CSV's own ``report_sha256``."""
    rest = {key: value for key, value in sidecar.items() if key != "content_sha256"}
    return hashlib.sha256(canonical_json(rest).encode("utf-8")).hexdigest()


class ReportWriter:
    """Writes rows as they come to ``stream``; :meth:`close` completes the file."""

    def __init__(self, fmt: ReportFormat, stream: TextIO, header: dict, *, spool_dir: str | None = None) -> None:
        self.format = fmt
        self.stream = stream
        self.first = True
        self.finished_utc = ""
        self.content_sha256 = ""  # once closed: a JSON report's (a CSV sidecar's is set by open_report)
        if fmt is ReportFormat.HTML:
            self.case = CaseReport(stream, header, spool_dir=spool_dir)
        elif fmt is ReportFormat.CSV:
            # RFC 4180 line ends: the csv module then quotes any field holding \r or \n, so a file
            # name with a line break stays one record.
            self.csv = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\r\n")
            self.csv.writeheader()
        elif fmt is ReportFormat.JSON:
            self.digest = ContentDigest(header)
            stream.write('{\n"header": ' + _json(header) + ',\n"rows": [')

    def write(self, row: AttributionRow) -> None:
        if self.format is ReportFormat.CSV:
            self.csv.writerow(_csv_record(row))
        elif self.format is ReportFormat.JSON:
            record = row_record(row)
            self.digest.add_row(record)
            self.stream.write(("\n" if self.first else ",\n") + _json(record))
        else:
            self.write_case_record(row_record(row), evidence_record(row.evidence))
        self.first = False

    def write_case_record(self, record: dict, evidence: dict | None) -> None:
        """One row of an HTML case report from its JSON form and pictures (`manifpt report` has no
        :class:`AttributionRow`, only the rows of an earlier report)."""
        if self.format is not ReportFormat.HTML:
            raise UsageError(f"rows of an earlier report are rendered as html, not {self.format.value}")
        self.case.write_record(record, evidence)

    def close(self) -> None:
        self.finished_utc = utc_now()
        if self.format is ReportFormat.JSON:
            self.content_sha256 = self.digest.finish(self.finished_utc)
            self.stream.write(
                f'\n],\n"finished_utc": {_json(self.finished_utc)},\n"content_sha256": {_json(self.content_sha256)}\n}}\n'
            )
        elif self.format is ReportFormat.HTML:
            self.case.close(self.finished_utc)
        self.stream.flush()


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def sidecar_path(report: str | os.PathLike) -> str:
    return f"{os.fspath(report)}.meta.json"


@contextlib.contextmanager
def open_report(
    fmt: ReportFormat, out: str | os.PathLike | None, header: dict, *, overwrite: bool = False
) -> Iterator[ReportWriter]:
    """A writer for ``fmt``.

    With ``out``, the report (and for CSV its ``.meta.json`` sidecar, which records the report's
    SHA-256) is written atomically: after any interruption both are the new ones or both are
    unchanged. Without ``out`` it streams to standard output; if the run fails there, the JSON is
    left unterminated, so no parser takes it for a whole report.
    """
    if out is None:
        if fmt is ReportFormat.HTML:
            raise UsageError("an HTML case report is written to a file: give its path (--html FILE)")
        writer = ReportWriter(fmt, sys.stdout, header)
        try:
            yield writer
        finally:
            sys.stdout.flush()
        writer.close()
        return
    files = [out, sidecar_path(out)] if fmt is ReportFormat.CSV else [out]
    with atomic_outputs(files, overwrite=overwrite) as partials:
        with open(partials[0], "w", encoding="utf-8", newline="") as stream:
            writer = ReportWriter(fmt, stream, header, spool_dir=os.path.dirname(os.path.abspath(partials[0])))
            yield writer
            writer.close()
        if fmt is ReportFormat.CSV:
            provenance = {
                **header,
                "finished_utc": writer.finished_utc,
                "report": display_path(os.path.basename(out)),
                "report_sha256": file_sha256(partials[0]),
            }
            writer.content_sha256 = provenance["content_sha256"] = sidecar_digest(provenance)
            partials[1].write_text(
                json.dumps(provenance, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8"
            )
