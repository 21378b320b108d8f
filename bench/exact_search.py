"""Exact search (manifpt_cli/search.py) against faiss.IndexFlatL2 and float64 brute force, in one run.

Queries are samples of a zoo GAN trained for a few hundred iterations on some of the reals.
Threads: FAISS and NumPy's BLAS both get --threads (OMP_NUM_THREADS is set before NumPy loads).

    python3 bench/exact_search.py --reals 20000 --queries 300 --dims 256 --threads 1
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
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gan-iters", type=int, default=200)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(
        args.threads
    )
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import faiss
    import numpy as np
    from PIL import Image

    from manifpt_cli.research.zoo import make_design, sample_generator, train_generator
    from manifpt_cli.search import ExactSearch, fit_plan
    from manifpt_cli.spaces import PixelEmbedder, Space

    faiss.omp_set_num_threads(args.threads)
    reals = np.load(args.data)["images"][: args.reals]
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(f"{work}/real")
        for i, image in enumerate(reals[:1000]):
            Image.fromarray(image).save(f"{work}/real/{i}.png")
        train_generator([f"{work}/real"], f"{work}/gan", make_design("gan"), iters=args.gan_iters, batch_size=32)
        paths = sample_generator(f"{work}/gan", args.queries, f"{work}/samples", seed=0)
        suspects = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    sha256 = np.array([b"%064d" % i for i in range(len(reals))], dtype="S64")
    print(f"{len(reals)} reals, {len(suspects)} zoo GAN queries, {args.threads} thread(s), PCA dims {args.dims}")
    print(
        "| space | FAISS flat q/s | exact q/s | ratio | checked/query | float64 brute force q/s | identical | bytes/image |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for space in (Space.RGB, Space.FREQ):
        embed = PixelEmbedder(space)
        database = np.concatenate([embed(reals[i : i + 2000]) for i in range(0, len(reals), 2000)])
        queries = embed(suspects)
        plan = fit_plan(database, args.dims)
        if space is Space.RGB:
            rows = np.ascontiguousarray(reals.transpose(0, 3, 1, 2).reshape(len(reals), -1))
        else:
            rows = database
        search = ExactSearch(rows, plan, plan.augment(database).astype(np.float32), sha256)
        flat = faiss.IndexFlatL2(database.shape[1])
        flat.add(database)
        started = time.perf_counter()
        _, faiss_ids = flat.search(queries, 1)
        faiss_seconds = time.perf_counter() - started
        started = time.perf_counter()
        found = search.nearest(queries)
        exact_seconds = time.perf_counter() - started
        started = time.perf_counter()
        brute_ids, brute_distances = [], []
        for query in queries.astype(np.float64):
            distances = np.square(database - query).sum(axis=1)
            brute_ids.append(int(distances.argmin()))
            brute_distances.append(distances.min())
        brute_seconds = time.perf_counter() - started
        identical = np.array_equal(found.ids, brute_ids) and np.array_equal(found.distances, brute_distances)
        assert identical, f"{space.value}: the exact search differs from brute force"
        searched_bytes = rows.nbytes + search.operand.nbytes + search.operand_squared.nbytes
        n = len(queries)
        print(
            f"| {space.value} (basis {len(plan.basis)}) | {n / faiss_seconds:,.0f} | {n / exact_seconds:,.0f} | "
            f"{faiss_seconds / exact_seconds:.2f}× | {found.checked.mean():.0f} | {n / brute_seconds:,.1f} | "
            f"{identical} (FAISS agrees on {np.mean(faiss_ids[:, 0] == found.ids):.0%}) | "
            f"{searched_bytes / len(rows):,.0f} |"
        )


if __name__ == "__main__":
    main()
