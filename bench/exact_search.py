"""manifpt's exact searches against faiss.IndexFlatL2 on the full vectors and float64 brute force, in one run.

rgb: the PCA-bound search (manifpt_cli/search.py), its first stage over the window of rows whose
first coordinate can be near enough, timed in turn with FAISS in the same run. freq: ``RealIndex.nearest`` on an index that
``build_index`` made from the same reals (the 8-bit code scan of manifpt_cli/coded_search.py over
the unique half of each spectrum, verified in float64 on the full vectors). Queries are samples of a zoo GAN trained for a
few hundred iterations on some of the reals, the same for both spaces, and trained on one thread
so that they are the same queries whatever --threads says.
Threads: FAISS and NumPy's BLAS both get --threads (OMP_NUM_THREADS is set before NumPy loads),
and manifpt's searches run that many blocks of queries at once.

    python3 bench/exact_search.py --reals 20000 --queries 512 --stages 96 256 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/real32.npz"))
    parser.add_argument("--reals", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--checked", type=int, default=64, help="queries also searched by float64 brute force")
    parser.add_argument(
        "--stages", type=int, nargs="+", default=[96, 256], help="float32 stages' dimensions (the last: the basis')"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gan-iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each search, alternating; the median")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(
        args.threads
    )
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import faiss
    import numpy as np

    from manifpt_cli.manifold import RealIndex, build_index
    from manifpt_cli.search import ExactSearch, fit_plan, project_rows, rows_as_float
    from manifpt_cli.settings import RunSettings
    from manifpt_cli.spaces import PixelEmbedder, Space

    faiss.omp_set_num_threads(args.threads)
    reals = np.load(args.data)["images"][: args.reals]
    suspects = zoo_suspects(reals, args.queries, args.gan_iters, args.threads)
    with tempfile.TemporaryDirectory() as work:
        np.save(f"{work}/reals.npy", reals)
        started = time.perf_counter()
        build_index([f"{work}/reals.npy"], f"{work}/freq.h5", [Space.FREQ], settings=RunSettings(threads=args.threads))
        freq_build_seconds = time.perf_counter() - started
        with RealIndex(f"{work}/freq.h5") as freq_index:
            freq_line = freq_row(freq_index, suspects, args.checked, freq_build_seconds, args.repeats)
    sha256 = np.array([b"%064d" % i for i in range(len(reals))], dtype="S64")
    print(f"{len(reals)} reals, {len(suspects)} zoo GAN queries, {args.threads} thread(s), stages {args.stages}")
    rows = np.ascontiguousarray(reals.transpose(0, 3, 1, 2).reshape(len(reals), -1))  # rgb as stored: uint8
    database = rows_as_float(rows)
    queries = PixelEmbedder(Space.RGB)(suspects)
    started = time.perf_counter()
    plan = fit_plan(rows, args.stages[-1])
    projected, norms = project_rows(plan, rows)
    build_seconds = time.perf_counter() - started
    search = ExactSearch(rows, plan, projected, norms, sha256, args.stages)
    flat = faiss.IndexFlatL2(database.shape[1])
    flat.add(database)
    search.nearest(queries[:1])  # ONNX Runtime's first run
    timed = side_by_side(
        [lambda: flat.search(queries, 1), lambda: search.nearest(queries)], args.repeats, search.seconds
    )
    (faiss_seconds, (_, faiss_ids)), (exact_seconds, found) = timed
    n = len(queries)
    identical = matches_brute_force(database, queries[: args.checked], found)
    assert identical, "rgb: the exact search differs from float64 brute force"
    print(f"tables at build: {build_seconds:.1f} s; per stage, µs per query:")
    for step, seconds in search.seconds.items():
        print(f"  {step}: {seconds / (n * args.repeats) * 1e6:,.0f}")
    print(
        "| space | FAISS flat q/s | exact q/s | ratio | rows verified/query | identical to float64 | bytes/image in RAM |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    print(
        f"| rgb | {n / faiss_seconds:,.0f} | {n / exact_seconds:,.0f} | {faiss_seconds / exact_seconds:.2f}× | "
        f"{found.checked.mean():.0f} | {identical} ({min(args.checked, n)} queries; FAISS agrees on "
        f"{np.mean(faiss_ids[:, 0] == found.ids):.0%}) | {search.nbytes / len(rows):,.0f} (FAISS flat: "
        f"{4 * database.shape[1]:,}) |"
    )
    print(freq_line)


def zoo_suspects(reals, n: int, iters: int, threads: int):
    """(n, S, S, 3) uint8 samples of a zoo GAN trained for ``iters`` iterations on 1,000 of
    ``reals``, on one thread (so the same samples whatever ``threads`` says), decoded from its PNGs."""
    import numpy as np
    import torch
    from PIL import Image

    from manifpt_cli.research.zoo import make_design, sample_generator, train_generator

    with tempfile.TemporaryDirectory() as work:
        os.makedirs(f"{work}/real")
        for i, image in enumerate(reals[:1000]):
            Image.fromarray(image).save(f"{work}/real/{i}.png")
        torch.set_num_threads(1)
        train_generator([f"{work}/real"], f"{work}/gan", make_design("gan"), iters=iters, batch_size=32)
        paths = sample_generator(f"{work}/gan", n, f"{work}/samples", seed=0)
        torch.set_num_threads(threads)
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def side_by_side(searches, repeats: int, steps: dict | None = None) -> list:
    """(median seconds, last result) of each search, timed ``repeats`` times in turn (one after the
    other, so both see the same machine); ``steps`` (per-stage seconds) restarts with the timed runs."""
    import numpy as np

    if steps is not None:
        steps.clear()
    seconds, results = [[] for _ in searches], [None] * len(searches)
    for _ in range(repeats):
        for i, search in enumerate(searches):
            started = time.perf_counter()
            results[i] = search()
            seconds[i].append(time.perf_counter() - started)
    return [(float(np.median(taken)), result) for taken, result in zip(seconds, results)]


def matches_brute_force(database, queries, found) -> bool:
    """Whether ``found``'s first rows are float64 brute force's neighbours and distances (ties: lowest row)."""
    import numpy as np

    brute_ids, brute_distances = [], []
    for query in queries.astype(np.float64):
        distances = np.square(database - query).sum(axis=1)
        brute_ids.append(int(distances.argmin()))
        brute_distances.append(distances.min())
    return np.array_equal(found.ids[: len(queries)], brute_ids) and np.array_equal(
        found.distances[: len(queries)], brute_distances
    )


def freq_row(index, suspects, checked_queries: int, build_seconds: float, repeats: int) -> str:
    """The freq line of the table: FAISS flat on the full 3,072-d vectors vs ``RealIndex.nearest``."""
    import faiss
    import h5py
    import numpy as np

    from manifpt_cli.spaces import PixelEmbedder, Space

    database = index.all_embeddings(Space.FREQ)
    queries = PixelEmbedder(Space.FREQ)(suspects)
    flat = faiss.IndexFlatL2(database.shape[1])
    flat.add(database)
    index.nearest(Space.FREQ, queries[:1])  # codes the stored rows
    (faiss_seconds, (_, faiss_ids)), (manifpt_seconds, found) = side_by_side(
        [lambda: flat.search(queries, 1), lambda: index.nearest(Space.FREQ, queries)], repeats
    )
    identical = matches_brute_force(database, queries[:checked_queries], found)
    assert identical, "freq: the search differs from float64 brute force"
    n = len(queries)
    with h5py.File(index.path) as handle:
        stored = handle["spaces/freq"]
        searched_dims = stored["embeddings"].shape[1]
        disk = sum(dataset.id.get_storage_size() for dataset in stored.values()) / index.n_images
    codes = index.coded_search(Space.FREQ)
    ram = codes.nbytes / index.n_images + 4 * searched_dims  # codes etc., and the stored float32 rows
    return (
        f"| freq | {n / faiss_seconds:,.0f} | {n / manifpt_seconds:,.0f} | {faiss_seconds / manifpt_seconds:.2f}× | "
        f"all, as codes of {searched_dims:,} dims of {database.shape[1]:,} | {identical} ({checked_queries} "
        f"queries; FAISS agrees on {np.mean(faiss_ids[:, 0] == found.ids):.0%}) | {ram:,.0f} (FAISS flat: "
        f"{4 * database.shape[1]:,}); on disk {disk:,.0f} (index built in {build_seconds:.1f} s) |"
    )


if __name__ == "__main__":
    main()
