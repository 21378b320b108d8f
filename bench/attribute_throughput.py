"""Attribution throughput, measured side by side in one run (not a test: figures, not pass/fail).

(a) `manifpt attribute` end to end: decode → φ → search → artifact → ONNX Runtime → CSV rows,
    via the library, in a process without PyTorch (as `attribute` runs).
(a unshared) the same, but each batch searched whole in the read-ahead thread (as before the
    caller shared the search: :mod:`manifpt_cli.shared_work`), timed in turn with (a).
(b) the exported ONNX attributor alone, on the same suspects' artifacts, same batch size.
(c) a PyTorch-eager pipeline with a brute-force nearest-neighbour scan, as the authors' reference
    code works: same decoding, one exhaustive scan of the real set per suspect, eager model.
(d) FAISS flat search against the same brute-force scan, for the same queries.

Then each stage of (a) alone, per image, on the same suspects, each the library's own step:
discover, read + SHA-256, decode (from bytes in memory), embed + search (``search_batch``: φ, the
nearest real image, the artifact), the attributor (``predicted``), rows (``finish_batch``:
verdicts, paths) and the CSV report. (a), (b) and the
stages are each the best of three runs. The ratio of (a) to the stages' sum says how close the
pipeline comes to its own limit: above 1 it adds overhead, below 1 it overlaps stages (decoding
runs in its own thread). Last, the `manifpt attribute` command in a child process: the whole
run's time (start-up and index verification included) and peak memory (VmHWM, Linux). Just before
(a), the machine's parallel capacity: how much more work two processes do at once than one (pure
Python, and float32 matrix products), which bounds how far two threads can overlap the stages.

Real images: ../shared/data/real32.npz when present (20k real 32×32 crops), otherwise crops of the
photos bundled with scikit-image. Usage:

    python bench/attribute_throughput.py [--reals 20000] [--suspects 2000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real32.npz"


def bundled_crops(n: int, seed: int) -> np.ndarray:
    from manifpt_cli.research.samples import bundled_photo_paths, random_crops

    rng = np.random.default_rng(seed)
    photos = bundled_photo_paths()
    return np.stack([c for p in photos for c in random_crops(p, n // len(photos) + 1, 32, rng)][:n])


def real_images(n: int, seed: int) -> tuple[np.ndarray, str]:
    """The real set: ../shared's crops when present, else crops of the bundled photos."""
    if SHARED.is_file():
        data = np.load(SHARED)["images"]
        if n <= len(data):
            return data[np.random.default_rng(seed).permutation(len(data))[:n]], f"{SHARED.name}"
    return bundled_crops(n, seed), "crops of scikit-image's bundled photos"


def write_pngs(folder: Path, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}_{i:05d}.png", compress_level=1)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    """The shortest of ``repeats`` timed runs (the machine's other load only ever adds time), and a result."""
    runs = [timed(fn) for _ in range(repeats)]
    return min(seconds for seconds, _ in runs), runs[-1][1]


def stage_costs(run, suspects: Path, batch_size: int, report: Path) -> dict[str, float]:
    """Seconds of each stage of attribution measured alone, over every suspect (see the docstring)."""
    from manifpt_cli import images
    from manifpt_cli.images import DecodedImage, discover_images
    from manifpt_cli.report import ReportFormat, ReportWriter

    model = run.model
    size, max_pixels, max_bytes = model.image_size, run.settings.max_pixels, run.settings.max_file_bytes
    seconds: dict[str, float] = {}
    seconds["discover"], found = best_of(lambda: list(discover_images([suspects])))
    paths = [entry.path for entry in found]

    def read_and_hash(path: str) -> tuple[bytes, str]:
        data = images._read_regular_file(path, max_bytes)  # the library's own read, alone
        return data, hashlib.sha256(data).hexdigest()

    seconds["read + SHA-256"], files = best_of(lambda: [read_and_hash(path) for path in paths])
    seconds["decode"], decoded = best_of(lambda: [images._decode_bytes(data, size, max_pixels) for data, _ in files])
    items = [DecodedImage(p, px, original, sha, q) for p, (px, original, q), (_, sha) in zip(paths, decoded, files)]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    seconds["embed + search (neighbour, artifact, attributor inputs)"], searched = best_of(
        lambda: [run.search_batch(batch) for batch in batches]
    )
    seconds["attributor"], predicted = best_of(lambda: [run.predicted(batch) for batch in searched])
    seconds["rows (verdicts, paths)"], rows = best_of(
        lambda: [row for batch in predicted for row in run.finish_batch(batch)]
    )
    with open(report, "w", encoding="utf-8", newline="") as stream:
        writer = ReportWriter(ReportFormat.CSV, stream, {})
        seconds["report (CSV)"], _ = best_of(lambda: [writer.write(row) for row in rows])
        writer.close()
    return seconds


# Runs the CLI and records the process's peak resident memory (VmHWM, Linux) at exit. The child's
# own getrusage would not do: it counts the pages it shared with this (large) process when forked.
PEAK_WRAPPER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    with open("/proc/self/status") as status, open(out, "w") as handle:
        handle.write(status.read().split("VmHWM:")[1].split()[0])
atexit.register(peak)
sys.argv[0] = "manifpt"
runpy.run_module("manifpt_cli", run_name="__main__")
"""


def attribute_command(work: Path, index: Path, batch_size: int) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of `manifpt attribute` over the suspects, in a child process."""
    peak_file = work / "peak_kib.txt"
    command = [sys.executable, "-c", PEAK_WRAPPER, str(peak_file), "attribute", str(work / "suspects")]
    command += ["--model", str(work / "m.onnx"), "--index", str(index), "--report", "csv"]
    command += ["--out", str(work / "report.csv"), "--overwrite", "-q", "--batch-size", str(batch_size)]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return time.perf_counter() - started, int(peak_file.read_text()) / 1024


# A fixed piece of CPU work, in pure Python (interpreter-bound, as decoding's and the rows' Python
# code is) or as float32 matrix products (vector units, as the search and the attributor are).
CAPACITY_PROBE = r"""
import sys, time
import numpy as np
start = time.perf_counter()
if sys.argv[1] == "python":
    total = 0
    for i in range(4_000_000):
        total += i * i
else:
    matrix = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    for _ in range(300):
        matrix @ matrix
print(time.perf_counter() - start)
"""


def parallel_capacity(kind: str, repeats: int = 3) -> float:
    """How many times one core's throughput two processes get at once (2.0: two full cores).

    A 2-core virtual machine need not give two cores' worth: its two CPUs may share a physical
    core, or the host may be busy. The pipeline's two threads can at best go this much faster
    than one, so it bounds (a) from below at (sum of the stages) / capacity.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def run(copies: int) -> list[float]:
        command = [sys.executable, "-c", CAPACITY_PROBE, kind]
        children = [subprocess.Popen(command, stdout=subprocess.PIPE, env=env) for _ in range(copies)]
        return [float(child.communicate()[0]) for child in children]

    alone = min(run(1)[0] for _ in range(repeats))
    together = sorted(sum(run(2)) / 2 for _ in range(repeats))[repeats // 2]
    return 2 * alone / together


def measure_attribution(work: Path, batch_size: int) -> None:
    """(a), (b), FAISS search alone and each stage of (a), written to WORK/attribution.json.

    Run in its own process (``--measure-attribution``): like `manifpt attribute`, it never imports
    PyTorch, whose thread pool would otherwise share the process with FAISS and ONNX Runtime.
    """
    from manifpt_cli.attribute import Attribution
    from manifpt_cli.images import decode_folder
    from manifpt_cli.report import ReportFormat, ReportWriter
    from manifpt_cli.settings import RunSettings

    settings = RunSettings(batch_size=batch_size)
    settings.apply()
    with Attribution(work / "m.onnx", work / "real.h5", settings=settings) as run:
        warm_up = sorted((work / "suspects" / "plain").iterdir())[:batch_size]
        sum(1 for _ in run.rows(warm_up))  # FAISS index load, ORT's first run

        def end_to_end(rows) -> int:
            written = 0
            with open(work / "report.csv", "w", encoding="utf-8", newline="") as stream:
                writer = ReportWriter(ReportFormat.CSV, stream, {})
                for row in rows([work / "suspects"]):
                    writer.write(row)
                    written += 1
                writer.close()
            return written

        def unshared_rows(roots):
            """(a) as before the search was shared: each batch searched whole in the read-ahead thread."""
            for searched in decode_folder(roots, run.model.image_size, settings, then=run.search_batch):
                yield from run.finish_batch(run.predicted(searched))

        # In turn, so that the machine's drift (this VM's speed varies) falls on both alike.
        shared_runs, unshared_runs = [], []
        for _ in range(3):
            shared_runs.append(timed(lambda: end_to_end(run.rows)))
            unshared_runs.append(timed(lambda: end_to_end(unshared_rows))[0])
        (t_end_to_end, counted), t_unshared = min(shared_runs), min(unshared_runs)
        stages = stage_costs(run, work / "suspects", batch_size, work / "stages.csv")
        space, index, model = run.model.space, run.index, run.model
        decoded = [item for batch in decode_folder([work / "suspects"], model.image_size, settings) for item in batch]
        queries = model.embedder(np.stack([item.pixels for item in decoded]))
        found = index.nearest(space, queries)
        t_faiss, _ = best_of(lambda: index.nearest(space, queries))
        artifacts = (queries - index.embeddings(space, found.ids)).reshape(-1, *space.artifact_shape(model.image_size))
        batches = [artifacts[i : i + batch_size] for i in range(0, len(artifacts), batch_size)]
        t_onnx, _ = best_of(lambda: [model.predict(batch) for batch in batches])
    with open("/proc/self/status") as status:
        peak_kib = int(status.read().split("VmHWM:")[1].split()[0])
    result = {
        "n": counted,
        "threads": settings.compute_threads,
        "end_to_end": t_end_to_end,
        "unshared": t_unshared,
        "onnx": t_onnx,
        "faiss": t_faiss,
        "stages": stages,
        "peak_mib": peak_kib / 1024,
        "neighbour_ids": found.ids.tolist(),
    }
    (work / "attribution.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reals", type=int, default=20000)
    parser.add_argument("--suspects", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--reference-suspects",
        type=int,
        default=300,
        help="suspects timed through the slow brute-force paths (rates are per image, so ratios stay fair)",
    )
    parser.add_argument("--arch", default="small")
    parser.add_argument("--space", default="rgb", choices=["rgb", "freq"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--measure-attribution", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_attribution:
        measure_attribution(args.measure_attribution, args.batch_size)
        return

    import torch

    from manifpt_cli.artifacts import extract_artifacts
    from manifpt_cli.export import export_onnx
    from manifpt_cli.images import decode_folder
    from manifpt_cli.manifold import RealIndex, build_index
    from manifpt_cli.settings import RunSettings
    from manifpt_cli.spaces import PixelEmbedder, Space
    from manifpt_cli.train import TrainConfig, load_checkpoint, train_attributor

    space = Space(args.space)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="manifpt-bench-"))
    for stale in ("real", "suspects"):  # a reused --workdir must not leak earlier runs' images
        shutil.rmtree(work / stale, ignore_errors=True)
    reals, origin = real_images(args.reals, seed=0)
    suspects = bundled_crops(args.suspects, seed=1)
    # Two "sources" so the attributor has classes; timing does not depend on what they are.
    write_pngs(work / "real", reals, "real")
    write_pngs(work / "suspects" / "plain", suspects[: len(suspects) // 2], "plain")
    write_pngs(
        work / "suspects" / "noisy", np.clip(suspects[len(suspects) // 2 :] + 8, 0, 255).astype(np.uint8), "noisy"
    )

    index = work / "real.h5"
    settings = RunSettings(batch_size=args.batch_size)
    settings.apply()
    build_settings = RunSettings(batch_size=512)
    t_index, _ = timed(
        lambda: build_index([work / "real"], index, [space], size=32, settings=build_settings, overwrite=True)
    )
    extract_artifacts(
        index,
        [("plain", str(work / "suspects" / "plain")), ("noisy", str(work / "suspects" / "noisy"))],
        work / "art.h5",
        spaces=[space],
        overwrite=True,
    )
    train_attributor(
        work / "art.h5", space, work / "m.pt", config=TrainConfig(arch=args.arch, epochs=1), overwrite=True
    )
    export_onnx(work / "m.pt", work / "m.onnx", overwrite=True)
    n = len(suspects)

    capacity = {kind: parallel_capacity(kind) for kind in ("python", "matmul")}
    # (a), (b), FAISS alone and each stage, in a process without PyTorch, as `attribute` runs
    child = [sys.executable, __file__, "--measure-attribution", str(work), "--batch-size", str(args.batch_size)]
    subprocess.run(child, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    measured = json.loads((work / "attribution.json").read_text())
    t_end_to_end, t_onnx, t_faiss, stages = (measured[key] for key in ("end_to_end", "onnx", "faiss", "stages"))
    t_unshared = measured["unshared"]
    threads = measured["threads"]
    t_command, peak_mib = attribute_command(work, index, args.batch_size)

    with RealIndex(index) as real_index:
        decoded = [item for batch in decode_folder([work / "suspects"], 32, settings) for item in batch]
        queries = PixelEmbedder(space)(np.stack([item.pixels for item in decoded]))
        database = real_index.all_embeddings(space)

    # (c) reference-style: PyTorch eager, exhaustive scan per suspect
    model, _ = load_checkpoint(work / "m.pt")
    database_t = torch.from_numpy(database)

    def brute_force_ids(q: np.ndarray) -> np.ndarray:
        return np.array([int(((database_t - torch.from_numpy(row)) ** 2).sum(1).argmin()) for row in q])

    n_reference = min(n, args.reference_suspects)
    reference_files = [d.path for d in decoded[:n_reference]]

    def reference_pipeline() -> int:
        done = 0
        with torch.inference_mode():
            for batch in decode_folder(reference_files, 32, settings):
                px = np.stack([item.pixels for item in batch])
                q = PixelEmbedder(space)(px)
                ids = brute_force_ids(q)
                model(
                    torch.from_numpy((q - database[ids]).reshape(len(q), 3, 32, 32))
                )  # (logits, probabilities, scores)
                done += len(batch)
        return done

    t_reference, _ = timed(reference_pipeline)
    t_brute, brute_ids = timed(lambda: brute_force_ids(queries[:n_reference]))
    faiss_ids = np.array(measured["neighbour_ids"][:n_reference])
    assert (brute_ids == faiss_ids).mean() > 0.99, "FAISS and the brute-force scan must agree"

    rate = lambda seconds, count=n: count / seconds  # noqa: E731
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\nmanifpt attribution throughput — {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(load average {load} at the end), {threads} compute threads, "
        f"{args.reals} reals from {origin}, {n} suspects, space {space.value}, arch {args.arch}, batch {args.batch_size}"
    )
    print(f"index build: {args.reals} reals in {t_index:.1f} s\n")
    print("| measurement | images/s |\n|---|---:|")
    print(f"| (a) attribute end to end | {rate(t_end_to_end):,.0f} |")
    print(f"| (a) with each batch's search in the read-ahead thread alone (unshared) | {rate(t_unshared):,.0f} |")
    print(f"| (b) ONNX attributor alone | {rate(t_onnx):,.0f} |")
    print(
        f"| (c) PyTorch eager + brute-force NN scan ({n_reference} suspects) | {rate(t_reference, n_reference):,.1f} |"
    )
    print(
        f"| nearest-neighbour search alone (`RealIndex.nearest`: the space's default search) | {rate(t_faiss):,.0f} |"
    )
    print(f"| brute-force NN scan alone ({n_reference} suspects) | {rate(t_brute, n_reference):,.1f} |\n")
    print(f"(a)/(b) = {rate(t_end_to_end) / rate(t_onnx):.2f}   (target ≥ 0.8)")
    print(f"(a)/(a unshared) = {t_unshared / t_end_to_end:.2f}   (what sharing each batch's search gives)")
    print(f"(a)/(c) = {rate(t_end_to_end) / rate(t_reference, n_reference):.1f}×   (target ≥ 5)")
    print(f"search / brute force = {rate(t_faiss) / rate(t_brute, n_reference):.1f}×   (target ≥ 20 at 20k reals)")
    print("\n| stage of (a), measured alone | µs per image |\n|---|---:|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds / n * 1e6:,.0f} |")
    total = sum(stages.values())
    print(f"| **sum of the stages** | **{total / n * 1e6:,.0f}** |")
    print(f"| (a) end to end | {t_end_to_end / n * 1e6:,.0f} |\n")
    print(f"(a) / sum of stages = {t_end_to_end / total:.2f}   (below 1: stages overlap; above 1: pipeline overhead)")
    print(
        "two processes at once, against one (2.00: two full cores), measured just before (a): "
        f"{capacity['python']:.2f}× for pure Python, {capacity['matmul']:.2f}× for float32 matrix products; "
        f"so (a) cannot go below about {total / n * 1e6 / max(capacity.values()):,.0f}–"
        f"{total / n * 1e6 / min(capacity.values()):,.0f} µs per image on this machine now"
    )
    print(
        f"`manifpt attribute` command, whole process (start-up, index verification, report): {t_command:.1f} s "
        f"for {n} suspects, peak resident memory {peak_mib:,.0f} MiB (the measuring process above: "
        f"{measured['peak_mib']:,.0f} MiB)"
    )


if __name__ == "__main__":
    main()
