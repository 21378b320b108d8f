"""HTML case report at scale: file size, the cost of its pictures, and how fast a browser opens it.

Not a test (figures, not pass/fail). One run does, on the same suspects:
(a) `attribute` to a CSV report only, and (b) to a CSV report plus `--html`, via the library;
then opens the case report in headless Chromium and reads the time from navigation start to the
first page of 100 rows drawn (the page's ``data-open-ms``; its script's own share is
``data-render-ms``). The wall time of `--dump-dom` against a blank page is printed too; it also
counts serialising the whole DOM, pictures included, back out.

Real images: ../shared/data/real32.npz when present, otherwise crops of the photos bundled with
scikit-image. Suspects are real crops passed through the test suite's degradations.

    python bench/html_report.py [--suspects 5000] [--reals 2000]
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribute_throughput import real_images, timed, write_pngs  # noqa: E402

from tests.conftest import SOURCES, degrade  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def open_in_chromium(url: str) -> tuple[float, str]:
    """(seconds for Chromium to load ``url`` and print its DOM, the DOM)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    isolate = ["unshare", "--net"] if shutil.which("unshare") else []
    with tempfile.TemporaryDirectory() as profile:
        command = [*isolate, chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
        start = time.perf_counter()
        dom = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    return time.perf_counter() - start, dom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suspects", type=int, default=5000)
    parser.add_argument("--reals", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    from manifpt_cli.artifacts import extract_artifacts
    from manifpt_cli.casework import ReportTarget, run_attribution
    from manifpt_cli.export import export_onnx
    from manifpt_cli.manifold import build_index
    from manifpt_cli.report import ReportFormat
    from manifpt_cli.settings import RunSettings
    from manifpt_cli.spaces import Space
    from manifpt_cli.train import TrainConfig, train_attributor

    work = args.work or Path(tempfile.mkdtemp(prefix="manifpt-html-"))
    images, origin = real_images(args.reals + args.suspects + 400, seed=0)
    rng = np.random.default_rng(1)
    write_pngs(work / "real", images[: args.reals], "real")
    train, suspects = images[args.reals : args.reals + 400], images[args.reals + 400 :]
    for i, source in enumerate(SOURCES):
        write_pngs(work / "train" / source, np.stack([degrade(source, x, rng) for x in train[i::4]]), source)
        write_pngs(work / "suspects" / source, np.stack([degrade(source, x, rng) for x in suspects[i::4]]), source)
    build_index([work / "real"], work / "real.h5", [Space.RGB, Space.FREQ], size=32)
    sources = [(s, str(work / "train" / s)) for s in SOURCES]
    extract_artifacts(work / "real.h5", sources, work / "artifacts.h5")
    train_attributor(work / "artifacts.h5", Space.FREQ, work / "freq.pt", config=TrainConfig(epochs=3))
    export_onnx(work / "freq.pt", work / "freq.onnx")

    settings = RunSettings(workers=1, threads=2)
    model, index, folder = work / "freq.onnx", work / "real.h5", [work / "suspects"]
    csv_only = [ReportTarget(ReportFormat.CSV, work / "a.csv")]
    with_html = [ReportTarget(ReportFormat.CSV, work / "b.csv"), ReportTarget(ReportFormat.HTML, work / "case.html")]
    seconds_csv, summary = timed(lambda: run_attribution(model, index, folder, reports=csv_only, settings=settings))
    seconds_html, _ = timed(lambda: run_attribution(model, index, folder, reports=with_html, settings=settings))
    (work / "blank.html").write_text("<!DOCTYPE html><html><body><p>blank</p></body></html>")
    blank, _ = open_in_chromium((work / "blank.html").as_uri())
    opened, dom = open_in_chromium((work / "case.html").as_uri())
    render_ms = re.search(r"data-render-ms=\"(\d+)\"", dom).group(1)
    open_ms = re.search(r"data-open-ms=\"(\d+)\"", dom).group(1)
    size = (work / "case.html").stat().st_size
    n = summary.total
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores")
    print(f"{n} suspects (degraded crops of {origin}), index of {args.reals} reals, freq small CNN")
    print(f"attribute, CSV only:          {seconds_csv:7.1f} s  ({n / seconds_csv:6.0f} images/s)")
    print(f"attribute, CSV + --html:      {seconds_html:7.1f} s  ({n / seconds_html:6.0f} images/s)")
    print(f"case.html: {size / 2**20:.1f} MiB ({size / n / 1024:.1f} KiB per suspect)")
    print(f"Chromium --dump-dom: case.html {opened:.2f} s, blank page {blank:.2f} s, so {opened - blank:.2f} s to open")
    print(f"first page of 100 rows on screen {open_ms} ms after navigation began (the script itself: {render_ms} ms)")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
