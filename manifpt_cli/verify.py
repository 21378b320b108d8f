"""Re-check a report against the files it names: every suspect, the model and the index.

`manifpt verify REPORT` answers "are these still the files this report was made from?": each
suspect file is hashed again and compared with the report's SHA-256, the model with the report
header's ``model_sha256`` and its export digest, the index with its own digests and the header's
``index_hash``, and a CSV report with the SHA-256 its ``.meta.json`` recorded.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

from .errors import FormatError, ImageDecodeError, ManifptError, UsageError
from .formats import file_sha256, open_regular
from .images import array_row_sha256, path_from_display, split_array_row
from .integrity import IntegrityError
from .report import json_report_digest, sidecar_digest, sidecar_path, unneutralise

MATCHES, CHANGED, MISSING = "matches", "changed", "missing"
NOT_HASHED = "not hashed in the report"  # skipped files and files refused unread: nothing to compare
# Earlier reports carry no content_sha256: what they hold cannot be checked.
NO_DIGEST = "not checked: it has no content_sha256 (written before reports carried one)"


@dataclass(frozen=True)
class Check:
    """One file compared with what the report recorded."""

    what: str  # "suspect", "model", "index", "report"
    path: str
    result: str  # matches, changed, missing, or a sentence saying why it could not be checked
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (MATCHES, NOT_HASHED)


@dataclass
class Verification:
    report: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def count(self, result: str) -> int:
        return sum(check.result == result for check in self.checks)


# What readers of a report's header and rows rely on, by type (README, "Reports"): text cells,
# and the header's parts that are objects or lists of text.
HEADER_TEXT = ("model", "model_sha256", "index", "index_hash", "space", "created_utc", "finished_utc", "report_sha256")
HEADER_OBJECTS = ("verdict_rule", "model_card", "operator", "verification", "search", "settings", "versions")
HEADER_TEXT_LISTS = ("classes", "suspects")
ROW_TEXT = ("path", "status", "verdict", "predicted", "runner_up", "nearest_real", "sha256", "error")
ROW_NUMBERS = ("probability", "runner_up_probability", "open_set_score", "manifold_distance", "width", "height")


def _json_number(value) -> bool:
    """A JSON number or null."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _number_or_none(value) -> bool:
    """A JSON number or null, or a CSV cell (text, checked where it is parsed)."""
    return isinstance(value, str) or _json_number(value)


def _row_types_wrong(row: dict) -> list[str]:
    wrong = [key for key in ROW_TEXT if not isinstance(row.get(key, ""), str)]
    wrong += [key for key in ROW_NUMBERS if not _number_or_none(row.get(key))]
    top_k, notes = row.get("top_k", ""), row.get("notes", "")
    if not isinstance(top_k, str) and not (
        isinstance(top_k, list)
        and all(
            isinstance(k, dict) and isinstance(k.get("label"), str) and _json_number(k.get("probability"))
            for k in top_k
        )
    ):
        wrong.append("top_k")
    if not isinstance(notes, str) and not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        wrong.append("notes")
    return wrong


def _check_report_types(header, rows) -> None:
    """Refuse a report whose header or rows are not of the types manifpt writes (ValueError)."""
    if not isinstance(header, dict):
        raise ValueError("its header is not an object")
    wrong = [key for key in HEADER_TEXT if not isinstance(header.get(key, ""), str)]
    wrong += [key for key in HEADER_OBJECTS if not isinstance(header.get(key) or {}, dict)]
    lists = [header.get(key, []) for key in HEADER_TEXT_LISTS]
    wrong += [
        key
        for key, value in zip(HEADER_TEXT_LISTS, lists)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value)
    ]
    if wrong:
        raise ValueError(f"header fields of the wrong type: {', '.join(wrong)}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("its rows are not a list of objects")
    for number, row in enumerate(rows, start=1):
        wrong = _row_types_wrong(row)
        if wrong:
            raise ValueError(f"row {number}: fields of the wrong type: {', '.join(wrong)}")


def _digest_check(path: str, recorded, actual: str, detail: str) -> Check:
    """A report file against a digest it recorded; ``recorded`` None: it recorded none."""
    if recorded is None:
        return Check("report", path, NO_DIGEST, detail)
    return Check("report", path, MATCHES if recorded == actual else CHANGED, detail)


def read_report(path: str) -> tuple[dict, list[dict], list[Check]]:
    """(header, rows, the checks of the report's own digests) of a CSV or JSON report: a JSON
    report against its ``content_sha256``; a CSV against its sidecar's ``report_sha256``, and the
    sidecar against its ``content_sha256``.

    CSV rows are given as their text cells (formula neutralisation undone), JSON rows as parsed.
    Only regular files are read, and the header and rows must be of the types manifpt writes.
    """
    try:
        if path.lower().endswith(".json"):
            with open_regular(path, "r", encoding="utf-8") as handle:
                report = json.load(handle)
            if not isinstance(report, dict):
                raise ValueError("it is not a JSON object")
            header, rows, finished = report["header"], report["rows"], report.get("finished_utc", "")
            _check_report_types(header, rows)
            actual = json_report_digest(header, rows, finished)
            check = _digest_check(path, report.get("content_sha256"), actual, "content_sha256 of its header and rows")
            return {**header, "finished_utc": finished}, rows, [check]
        with open_regular(path, "r", newline="", encoding="utf-8") as handle:
            rows = [{key: unneutralise(value) for key, value in row.items()} for row in csv.DictReader(handle)]
        if not os.path.lexists(sidecar_path(path)):
            raise IntegrityError(
                f"cannot check {path}: its provenance {sidecar_path(path)} is missing (removed, or the CSV was "
                "copied without it), and it holds the digest the report is checked against"
            )
        with open_regular(sidecar_path(path), "r", encoding="utf-8") as handle:
            header = json.load(handle)
        _check_report_types(header, rows)
        sidecar = _digest_check(
            sidecar_path(path), header.get("content_sha256"), sidecar_digest(header), "content_sha256 of its header"
        )
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read report {path}: {exc.filename} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read report {path}: {exc.filename}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, csv.Error) as exc:
        raise FormatError(f"{path} is not a manifpt report (or is damaged): {exc}") from None
    check = _digest_check(path, header.get("report_sha256", ""), file_sha256(path), "against its .meta.json")
    return header, rows, [check, sidecar]


def _check_file(what: str, shown: str, expected: str, array_rows: dict | None = None) -> Check:
    """``shown`` against its recorded SHA-256; a row of an array file against ``array_rows``
    (:func:`_array_row_hashes`)."""
    try:
        real = path_from_display(shown)
    except ValueError:
        return Check(what, shown, "not checked: the path in the report is not one manifpt writes")
    if not os.path.lexists(real):
        located = split_array_row(os.fsdecode(real)) if array_rows is not None else None
        now = array_rows.get(located[0], {}).get(located[1]) if located else None
        if now is None:
            return Check(what, shown, MISSING)
        if isinstance(now, ImageDecodeError):
            return Check(what, shown, f"not checked: {now}")
        return Check(what, shown, MATCHES if now == expected else CHANGED, f"row sha256 now {now[:16]}…")
    try:
        actual = file_sha256(real)
    except OSError as exc:
        return Check(what, shown, f"not checked: {exc.strerror or exc}")
    return Check(what, shown, MATCHES if actual == expected else CHANGED, f"sha256 now {actual[:16]}…")


def verify_report(report: str | os.PathLike) -> Verification:
    """Compare every file a report names with the digests it recorded."""
    from .attribute import OnnxAttributor
    from .manifold import RealIndex

    path = os.fspath(report)
    header, rows, report_checks = read_report(path)
    result = Verification(path, list(report_checks))
    model = header.get("model", "")
    model_check = _check_file("model", model, header.get("model_sha256", ""))
    card_check = None
    if model_check.ok:
        try:
            # Loading verifies the digest sealed at export, and the card.
            card_check = _check_header_against_model(
                path, header, OnnxAttributor(os.fsdecode(path_from_display(model)))
            )
        except ManifptError as exc:
            model_check = Check("model", model, CHANGED, str(exc))
    result.checks.append(model_check)
    if card_check is not None:
        result.checks.append(card_check)
    index = header.get("index", "")
    try:
        index_file = path_from_display(index)
    except ValueError:
        index_file = b""
    if not os.path.isfile(index_file):
        result.checks.append(Check("index", index, MISSING))
    else:
        try:
            with RealIndex(os.fsdecode(index_file)) as opened:
                same = opened.index_hash == header.get("index_hash")
            result.checks.append(Check("index", index, MATCHES if same else CHANGED, "index_hash"))
        except ManifptError as exc:
            result.checks.append(Check("index", index, CHANGED, str(exc)))
    array_rows = _array_row_hashes(row["path"] for row in rows if row.get("sha256"))
    for row in rows:
        if not row.get("sha256"):
            result.checks.append(Check("suspect", row["path"], NOT_HASHED, row.get("status", "")))
        else:
            result.checks.append(_check_file("suspect", row["path"], row["sha256"], array_rows))
    return result


def _check_header_against_model(path: str, header: dict, model) -> Check:
    """The report header's account of the model (its space, image size, classes, calibration,
    model card and verdict rule) against the verified model's own card: the report's digests show
    that it is as written, this that it was written from this model."""
    from .attribute import report_model_fields

    recorded = report_model_fields(model)
    recorded = json.loads(json.dumps(recorded))  # as a report stores it
    differ = [key for key, value in recorded.items() if header.get(key) != value]
    if differ:
        return Check("report header", path, CHANGED, f"differs from the model's card in: {', '.join(differ)}")
    return Check("report header", path, MATCHES, "its model fields, against the model's card")


def _array_row_hashes(shown_paths) -> dict[str, dict[int, str | ImageDecodeError]]:
    """For suspects that were rows of array files (``FILE#row=I``): each file's rows' SHA-256 now,
    one pass per file (or why the file cannot be read)."""
    wanted: dict[str, set[int]] = {}
    for shown in shown_paths:
        try:
            real = os.fsdecode(path_from_display(shown))
        except ValueError:
            continue
        located = None if os.path.lexists(real) else split_array_row(real)
        if located is not None:
            wanted.setdefault(located[0], set()).add(located[1])
    hashes: dict = {}
    for path, rows in wanted.items():
        try:
            hashes[path] = array_row_sha256(path, rows)
        except ImageDecodeError as exc:
            hashes[path] = dict.fromkeys(rows, exc)
    return hashes
