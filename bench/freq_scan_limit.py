"""How fast can an exact freq search be on this machine? Two ceilings, measured in one run (not a
test: figures, not pass/fail).

1. The code scan's integer products alone (manifpt_cli/coded_search.py: every real's 8-bit codes
   against every query's, nothing else of the search), timed in turn with ``faiss.IndexFlatL2``
   on the full 3,072-d vectors. FAISS's time over the products' time is the most a scan of every
   real in 8-bit codes with this kernel can reach against it, whatever the rest of the search costs.
2. What a PCA lower bound could prune before a scan, with nothing lost to rounding or codes: per
   query, the reals whose bound over the first m principal components (of the √w-scaled unique
   half) does not exceed the true nearest distance. Searched in blocks of queries alike in their
   first coordinate over groups of 64 reals alike in theirs (as manifpt's searches share rows),
   the rest of the scan must still cover every group that some query of the block keeps, so the
   scan costs at least m/M + (1 − m/M) × (groups kept) of a full one (M coordinates).

Queries: samples of a zoo GAN, as bench/exact_search.py's.

    python3 bench/freq_scan_limit.py --reals 20000 --queries 512
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

GROUP = 64  # reals whose scan is shared (coded_search.GROUP)
QUERY_BLOCK = 128  # queries sharing it (an idealised layout: the code scan itself takes 256 in row order)
PCA_DIMS = (256, 512, 771, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/real32.npz"))
    parser.add_argument("--reals", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--gan-iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, in turn; the median")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faiss
    import numpy as np
    from exact_search import side_by_side, zoo_suspects

    from manifpt_cli.coded_search import CodedSearch
    from manifpt_cli.manifold import pair_means
    from manifpt_cli.spaces import PixelEmbedder, Space, symmetric_half

    faiss.omp_set_num_threads(1)
    reals = np.load(args.data)["images"][: args.reals]
    embed, half = PixelEmbedder(Space.FREQ), symmetric_half(reals.shape[1], reals.shape[2])
    if len(reals) < len(half.unique):  # the distances of part 2 need a basis of the whole space
        raise SystemExit(f"--reals must be at least {len(half.unique):,} (the coordinates) for a full basis")
    suspects = zoo_suspects(reals, args.queries, args.gan_iters, threads=1)
    full_reals, full_queries = embed(reals), embed(suspects)
    scale = np.sqrt(half.weights)
    rows = (pair_means(half, full_reals)[0] * scale).astype(np.float32)  # the coordinates the scan codes
    queries = pair_means(half, full_queries)[0] * scale
    print(f"{platform.machine()}, {os.cpu_count()} cores, 1 thread; {len(rows):,} reals, {len(queries)} GAN queries")

    # 1. The integer products alone, against FAISS flat on the full vectors.
    sha256 = np.array([b"%064d" % i for i in range(len(rows))], dtype="S64")
    grid = CodedSearch(rows, sha256, threads=1).grid
    left = (grid.coded(queries.astype(np.float64))[0].astype(np.int16) + 128).astype(np.uint8)

    def products_only() -> None:
        for start in range(0, len(left), 256):  # coded_search.QUERY_BLOCK
            for operand in grid.operands:
                grid.products.products(left[start : start + 256], operand)

    flat = faiss.IndexFlatL2(full_reals.shape[1])
    flat.add(full_reals)
    products_only()
    (faiss_seconds, _), (products_seconds, _) = side_by_side(
        [lambda: flat.search(full_queries, 1), products_only], args.repeats
    )
    n = len(queries)
    print(
        f"FAISS flat {n / faiss_seconds:,.0f} q/s; the code scan's products alone {n / products_seconds:,.0f} q/s "
        f"({products_seconds / n * 1e6:.0f} µs per query, {rows.shape[1]:,} coded coordinates): at most "
        f"**{faiss_seconds / products_seconds:.2f}×** FAISS for a full scan in 8-bit codes with this kernel"
    )

    # 2. What an ideal PCA bound would leave to scan.
    mean = rows.mean(axis=0, dtype=np.float64)
    _, _, basis = np.linalg.svd(rows[:: max(1, len(rows) // 5000)] - mean, full_matrices=False)
    projected_rows, projected_queries = (rows - mean) @ basis.T, (queries - mean) @ basis.T
    projected_rows = projected_rows[np.argsort(projected_rows[:, 0], kind="stable")]
    projected_queries = projected_queries[np.argsort(projected_queries[:, 0], kind="stable")]
    dims = rows.shape[1]
    distances = squared_distances(projected_queries, projected_rows)
    nearest = distances.min(axis=1)
    spread = float(np.median(np.median(distances, axis=1) / nearest))
    print(f"(median over the queries of: median squared distance to a real / nearest one = {spread:.2f})\n")
    print("| PCA dims m | reals kept per query | groups of 64 kept per block of 128 | scan cost, of a full one |")
    print("|---:|---:|---:|---:|")
    usable = len(projected_rows) // GROUP * GROUP
    for m in PCA_DIMS:
        kept = squared_distances(projected_queries[:, :m], projected_rows[:, :m]) <= nearest[:, None]
        groups = [
            kept[start : start + QUERY_BLOCK, :usable].any(axis=0).reshape(-1, GROUP).any(axis=1).mean()
            for start in range(0, n, QUERY_BLOCK)
        ]
        cost = m / dims + (1 - m / dims) * float(np.mean(groups))
        print(f"| {m:,} | {kept.mean():.1%} | {np.mean(groups):.1%} | {cost:.2f} |")


def squared_distances(queries, rows):
    """(queries × rows) float64 squared distances, by the expansion (fine for a survey, not exact)."""
    import numpy as np

    return (
        np.einsum("ij,ij->i", queries, queries)[:, None]
        + np.einsum("ij,ij->i", rows, rows)[None]
        - 2 * queries @ rows.T
    )


if __name__ == "__main__":
    main()
