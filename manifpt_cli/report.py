"""Stage 6: attribution rows → CSV / JSON reports (streamed; the Rich table lives in the CLI).

CSV columns and JSON keys are a public contract (README, "Reports"); changes go in CHANGELOG.
CSV reports get a ``<report>.meta.json`` sidecar with the provenance header; JSON reports carry it
as ``"header"``. Rows are written as they come, and the file appears under its final name only
when the run completes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from enum import Enum
from typing import TextIO

from .attribute import AttributionRow
from .formats import atomic_output

COLUMNS = (
    "path",
    "status",
    "predicted",
    "probability",
    "runner_up",
    "runner_up_probability",
    "top_k",
    "manifold_distance",
    "nearest_real",
    "width",
    "height",
    "sha256",
    "error",
)


class ReportFormat(str, Enum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def row_record(row: AttributionRow) -> dict:
    """The JSON form of a row (CSV flattens ``top_k``)."""
    runner_up = row.top_k[1] if len(row.top_k) > 1 else ("", float("nan"))
    width, height = row.original_size or (None, None)
    return {
        "path": row.path,
        "status": "ok" if row.ok else "error",
        "predicted": row.predicted,
        "probability": _number(row.probability),
        "runner_up": runner_up[0],
        "runner_up_probability": _number(runner_up[1]),
        "top_k": [{"label": label, "probability": round(p, 6)} for label, p in row.top_k],
        "manifold_distance": _number(row.manifold_distance),
        "nearest_real": row.nearest_real,
        "width": width,
        "height": height,
        "sha256": row.sha256,
        "error": row.error,
    }


def _csv_record(row: AttributionRow) -> dict:
    record = row_record(row)
    record["top_k"] = ";".join(f"{k['label']}:{k['probability']:.6f}" for k in record["top_k"])
    return {key: "" if value is None else value for key, value in record.items()}


class ReportWriter:
    """Writes rows as they come to ``out`` (or stdout when ``out`` is None)."""

    def __init__(self, fmt: ReportFormat, stream: TextIO, header: dict) -> None:
        self.format = fmt
        self.stream = stream
        self.first = True
        if fmt is ReportFormat.CSV:
            self.csv = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
            self.csv.writeheader()
        elif fmt is ReportFormat.JSON:
            stream.write('{\n"header": ' + json.dumps(header, ensure_ascii=False) + ',\n"rows": [')

    def write(self, row: AttributionRow) -> None:
        if self.format is ReportFormat.CSV:
            self.csv.writerow(_csv_record(row))
        elif self.format is ReportFormat.JSON:
            self.stream.write(("\n" if self.first else ",\n") + json.dumps(row_record(row), ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        if self.format is ReportFormat.JSON:
            self.stream.write("\n]\n}\n")
        self.stream.flush()


def sidecar_path(report: str | os.PathLike) -> str:
    return f"{os.fspath(report)}.meta.json"


@contextlib.contextmanager
def open_report(fmt: ReportFormat, out: str | os.PathLike | None, header: dict) -> Iterator[ReportWriter]:
    """A writer for ``fmt``; with ``out``, written atomically (and a CSV sidecar beside it)."""
    if out is None:
        writer = ReportWriter(fmt, sys.stdout, header)
        yield writer
        writer.close()
        return
    with atomic_output(out) as partial, open(partial, "w", encoding="utf-8", newline="") as stream:
        writer = ReportWriter(fmt, stream, header)
        yield writer
        writer.close()
    if fmt is ReportFormat.CSV:
        with atomic_output(sidecar_path(out)) as partial, open(partial, "w", encoding="utf-8") as stream:
            json.dump(header, stream, indent=2, ensure_ascii=False)
