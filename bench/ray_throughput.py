"""Local engine against Ray with 1 and 2 workers, on the same suspects, in one run (figures, not pass/fail).

For each engine: `attribute` end to end (images/s, after a warm-up run that starts Ray and loads
the model and index) and peak resident memory of the driver and of each Ray worker. Also
`index build` with each engine. Reports are checked to be byte-identical across engines.

Real images: ../shared/data/real32.npz when present, otherwise crops of the bundled photos.

    python bench/ray_throughput.py [--reals 5000] [--suspects 2000]
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from attribute_throughput import bundled_crops, real_images, write_pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reals", type=int, default=5000)
    parser.add_argument("--suspects", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from manifpt_cli import ReportFormat, ReportTarget, RunSettings, Space, TrainConfig, run_attribution
    from manifpt_cli.artifacts import extract_artifacts
    from manifpt_cli.engines import LocalEngine, RayEngine
    from manifpt_cli.export import export_onnx
    from manifpt_cli.manifold import build_index
    from manifpt_cli.train import train_attributor

    work = Path(tempfile.mkdtemp(prefix="manifpt-ray-bench-"))
    reals, origin = real_images(args.reals, seed=0)
    suspects = bundled_crops(args.suspects, seed=1)
    write_pngs(work / "real", reals, "real")
    write_pngs(work / "suspects" / "plain", suspects[: len(suspects) // 2], "plain")
    noisy = np.clip(suspects[len(suspects) // 2 :].astype(int) + 8, 0, 255).astype(np.uint8)
    write_pngs(work / "suspects" / "noisy", noisy, "noisy")
    settings = RunSettings(batch_size=args.batch_size)
    settings.apply()

    index = work / "real.h5"
    build_times = {}
    for name, engine in (("local", LocalEngine()), ("ray-2", RayEngine(workers=2))):
        with engine:
            started = time.perf_counter()
            build_index([work / "real"], work / f"{name}.h5", [Space.RGB], settings=settings, engine=engine)
            build_times[name] = time.perf_counter() - started
    (work / "local.h5").rename(index)
    sources = [("plain", str(work / "suspects" / "plain")), ("noisy", str(work / "suspects" / "noisy"))]
    extract_artifacts(index, sources, work / "art.h5", spaces=[Space.RGB])
    train_attributor(work / "art.h5", Space.RGB, work / "m.pt", config=TrainConfig(epochs=1))
    export_onnx(work / "m.pt", work / "m.onnx")

    rows = []
    reports = {}
    for name, make in (
        ("local", LocalEngine),
        ("ray-1", lambda: RayEngine(workers=1)),
        ("ray-2", lambda: RayEngine(workers=2)),
    ):
        with make() as engine:
            run_attribution(work / "m.onnx", index, [work / "suspects" / "plain"], settings=settings, engine=engine)
            started = time.perf_counter()
            out = work / f"{name}.csv"
            run_attribution(
                work / "m.onnx",
                index,
                [work / "suspects"],
                settings=settings,
                engine=engine,
                reports=[ReportTarget(ReportFormat.CSV, out)],
            )
            seconds = time.perf_counter() - started
            workers = getattr(engine, "peak_memory_mib", [])
        reports[name] = out.read_bytes()
        rows.append((name, len(suspects) / seconds, workers))
    identical = len(set(reports.values())) == 1

    print(
        f"\nmanifpt engines — {platform.machine()}, {RunSettings().compute_threads} cores, {args.reals} reals from "
        f"{origin}, {len(suspects)} suspects, rgb, batch {args.batch_size}"
    )
    print(f"index build: local {build_times['local']:.1f} s, ray with 2 workers {build_times['ray-2']:.1f} s")
    print("| engine | images/s | peak RSS per Ray worker (MiB) |\n|---|---:|---|")
    for name, rate, workers in rows:
        shown = ", ".join(f"{w:.0f}" for w in workers) or "— (all in the driver)"
        print(f"| {name} | {rate:,.0f} | {shown} |")
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndriver peak RSS over the whole run (local engine, training and export included): {driver:.0f} MiB")
    print(f"\nreports byte-identical across engines: {identical}")


if __name__ == "__main__":
    main()
