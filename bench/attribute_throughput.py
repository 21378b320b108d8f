"""Attribution throughput, measured side by side in one run (not a test: figures, not pass/fail).

(a) `manifpt attribute` end to end: decode → φ → FAISS → artifact → ONNX Runtime, via the library.
(b) the exported ONNX attributor alone, on the same suspects' artifacts, same batch size.
(c) a PyTorch-eager pipeline with a brute-force nearest-neighbour scan, as the authors' reference
    code works: same decoding, one exhaustive scan of the real set per suspect, eager model.
(d) FAISS flat search against the same brute-force scan, for the same queries.

Real images: ../shared/data/real32.npz when present (20k real 32×32 crops), otherwise crops of the
photos bundled with scikit-image. Usage:

    python bench/attribute_throughput.py [--reals 20000] [--suspects 2000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import platform
import shutil
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
    args = parser.parse_args()

    import torch

    from manifpt_cli.artifacts import extract_artifacts
    from manifpt_cli.attribute import Attribution, OnnxAttributor
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
    threads = settings.compute_threads
    build_settings = RunSettings(batch_size=512)
    t_index, _ = timed(lambda: build_index([work / "real"], index, [space], size=32, settings=build_settings))
    extract_artifacts(
        index,
        [("plain", str(work / "suspects" / "plain")), ("noisy", str(work / "suspects" / "noisy"))],
        work / "art.h5",
        spaces=[space],
    )
    train_attributor(work / "art.h5", space, work / "m.pt", config=TrainConfig(arch=args.arch, epochs=1))
    export_onnx(work / "m.pt", work / "m.onnx")
    n = len(suspects)

    # (a) end to end
    with Attribution(work / "m.onnx", index, settings=settings) as run:
        warm_up = sorted((work / "suspects" / "plain").iterdir())[: args.batch_size]
        sum(1 for _ in run.rows(warm_up))  # FAISS index load, ORT's first run
        t_end_to_end, counted = timed(lambda: sum(1 for _ in run.rows([work / "suspects"])))
    assert counted == n

    # (b) ONNX attributor alone, same artifacts
    with RealIndex(index) as real_index:
        decoded = [item for batch in decode_folder([work / "suspects"], 32, settings) for item in batch]
        pixels = np.stack([item.pixels for item in decoded])
        queries = PixelEmbedder(space)(pixels)
        found = real_index.nearest(space, queries)
        artifacts = (queries - real_index.embeddings(space, found.ids)).reshape(n, 3, 32, 32)
        database = real_index.all_embeddings(space)
        t_faiss, _ = timed(lambda: real_index.nearest(space, queries))
    attributor = OnnxAttributor(work / "m.onnx", threads)
    batches = [artifacts[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    t_onnx, _ = timed(lambda: [attributor.predict(b) for b in batches])

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
                model(torch.from_numpy((q - database[ids]).reshape(len(q), 3, 32, 32))).softmax(1)
                done += len(batch)
        return done

    t_reference, _ = timed(reference_pipeline)
    t_brute, brute_ids = timed(lambda: brute_force_ids(queries[:n_reference]))
    assert (brute_ids == found.ids[:n_reference]).mean() > 0.99, "FAISS and the brute-force scan must agree"

    rate = lambda seconds, count=n: count / seconds  # noqa: E731
    print(
        f"\nmanifpt attribution throughput — {platform.processor() or platform.machine()}, {threads} threads, "
        f"{args.reals} reals from {origin}, {n} suspects, space {space.value}, arch {args.arch}, batch {args.batch_size}"
    )
    print(f"index build: {args.reals} reals in {t_index:.1f} s\n")
    print("| measurement | images/s |\n|---|---:|")
    print(f"| (a) attribute end to end | {rate(t_end_to_end):,.0f} |")
    print(f"| (b) ONNX attributor alone | {rate(t_onnx):,.0f} |")
    print(
        f"| (c) PyTorch eager + brute-force NN scan ({n_reference} suspects) | {rate(t_reference, n_reference):,.1f} |"
    )
    print(f"| FAISS flat search alone | {rate(t_faiss):,.0f} |")
    print(f"| brute-force NN scan alone ({n_reference} suspects) | {rate(t_brute, n_reference):,.1f} |\n")
    print(f"(a)/(b) = {rate(t_end_to_end) / rate(t_onnx):.2f}   (target ≥ 0.8)")
    print(f"(a)/(c) = {rate(t_end_to_end) / rate(t_reference, n_reference):.1f}×   (target ≥ 5)")
    print(f"FAISS / brute force = {rate(t_faiss) / rate(t_brute, n_reference):.1f}×   (target ≥ 20 at 20k reals)")


if __name__ == "__main__":
    main()
