"""The exact rgb search at large image sizes: a basis fitted on full-size rows against one fitted
on block-pooled rows, side by side in one run (not a test: figures, not pass/fail).

At 256 px a float64 sample of 4,096 full-size rows would take 6.4 GB, so the sample the basis is
fitted on shrinks to what ``PLAN_BYTES`` holds (341 rows), and a basis of 256 rows fitted on 341
images bounds new images poorly. ``fit_plan(..., image_size=S)`` pools the rows over f × f blocks
first and keeps all 4,096. This script builds both searches over the same rows in memory
(``ExactSearch``, as an index opens them), times each over the same suspects (the median of
``--repeats`` runs, in turn), and checks both against float64 brute force on some of them.
With ``--rows-file DIR`` it also times the pooled search with its rows read from an HDF5 file in
DIR laid out as an index stores them (its chunks; :class:`FileRows`, as ``attribute``
reads a space over 1 GiB), read through once first so that the page cache holds it.

Data: a uint8 (N, S, S, 3) array of real crops, e.g. ``../shared/data/make_real.py --n 31000
--size 256 --npy real256.npy``; its first ``--reals`` rows are the real set, and the suspects
are held-out rows, a third each as they are, blurred and JPEG q30 (as ``bench/scale.py``'s).

    python3 bench/large_image_search.py --images real256.npy --reals 30000 --suspects 150
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True, help="uint8 (N, S, S, 3) .npy of real crops")
    parser.add_argument("--reals", type=int, default=30000)
    parser.add_argument("--suspects", type=int, default=150)
    parser.add_argument("--checked", type=int, default=6, help="suspects also searched by float64 brute force")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows-file", type=Path, help="a folder for an HDF5 copy of the rows (as large as they are)")
    args = parser.parse_args()
    if args.rows_file is not None and (args.rows_file / "rows.h5").exists():
        raise SystemExit(f"{args.rows_file / 'rows.h5'} exists: give --rows-file a folder without one")
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    import numpy as np
    from exact_search import side_by_side
    from scale import degrade

    from manifpt_cli.file_rows import FileRows
    from manifpt_cli.search import ExactSearch, fit_plan, pooling_factor, project_rows
    from manifpt_cli.spaces import PixelEmbedder, Space

    images = np.load(args.images, mmap_mode="r")
    size = images.shape[1]
    held_out = np.asarray(images[args.reals : args.reals + args.suspects])
    if len(held_out) < args.suspects:
        raise SystemExit(f"{args.images} has {len(images)} rows: too few for {args.reals} reals and the suspects")
    third = len(held_out) // 3
    kinds = ["real"] * (len(held_out) - 2 * third) + ["blur"] * third + ["jpeg"] * third
    suspects = np.stack([x if kind == "real" else degrade(kind, x) for x, kind in zip(held_out, kinds)])
    rows = np.empty((args.reals, 3 * size * size), dtype=np.uint8)  # rgb as an index stores it: (3, S, S)
    for start in range(0, args.reals, 1000):
        block = np.asarray(images[start : min(start + 1000, args.reals)])
        rows[start : start + len(block)] = block.transpose(0, 3, 1, 2).reshape(len(block), -1)
    queries = PixelEmbedder(Space.RGB)(suspects)
    sha256 = np.array([b"%064d" % i for i in range(len(rows))], dtype="S64")
    print(
        f"{args.reals:,} reals of {size}×{size}, {len(queries)} suspects (real, blur, JPEG q30), {args.threads} thread(s)"
    )
    print(f"{platform.machine()}, {os.cpu_count()} CPUs; {platform.processor() or platform.platform()}")

    searches, built = {}, {}
    for name, image_size in (("full-size sample", None), (f"pooled {pooling_factor(size, rows.shape[1])}×", size)):
        started = time.perf_counter()
        plan = fit_plan(rows, image_size=image_size)
        fitted = time.perf_counter() - started
        projected, norms = project_rows(plan, rows)
        built[name] = (fitted, time.perf_counter() - started - fitted)
        searches[name] = ExactSearch(rows, plan, projected, norms, sha256, threads=args.threads)
        searches[name].nearest(queries[:1])  # ONNX Runtime's first run
    if args.rows_file is not None:  # the pooled basis (the loop's last) over the rows in a file
        in_file, pooled = FileRows(*rows_in_file(args.rows_file, rows)), f"{name}, rows in file"
        searches[pooled] = ExactSearch(in_file, plan, projected, norms, sha256, threads=args.threads)
        built[pooled] = built[name]
        searches[pooled].nearest(queries[:1])
    for search in searches.values():
        search.seconds.clear()
    timed = side_by_side([lambda s=s: s.nearest(queries) for s in searches.values()], args.repeats)
    first = timed[0][1]
    for _, found in timed[1:]:
        assert np.array_equal(found.ids, first.ids) and np.array_equal(found.distances, first.distances)
    brute = [brute_force(rows, query) for query in queries[: args.checked].astype(np.float64)]
    assert [i for i, _ in brute] == list(first.ids[: args.checked]), "differs from float64 brute force"
    assert [d for _, d in brute] == list(first.distances[: args.checked]), "differs from float64 brute force"

    print(
        "| basis fitted on | fit s | tables s | search, suspects/s | ms/suspect | rows checked/suspect (median, mean) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for (name, (fit_s, tables_s)), (seconds, found) in zip(built.items(), timed):
        print(
            f"| {name} | {fit_s:.1f} | {tables_s:.1f} | {len(queries) / seconds:.1f} | {1e3 * seconds / len(queries):.1f} | "
            f"{np.median(found.checked):.0f}, {found.checked.mean():.0f} of {len(rows):,} |"
        )
    for name, search in searches.items():
        steps = ", ".join(f"{step} {1e3 * t / (args.repeats * len(queries)):.2f}" for step, t in search.seconds.items())
        print(f"{name}, ms per suspect: {steps}")
    print(f"all: the same neighbours and distances; float64 brute force agrees on the first {args.checked}")


def rows_in_file(folder: Path, rows):
    """(path, dataset) of an HDF5 copy of ``rows`` in the chunks an index stores a space's
    embeddings in, after one read through it (so the page cache, if it can, holds it)."""
    import h5py

    from manifpt_cli.formats import _append_rows, _create_growing

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rows.h5"
    with h5py.File(path, "w-") as file:  # never over an existing file
        dataset = _create_growing(file, "rows", rows.shape[1:], rows.dtype)
        for start in range(0, len(rows), 1000):
            _append_rows(dataset, rows[start : start + 1000])
    with open(path, "rb") as file:
        while file.read(2**24):
            pass
    return path, h5py.File(path, "r")["rows"]


def brute_force(rows, query) -> tuple[int, float]:
    """Float64 flat search of one query over uint8 rows, a chunk at a time; ties: the lowest row."""
    import numpy as np

    from manifpt_cli.search import rows_as_float

    distances = np.concatenate(
        [
            np.square(np.subtract(rows_as_float(rows[start : start + 512]), query, dtype=np.float64)).sum(axis=1)
            for start in range(0, len(rows), 512)
        ]
    )
    return int(distances.argmin()), float(distances.min())


if __name__ == "__main__":
    main()
