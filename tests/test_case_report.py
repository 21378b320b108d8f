"""The HTML case report: written by `attribute --html` and `manifpt report`, opened in a real
headless Chromium, with hostile file names, and checked to load nothing from outside the file."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli.case_report import script_json
from manifpt_cli.cli import app
from manifpt_cli.evidence import artifact_picture, diverging
from manifpt_cli.report import json_report_digest
from manifpt_cli.spaces import Space

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (`apt-get install chromium`; .ci/run installs it)"
)
# The browser's own background services (updates, sign-in) are switched off where flags allow;
# it runs in an empty network namespace where possible, so nothing can leave the machine.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
HOSTILE = {
    "<script>alert(1)<": "script>.png",  # a folder and a file: together "<script>alert(1)</script>.png"
    "": "<img src=http:127.0.0.1:9 onerror=alert(2)>.png",
}


def chromium(url: str, work: Path, *extra: str) -> tuple[str, set[str]]:
    """(the DOM after scripts ran, the URLs the page itself asked the network stack for)."""
    netlog = work / f"net-{len(list(work.glob('net-*')))}.json"
    isolate = ["unshare", "--net"] if shutil.which("unshare") and _unshare_works() else []
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [*isolate, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *extra, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # A page's requests carry its origin (file://) in their network isolation key; the browser's own do not.
    requested = {
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start_job and str(event["params"].get("network_isolation_key", "")).startswith("file:")
    }
    return result.stdout, requested


def _unshare_works() -> bool:
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


class Page(html.parser.HTMLParser):
    """What a test reads from a DOM: each element's tag and attributes, and the text of file cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.files: list[str] = []
        self._in_file = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        self._in_file = tag == "td" and attributes.get("class") == "file"

    def handle_data(self, data):
        if self._in_file:
            self.files.append(data)
            self._in_file = False


def embedded_rows(page: str, block: str = "manifpt-rows") -> list:
    """The rows a case report carries in its JSON block (or another of its JSON blocks)."""
    start = page.index(f"id='{block}'>") + len(f"id='{block}'>")
    return json.loads(page[start : page.index("</script>", start)])


def cli(*args, code: int | None = 0):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def pictures(page: Path) -> dict[str, dict]:
    """Each row's pictures by path, the shared nearest real images resolved."""
    text = page.read_text(encoding="utf-8")
    shared = embedded_rows(text, "manifpt-shared-pictures")
    found = {}
    for row in embedded_rows(text):
        evidence = row["evidence"] or {"png": {}}
        found[row["path"]] = (
            {**evidence["png"], "nearest": shared[evidence["nearest_picture"]]}
            if "nearest_picture" in evidence
            else evidence["png"]
        )
    return found


@pytest.fixture(scope="module")
def case(freq_model, real_index, dataset, tmp_path_factory):
    """A case with hostile names, a broken file and a text file, attributed with --html and --report json."""
    work = tmp_path_factory.mktemp("case")
    suspects = work / "suspects"
    shutil.copytree(dataset / "suspects" / "blur", suspects / "blur")
    sample = sorted((dataset / "suspects" / "noise").iterdir())[:2]
    for (folder, name), source in zip(HOSTILE.items(), sample):
        (suspects / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, suspects / folder / name)
    (suspects / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (suspects / "readme.txt").write_text("not an image")
    model, report, page = freq_model / "freq.onnx", work / "report.json", work / "case.html"
    inputs = ["--model", model, "--index", real_index]
    cli(
        "attribute",
        suspects,
        *inputs,
        "--report",
        "json",
        "--out",
        report,
        "--html",
        page,
        "--operator",
        OPERATOR,
        code=3,
    )
    return {"work": work, "suspects": suspects, "report": report, "page": page, "index": real_index}


OPERATOR = "Det. <b>O'Brien</b>"


def test_page_holds_every_file_and_its_evidence(case):
    page = case["page"].read_text(encoding="utf-8")
    report = json.loads(case["report"].read_text(encoding="utf-8"))
    rows, shared = embedded_rows(page), embedded_rows(page, "manifpt-shared-pictures")
    assert len(shared) == len({r["nearest_real"] for r in rows if r["status"] == "ok"})
    assert [r["path"] for r in rows] == [r["path"] for r in report["rows"]]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in report["rows"]]
    by_status = {r["status"] for r in rows}
    assert by_status == {"ok", "error", "skipped"}
    for row in rows:
        if row["status"] == "ok":
            assert set(row["evidence"]["png"]) == {"suspect", "artifact", "spectrum"}, row["path"]
            assert shared[row["evidence"]["nearest_picture"]]  # stored once for all suspects that share it
            suspect = Image.open(io.BytesIO(base64.b64decode(row["evidence"]["png"]["suspect"])))
            assert suspect.size == (32, 32)
        else:
            assert row["evidence"] is None
    # The suspect picture is the decoded file, exactly (lossless).
    first = next(r for r in rows if r["path"].endswith("blur_0000.png"))
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["evidence"]["png"]["suspect"]))))
    assert np.array_equal(decoded, np.asarray(Image.open(case["suspects"] / "blur" / "blur_0000.png").convert("RGB")))
    # Static parts: provenance with both digests, the model card, limitations; the operator escaped.
    assert report["header"]["model_sha256"] in page and report["header"]["index_hash"] in page
    assert "Model card" in page and "Limitations" in page
    assert "validation images called unknown, per class" in page and "for new images" in page
    assert "a new image of a known source falls below it with probability at most" in page
    assert "Det. &lt;b&gt;O&#x27;Brien&lt;/b&gt;" in page and OPERATOR not in page
    assert report["header"]["operator"] == {"name": OPERATOR, "source": "--operator"}
    assert report["finished_utc"] >= report["header"]["created_utc"]


@needs_chromium
def test_chromium_shows_every_suspect_as_text_and_fetches_nothing(case, tmp_path):
    dom, requested = chromium(case["page"].as_uri() + "#all,details", tmp_path, "--dump-dom")
    page = Page(dom)
    rows = embedded_rows(case["page"].read_text(encoding="utf-8"))
    body = next(attrs for tag, attrs in page.elements if tag == "body")
    assert body["data-rows-drawn"] == str(len(rows)) == body["data-rows-total"]
    assert sorted(page.files) == sorted(r["path"] for r in rows)  # hostile names arrive as text, whole
    assert any("<script>alert(1)</script>.png" in name for name in page.files)
    assert [tag for tag, _ in page.elements].count("script") == 3  # two JSON blocks and the page's own script
    assert all(attrs.get("src", "data:").startswith("data:") for tag, attrs in page.elements if tag == "img")
    assert sum(tag == "img" for tag, _ in page.elements) >= 5 * sum(r["status"] == "ok" for r in rows)
    assert not any(key.startswith("on") for _, attrs in page.elements for key in attrs)
    assert requested == set(), requested
    shot = tmp_path / "case.png"
    chromium(case["page"].as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    picture = np.asarray(Image.open(shot).convert("L"))
    assert picture.shape == (1600, 1280) and picture.std() > 10  # a page was drawn, not a blank


@needs_chromium
def test_the_network_check_sees_a_page_that_fetches(tmp_path):
    """The check above can fail: a page with an outside image is caught."""
    leaky = tmp_path / "leaky.html"
    leaky.write_text("<html><body><img src='http://127.0.0.1:9/x.png'><p>leak</p></body></html>")
    _, requested = chromium(leaky.as_uri(), tmp_path, "--dump-dom")
    assert requested == {"http://127.0.0.1:9/x.png"}


def test_report_command_renders_the_same_evidence_and_flags_changed_files(case):
    again = case["work"] / "again.html"
    cli("report", case["report"], "--html", again)
    assert pictures(again) == pictures(case["page"])  # made again from the files: identical
    changed = case["suspects"] / "blur" / "blur_0001.png"
    keep = changed.read_bytes()
    try:
        pixels = np.asarray(Image.open(changed).convert("RGB")).copy()
        pixels[0, 0] ^= 1
        Image.fromarray(pixels).save(changed)
        result = cli("report", case["report"], "--html", again, "--overwrite")
    finally:
        changed.write_bytes(keep)
    assert "suspect not shown for 1" in result.stderr
    row = next(r for r in embedded_rows(again.read_text(encoding="utf-8")) if r["path"].endswith("blur_0001.png"))
    assert row["evidence"]["png"] == {} and "changed since the report" in row["evidence"]["missing"]["suspect"]


def test_report_command_refuses_a_wrong_index_and_inputs_as_outputs(case, freq_model, dataset, tmp_path):
    from manifpt_cli.manifold import build_index

    other = tmp_path / "other.h5"
    build_index([dataset / "suspects" / "noise"], other, [Space.FREQ], size=32)
    result = cli("report", case["report"], "--html", tmp_path / "x.html", "--index", other, code=1)
    assert "is not the one report" in result.stderr and not (tmp_path / "x.html").exists()
    result = cli("report", case["report"], "--html", case["report"], "--overwrite", code=2)
    assert json.loads(case["report"].read_text())["rows"]  # the input is untouched
    result = cli("report", case["report"], "--html", case["page"], code=2)  # exists, no --overwrite
    assert "--overwrite" in result.stderr


def test_report_command_reads_a_csv_report_with_its_sidecar(case, freq_model, tmp_path):
    inputs = ["--model", freq_model / "freq.onnx", "--index", case["index"]]
    cli("attribute", case["suspects"] / "blur", *inputs, "--report", "csv", "--out", tmp_path / "r.csv")
    cli("report", tmp_path / "r.csv", "--html", tmp_path / "case.html")
    rows = embedded_rows((tmp_path / "case.html").read_text(encoding="utf-8"))
    original = {r["path"]: r for r in embedded_rows(case["page"].read_text(encoding="utf-8"))}
    assert rows and all(r["top_k"] == original[r["path"]]["top_k"] for r in rows)
    again, first = pictures(tmp_path / "case.html"), pictures(case["page"])
    assert again and all(again[path] == first[path] for path in again)
    text = (tmp_path / "r.csv").read_text(encoding="utf-8")
    forged = text.replace(",blur,", ",noise,", 1)  # one row's verdict, changed after the fact
    assert forged != text
    (tmp_path / "r.csv").write_text(forged, encoding="utf-8")
    result = cli("report", tmp_path / "r.csv", "--html", tmp_path / "forged.html", code=1)
    assert "changed after manifpt wrote it" in result.stderr and not (tmp_path / "forged.html").exists()


@pytest.mark.parametrize("damage", ["no header space", "a row without sha256", "truncated"])
def test_report_command_refuses_a_damaged_report(case, tmp_path, damage):
    report = json.loads(case["report"].read_text(encoding="utf-8"))
    if damage == "no header space":
        del report["header"]["space"]
    elif damage == "a row without sha256":
        del report["rows"][0]["sha256"]
    # Sealed again, as a forger would: the report's shape is checked, not only its digest.
    report["content_sha256"] = json_report_digest(report["header"], report["rows"], report["finished_utc"])
    text = json.dumps(report)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(text[: len(text) // 2] if damage == "truncated" else text, encoding="utf-8")
    result = cli("report", damaged, "--html", tmp_path / "case.html", code=1)
    assert "is not a manifpt report" in result.stderr and not (tmp_path / "case.html").exists()


def test_html_needs_a_file(case, freq_model):
    model = freq_model / "freq.onnx"
    result = cli("attribute", case["suspects"], "--model", model, "--index", case["index"], "--report", "html", code=2)
    assert "needs a file" in result.stderr


def test_script_json_cannot_close_its_element():
    text = script_json({"path": "</script><script>alert(1)</script>", "note": "<!-- & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text)["path"] == "</script><script>alert(1)</script>"


def test_signed_pictures_are_white_at_zero_and_saturate_at_the_percentile():
    values = np.zeros((4, 4))
    values[0, 0], values[0, 1] = 1.0, -1.0
    picture, scale = diverging(values)
    assert tuple(picture[3, 3]) == (255, 255, 255)  # zero is white
    assert tuple(picture[0, 0]) == (255, 0, 0) and tuple(picture[0, 1]) == (0, 0, 255)
    assert scale == pytest.approx(np.percentile(np.abs(values), 99))
    same = artifact_picture(Space.RGB, np.zeros((3, 8, 8), np.float32))[0]
    assert (same == 255).all()


def test_how_to_read_states_an_uncalibrated_temperature_and_the_false_alarm_bound():
    from manifpt_cli.case_report import CaseReport

    rule = {"open_set_score": "knn", "threshold": -0.1, "target_fpr": 0.05, "false_alarm_bound": 0.0497}
    header = {"verdict_rule": rule, "classes": ["a", "real"], "calibration": {"temperature_at_bound": True}}
    stream = io.StringIO()
    page = CaseReport(stream, header)
    page.close()
    text = stream.getvalue()
    assert "probability at most 0.0497" in text and "temperature stopped at the end of its range" in text
    stream = io.StringIO()
    page = CaseReport(stream, {**header, "calibration": {"temperature_at_bound": False}})
    page.close()
    assert "temperature stopped" not in stream.getvalue()
