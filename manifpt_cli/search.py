"""Exact nearest real image (k = 1, squared L2) among uint8 pixel rows, without scanning every row in full.

A PCA basis Q (k orthonormal rows, fitted at build time on a seeded sample) and the mean μ give,
for x = Q(q − μ), y = Q(r − μ) and the residual norms ρ = ‖(I − QᵀQ)(· − μ)‖, the lower bound

    LB(q, r) = ‖x − y‖² + (ρ_q − ρ_r)² ≤ ‖q − r‖²

(Pythagoras, then the triangle inequality on the residuals). It is the squared distance between the
augmented vectors [x, ρ_q] and [y, ρ_r], so one matrix product per block of queries gives it for
every real image. Any leading j < k of the basis rows give a looser bound of the same form, with
ρ grown by the dropped coordinates. Pixels are integers, so the distance itself is one too:
‖q − r‖² = D / 255² with D = ‖q‖² + ‖r‖² − 2 q·r, which :class:`PixelProducts` computes exactly
(8-bit integer products). Queries are searched in blocks of alike ones (ordered by brightness,
the first principal component of photographs: alike queries share candidate rows), and each block
in stages:

The rows are held in the order of their first coordinate, and ‖x − y‖ ≥ |x₁ − y₁|: the rows that
can be within a distance r of a block's queries are one range of positions, those whose first
coordinate lies within r of some query's. Each block, in stages:

1. the bound in the first ``STAGE_DIMS[0]`` coordinates (float32, :class:`FloatProducts`) for the
   rows within ``WINDOW_ROWS`` positions of the block's first coordinates, and an upper bound per
   query: its smallest exact distance to a pool of rows of low bound, each query's lowest in each
   of ``UPPER_PARTS`` slices of them, shared by the block (nearby queries often share
   neighbours); then the same bound for the rest of the window that upper bound leaves (on
   photographs and GAN samples, about 60 % of the rows: the first coordinate, brightness,
   spreads about as far as a nearest neighbour lies);
2. the bound in all k coordinates for the rows that stage 1 left (their union over the block), and
   a tighter upper bound from the same kind of pool (``STAGE_DIMS`` may name more stages: each
   bounds the rows that the one before left);
3. exact integer distances to the rows that survive (one integer product over their union);
4. the float64 sum brute force computes, for the rows within its rounding of the smallest.

A row is dropped only when its bound exceeds a query's upper bound (strictly, so every row tied at
the minimum survives and the lowest row wins). Rounding never drops the true neighbour: every
float32 bound carries a proven margin (:func:`_lower_bound_margin`), the window the rounding of
both first coordinates (:func:`_first_coordinate_error`), and the step from integer distances to
brute force's float64 ones another (:meth:`ExactSearch._slack`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .pixel_products import FloatProducts, PixelProducts, pixel_squares

UNIT_ROUNDOFF = 2.0**-24  # float32: fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u
PLAN_SAMPLE = 4096  # real images the basis is fitted on (seeded), fewer where they would pass PLAN_BYTES
PLAN_BYTES = 512 * 2**20  # memory for the float64 sample the basis is fitted on
STAGE_DIMS = (96, 256)  # coordinates of the float32 bounds, the last that of the basis; bench/exact_search.py
QUERY_BLOCK = 128  # queries searched together (their candidate rows are shared in the products)
WINDOW_ROWS = 2048  # rows either side of a block's first coordinates whose first bound gives its upper bound
UPPER_PARTS = 8  # slices of a stage's rows; a query's lowest bound in each joins the upper bound's pool
BLOCK_BYTES = 64 * 2**20  # at most this much memory for one block's (queries × rows) bound matrix
PROJECTION_DIGITS = 3  # 8-bit digits of the basis: what they leave out is below 6.2e-8 of its largest entry
NO_ROW = np.iinfo(np.int64).max  # the distance to a query's own rows (leave-one-out), and to none
FLOAT64_SLACK = 1e-12  # relative, at least: brute force's float64 rounding (≤ 3,072·2⁻⁵³ ≈ 3.4e-13 at 32 px)
PARALLEL_BYTES = 2**30  # memory for the blocks searched at once, each up to about 4 × BLOCK_BYTES: 4 blocks


def map_blocks(search: Callable, blocks: list, threads: int) -> list:
    """``search(block)`` for every block, in up to ``threads`` threads (NumPy and ONNX Runtime
    release the GIL), results in order.

    A search's products run on one thread each, and its blocks in parallel. Splitting each product
    over ONNX Runtime's threads instead gained nothing on the project's 2-core machine (they are
    small, with NumPy work between them), and its spinning threads halved the rgb search's speed;
    blocks on two threads gave 1.2× (freq) to 1.7× (rgb) (bench/exact_search.py --threads 2).
    """
    workers = min(threads, len(blocks), max(1, PARALLEL_BYTES // (4 * BLOCK_BYTES)))
    if workers <= 1:
        return [search(block) for block in blocks]
    with ThreadPoolExecutor(workers, thread_name_prefix="manifpt-search") as pool:
        return list(pool.map(search, blocks))


def gamma(n: int, unit_roundoff: float = UNIT_ROUNDOFF) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a sum of n products (any order); float32
    by default."""
    return n * unit_roundoff / (1 - n * unit_roundoff)


def float64_slack(terms: int) -> float:
    """κ with |E − ‖q − r‖²| ≤ κ‖q − r‖² for brute force's float64 distance E, a sum of ``terms``
    squared differences of float32 values (each difference exact in float64, each square and
    addition rounded once): γ_{terms + 1} in float64, and never below ``FLOAT64_SLACK``. It
    passes 1e-12 from about 11,000 terms (freq at 61 px)."""
    return max(FLOAT64_SLACK, 1.01 * gamma(terms + 1, 2.0**-53))


def check_digests(own_sha256: Sequence[str] | None, n: int) -> None:
    """One file digest per query, or none: a short list would silently lose leave-one-out."""
    if own_sha256 is not None and len(own_sha256) != n:
        raise ValueError(f"{len(own_sha256)} file digests for {n} queries: leave-one-out needs one per query")


def faiss_distance_margin(dim: int) -> float:
    """Factor c with |F − ‖x − y‖²| ≤ c·(‖x‖² + ‖y‖²) for FAISS's float32 flat L2 distance F between
    d-dimensional vectors, each rounded to float32 once from exact values (freq's √w·x).

    FAISS computes ‖x‖² + ‖y‖² − 2⟨x, y⟩ (BLAS, for batches of queries) or Σ(x − y)² in float32.
    A float32 sum of d products errs by at most γ_d times the sum of their magnitudes, in any order
    and with or without FMA: γ_d(‖x‖² + ‖y‖²) for the two norms, γ_d·2|⟨x, y⟩| ≤ γ_d(‖x‖² + ‖y‖²) for
    the product. The two additions add at most 4u(‖x‖² + ‖y‖²), rounding √w·x to float32 at most
    about 4u(‖x‖² + ‖y‖²) (‖e‖ ≤ u(‖x‖ + ‖y‖) moves ‖x − y‖² by 2‖x − y‖‖e‖ + ‖e‖²). So 2γ_d + 8u
    suffices; 3γ_{d+4} ≥ that for d ≥ 8.
    """
    return 3 * gamma(dim + 4)


def _lower_bound_margin(dims: int) -> float:
    """Factor c such that LB_float32 − c·(‖x‖ + max‖y‖)² ≤ LB_exact ≤ ‖q − r‖².

    The float32 product G = ‖y‖² − 2 x·y (− the rows' error terms, each below ‖y‖² and 2‖x‖‖y‖
    in size) over m = dims + 3 coordinates errs by at most γ_m(4‖x‖‖y‖ + 2‖y‖²), and rounding
    the ‖y‖² column to float32 adds u‖y‖²; rounding x and y to float32 moves ‖x − y‖ by at most u(‖x‖ + ‖y‖), so ‖x − y‖² by at
    most 2u(‖x‖ + ‖y‖)². All terms are below (2γ_m + 3u)(‖x‖ + ‖y‖)²; 5u more and 1e-9 on top
    cover the float64 arithmetic with room to spare. (Errors in the coordinates themselves, and
    what they do to the residual norms, are bounded separately: :func:`_augmented_error`.)
    """
    return 2 * gamma(dims + 3) + 8 * UNIT_ROUNDOFF + 1e-9


def _largest(dtype: np.dtype):
    """The value a bound takes at a query's own rows: above every threshold."""
    return np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def _round_up32(values: np.ndarray) -> np.ndarray:
    """float64 thresholds as the float32 at or above each (so no comparison loses a row)."""
    rounded = values.astype(np.float32)
    return np.where(rounded < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _side(d: int) -> int | None:
    """S for rows of (3, S, S) images, None for another length."""
    side = int(round((d / 3) ** 0.5))
    return side if 3 * side**2 == d else None


def block_sums(values: np.ndarray, factor: int) -> np.ndarray:
    """(n, d / f²) sums of each channel's f × f blocks of (n, d) rows of (3, S, S) images, added a
    line and then a column of the block at a time (a strided reduction is ten times slower);
    uint8 pixels are summed in integers, exactly."""
    side = _side(values.shape[1])
    accumulator = values.dtype
    if values.dtype == np.uint8:
        accumulator = np.uint16 if factor**2 * 255 < 2**16 else np.uint32
    lines = values.reshape(-1, factor, side)  # each block row's f lines of full width
    summed = lines[:, 0].astype(accumulator)
    for i in range(1, factor):
        summed += lines[:, i]
    columns = summed.reshape(-1, side // factor, factor)
    sums = columns[..., 0].copy()
    for i in range(1, factor):
        sums += columns[..., i]
    return sums.reshape(len(values), -1)


def one_per_block(values: np.ndarray, factor: int) -> np.ndarray:
    """(k, d / f²): each f × f block's first value, of (k, d) rows constant on blocks."""
    if factor == 1:
        return values
    side = _side(values.shape[1]) // factor
    blocks = values.reshape(len(values), 3, side, factor, side, factor)[:, :, :, 0, :, 0]
    return np.ascontiguousarray(blocks).reshape(len(values), -1)


@dataclass
class SearchPlan:
    """The projection a space is searched with: ``basis`` (k, d) float64 orthonormal rows and
    ``mean`` (d,) float64."""

    mean: np.ndarray
    basis: np.ndarray

    @cached_property
    def pooling(self) -> int:
        """The largest f (a power of 2) at which every basis row, as a (3, S, S) image, is constant
        on f × f pixel blocks, as those fitted on pooled rows are (:func:`pooling_factor`): then
        Q·v = Q'·(block sums of v), Q' each block's value of Q, for f² times fewer products."""
        side, factor = _side(self.basis.shape[1]), 1
        while side and side % (2 * factor) == 0 and len(self.basis):
            size = side // (2 * factor)
            blocks = self.basis.reshape(len(self.basis), 3, size, 2 * factor, size, 2 * factor)
            if not (blocks == blocks[:, :, :, :1, :, :1]).all():
                break
            factor *= 2
        return factor

    @cached_property
    def pooled_basis(self) -> np.ndarray:
        """Q': each f × f block's value of every basis row (the basis itself where f = 1)."""
        return one_per_block(self.basis, self.pooling)

    def project(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q(v − μ), ‖v − μ‖²) in float64 for (n, d) float vectors."""
        centred = np.subtract(vectors, self.mean, dtype=np.float64)  # one pass, no float64 copy first
        squared = np.einsum("ij,ij->i", centred, centred)
        if self.pooling == 1:
            return centred @ self.basis.T, squared
        return block_sums(centred, self.pooling) @ self.pooled_basis.T, squared


def fit_plan(
    embeddings: np.ndarray, dims: int = STAGE_DIMS[-1], seed: int = 0, image_size: int | None = None
) -> SearchPlan:
    """PCA basis of ``dims`` rows on a seeded sample of (n, d) embeddings (uint8 rows: pixels).

    With ``image_size`` (rgb rows, (3, size, size) flattened), large images are fitted on a
    block-pooled copy of the sample (:func:`pooling_factor`), so the sample keeps its
    ``PLAN_SAMPLE`` rows within ``PLAN_BYTES``; the basis comes back lifted to full size.

    Fitted with one BLAS thread: LAPACK's last bits change with the thread count, and the basis
    is part of the index, whose hash must not depend on ``--threads``.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_plan(embeddings, dims, seed, image_size)


def pooling_factor(image_size: int | None, d: int) -> int:
    """The smallest factor f (1, 2, 4, …, dividing ``image_size``) at which ``PLAN_SAMPLE`` rows
    pooled over f × f pixel blocks fit ``PLAN_BYTES`` in float64, or the largest that divides it
    (the sample then shrinks to fit); 1 where the layout is unknown.

    Pooling is an orthogonal projection (block sums / f), so the basis fitted on pooled rows
    and lifted back is orthonormal, as the bound needs. It loses only what varies inside a
    block, which the leading components of photographs do not: on 3,500 crops at 256 px, a
    basis from all of them pooled 4 × 4 kept 0.88 of the variance in 256 dimensions and left
    half the rows per query of one fitted on the 341 full-size rows that fit (README,
    *Scale on one machine*).
    """
    factor = 1
    if _side(d) is None or _side(d) != image_size:
        return factor
    while PLAN_SAMPLE * 8 * d // factor**2 > PLAN_BYTES:
        if image_size % (2 * factor):
            break
        factor *= 2
    return factor


def _fit_plan(embeddings: np.ndarray, dims: int, seed: int, image_size: int | None) -> SearchPlan:
    n, d = embeddings.shape
    rng = np.random.default_rng(seed)
    factor = pooling_factor(image_size, d) if embeddings.dtype == np.uint8 else 1
    fitted = d // factor**2
    size = min(n, max(dims + 17, min(PLAN_SAMPLE, PLAN_BYTES // (8 * fitted))))  # large images: fewer rows
    picked = np.sort(rng.choice(n, size=size, replace=False))
    if factor == 1:
        centred = rows_as_float(embeddings[picked]).astype(np.float64)  # ``embeddings`` may be an HDF5 dataset
        mean = centred.mean(axis=0)
        centred -= mean
    else:  # read a chunk of full-size rows at a time: only their pooled copies and sums are kept
        centred, total = np.empty((size, fitted)), np.zeros(d)
        chunk = max(1, BLOCK_BYTES // (8 * d))
        for start in range(0, size, chunk):
            rows = embeddings[picked[start : start + chunk]]
            centred[start : start + chunk] = block_sums(rows, factor) / (255.0 * factor)  # pooled φ = p / 255
            total += rows.sum(axis=0, dtype=np.int64)
        mean = total / (255.0 * size)
        centred -= centred.mean(axis=0)
    dims = max(1, min(dims, fitted, len(centred) - 1))
    # Randomised range finder (two power iterations), then an exact SVD of the small projection:
    # the rows come out orthonormal to float64 precision, which is all the bound needs.
    basis, _ = np.linalg.qr(centred.T @ (centred @ rng.standard_normal((fitted, dims + 16))))
    basis, _ = np.linalg.qr(centred.T @ (centred @ basis))
    _, _, vt = np.linalg.svd(centred @ basis, full_matrices=False)
    basis = (basis @ vt.T).T[:dims]
    if factor > 1:  # a pooled coordinate's weight 1/f on each of its f × f pixels: unit rows again
        side = image_size // factor
        lifted = np.broadcast_to(
            basis.reshape(dims, 3, side, 1, side, 1) / factor, (dims, 3, side, factor, side, factor)
        )
        basis = lifted.reshape(dims, d)
    return SearchPlan(mean, np.ascontiguousarray(basis))


def project_rows(plan: SearchPlan, rows) -> tuple[np.ndarray, np.ndarray]:
    """The stored search tables of ``rows`` (an array or an HDF5 dataset, read a block at a time):
    projections (n, k) float32 and ‖r − μ‖² (n,) float64."""
    chunk = max(1, BLOCK_BYTES // (8 * rows.shape[1]))
    projected = np.empty((len(rows), len(plan.basis)), dtype=np.float32)
    norms = np.empty(len(rows))
    for start in range(0, len(rows), chunk):
        coords, squared = plan.project(rows_as_float(rows[start : start + chunk]))
        projected[start : start + chunk], norms[start : start + chunk] = coords, squared
    return projected, norms


def rows_as_float(rows: np.ndarray) -> np.ndarray:
    """Stored rows as the float32 embeddings they encode: uint8 rgb rows are pixel values, φ = p / 255."""
    if rows.dtype == np.uint8:
        floats = rows.astype(np.float32)
        floats /= np.float32(255.0)  # the same operation as spaces.pixels_to_float: bit-identical
        return floats
    return rows


def _augmented(coords: np.ndarray, centred_squared: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """[x_1..x_dims, ρ] in float64 (the first ``dims`` coordinates and the norm of the rest), and ‖x‖."""
    augmented = np.empty((len(coords), dims + 1))
    augmented[:, :-1] = coords[:, :dims]
    kept_squared = np.einsum("ij,ij->i", augmented[:, :-1], augmented[:, :-1])
    augmented[:, -1] = np.sqrt(np.maximum(centred_squared - kept_squared, 0))
    return augmented, np.sqrt(kept_squared)


@dataclass
class SearchResult:
    ids: np.ndarray
    distances: np.ndarray
    checked: np.ndarray  # rows whose exact distance was computed, per query


def _augmented_error(augmented: np.ndarray, delta: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """ε ≥ ‖z − z̃‖ for augmented vectors z̃ = [x̃, ρ̃] whose coordinates x̃ (of norm ``kept``) lie
    within ``delta`` (Euclidean) of exact ones x, ρ̃ = √(‖c‖² − ‖x̃‖²) and ρ = √(‖c‖² − ‖x‖²).

    |‖x‖² − ‖x̃‖²| ≤ g = δ(2‖x̃‖ + δ), so ρ moves by at most min(√g, g / ρ̃): a coordinate error
    of order u can move a small residual by far more than u, which is why this is not left to
    the rounding margin.
    """
    g = delta * (2 * kept + delta)
    residual = augmented[:, -1]
    moved = np.minimum(np.sqrt(g), np.divide(g, residual, out=np.full_like(g, np.inf), where=residual > 0))
    return np.sqrt(delta**2 + moved**2)


@dataclass
class _Stage:
    """One lower bound. ``operand`` (n, dims + 3) float32 holds each row's augmented vector y as
    [−2y, ‖y‖² − 2ε‖y‖, −2ε], so that one product with the query's [x, 1, ‖x‖ + ε_x] gives
    ‖y‖² − 2x·y − 2ε(‖x‖ + ‖y‖) ≤ ‖x − y_exact‖² − ‖x‖²: ε bounds how far the row's augmented
    vector, computed from its float32 projection, lies from the exact one (:func:`_augmented_error`),
    and ‖x − y_exact‖ ≥ ‖x − y‖ − ε."""

    dims: int
    operand: np.ndarray
    max_norm: float
    margin: float
    products: FloatProducts

    @property
    def nbytes(self) -> int:
        return self.operand.nbytes

    @classmethod
    def of(cls, dims: int, projected, centred_squared, order: np.ndarray, products: FloatProducts) -> _Stage:
        """The stage over the leading ``dims`` of the rows' float32 projections, the rows taken in
        ``order`` (in blocks: no float64 copy of all of them, nor a reordered copy)."""
        operand = np.empty((len(projected), dims + 3), dtype=np.float32)
        largest = 0.0
        step = max(1, BLOCK_BYTES // (8 * (dims + 3)))
        for start in range(0, len(projected), step):
            rows = order[start : start + step]
            augmented, kept = _augmented(projected[rows], centred_squared[rows], dims)
            # Each float32 coordinate is within u of its float64 value, relatively.
            error = _augmented_error(augmented, UNIT_ROUNDOFF * (1 + UNIT_ROUNDOFF) * kept, kept)
            squared = np.square(kept) + np.square(augmented[:, -1])
            block = operand[start : start + step]
            np.multiply(augmented, -2, out=block[:, :-2], casting="same_kind")  # no float64 temporary
            block[:, -2] = squared - 2 * error * np.sqrt(squared)
            block[:, -1] = -2 * error
            largest = max(largest, float(squared.max()))
        return cls(dims, operand, float(np.sqrt(largest)), _lower_bound_margin(dims), products)

    def bound_terms(self, coords, centred_squared, coord_error, rows=slice(None)):
        """(G, offset) with G + offset ≤ the bound: G float32 per (query, row), offset per query
        (float64): ‖a‖² less the rounding margin and the cost of the query's coordinates being
        within ``coord_error`` (per coordinate) of exact."""
        augmented, kept = _augmented(coords, centred_squared, self.dims)
        query_squared = np.square(kept) + np.square(augmented[:, -1])
        norms = np.sqrt(query_squared)
        # The query's augmented vector lies within ε of its exact value, so for any row
        # ‖z − y‖² ≥ ‖z̃ − y‖² − 2ε(‖z̃‖ + ‖y‖); ‖z‖ ≤ ‖z̃‖ + ε in the rows' own term.
        error = _augmented_error(augmented, np.sqrt(self.dims) * coord_error, kept)
        query = np.concatenate([augmented, np.ones((len(augmented), 1)), (norms + error)[:, None]], axis=1)
        bound = self.products(query.astype(np.float32), self.operand[rows])
        shift = 2 * error * (norms + self.max_norm)
        return bound, query_squared - self.margin * (norms + self.max_norm) ** 2 - shift

    def threshold(self, reach: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """float32 bound thresholds: rows above them are farther than ``reach`` (squared, per query)."""
        return _round_up32(reach - offset)[:, None]


def _window_radius(reach: np.ndarray, widen: np.ndarray) -> np.ndarray:
    """How far a row's computed first coordinate may lie from a query's and the row still be within
    ``reach`` (squared) of it: √reach, the basis rows' norms (1 to float64 precision) and ``widen``
    (the rounding of both coordinates)."""
    return np.sqrt(reach) * (1 + 1e-9) + widen


def _first_coordinate_error(first: np.ndarray, centred_squared: np.ndarray, d: int) -> float:
    """A bound on how far any row's float32 first coordinate ỹ₁ lies from its exact value: within u
    of the float64 one, relatively, which lies within γ_d·‖r − μ‖ of it (|Q₁|·|r − μ| ≤ ‖r − μ‖)."""
    largest = float(np.abs(first).max(initial=0.0))
    centred = float(np.sqrt(np.max(centred_squared, initial=0.0)))
    return 2 * UNIT_ROUNDOFF * largest + 1.01 * gamma(d + 1, 2.0**-53) * centred


class ExactSearch:
    """Exact k = 1 search over ``rows`` (n, d) uint8 pixels (the rgb space: φ = p / 255), in memory.

    ``projected`` (n, k) float32 and ``centred_squared`` (n,) float64 are :func:`project_rows` of
    the rows (stored in the index); ``sha256`` (n,) S64 lets a query skip the rows of its own file
    (leave-one-out). ``seconds`` adds up the time spent in each step, for benchmarks (of one thread
    at a time: two searching at once may lose an addition). ``threads`` (default: FAISS's, which
    :meth:`RunSettings.apply` sets) search blocks of queries at once (:func:`map_blocks`);
    ``kernel`` goes to :class:`PixelProducts`. ``squared_norms`` (n,) int64,
    the rows' ‖r‖² when already computed (:mod:`manifpt_cli.search_tables`), saves reading them again.
    """

    def __init__(
        self,
        rows: np.ndarray,
        plan: SearchPlan,
        projected: np.ndarray,
        centred_squared: np.ndarray,
        sha256: np.ndarray,
        stage_dims: Sequence[int] = STAGE_DIMS,
        threads: int | None = None,
        kernel: str | None = None,
        squared_norms: np.ndarray | None = None,
    ) -> None:
        if rows.dtype != np.uint8:
            raise ValueError(f"the exact search takes uint8 pixel rows, not {rows.dtype}")
        if threads is None:
            import faiss

            threads = faiss.omp_get_max_threads()
        self.rows, self.plan, self.threads = rows, plan, threads
        dims = sorted({min(k, projected.shape[1]) for k in stage_dims})
        basis = plan.basis[: dims[-1]]  # the coordinates the stages use
        self.products = PixelProducts(kernel)
        # The stages hold the rows by their first coordinate (positions), so that the rows near a
        # block's first coordinates are one range of columns (:meth:`_first_stage`).
        first = np.asarray(projected[:, 0], dtype=np.float64)
        self._order = np.argsort(first, kind="stable")  # position → row
        self._position = np.empty_like(self._order)  # row → position
        self._position[self._order] = np.arange(len(self._order))
        self._first = first[self._order]
        self._first_error = _first_coordinate_error(first, centred_squared, rows.shape[1])
        self.float_products = FloatProducts()
        self.stages = [_Stage.of(k, projected, centred_squared, self._order, self.float_products) for k in dims]
        # Q / σ = Σ_t D_t · unit_t + R with integer digits D_t in −127..127 (σ = max |Q|): the
        # projection of pixels is then exact integer products, and R bounds what it leaves out.
        # A basis fitted on pooled rows (:func:`pooling_factor`) is constant on blocks of pixels,
        # and so are its digits (made elementwise): D_t·p is then D'_t·(block sums of p), the same
        # integers for far fewer products, and the digits are made from one value per block.
        self._pooling = plan.pooling
        values = plan.pooled_basis[: len(basis)]
        self._basis_scale = float(np.abs(values).max(initial=0.0)) or 1.0
        remainder, digits = values / self._basis_scale, []
        self._digit_units = [1 / (127 * 254.0**t) for t in range(PROJECTION_DIGITS)]
        for unit in self._digit_units:
            digit = np.rint(remainder / unit)
            digits.append(digit)
            remainder = remainder - digit * unit
        self._digits = self.products.operand(np.concatenate(digits).astype(np.int64))
        self._remainder = self._basis_scale * float(np.abs(remainder).max(initial=0.0))
        self._basis_mean = basis @ plan.mean
        if squared_norms is not None and (squared_norms.shape != (len(rows),) or squared_norms.dtype != np.int64):
            raise ValueError(
                f"squared_norms must be ({len(rows)},) int64, not {squared_norms.shape} {squared_norms.dtype}"
            )
        self.squared_norms = squared_norms  # ‖r‖² in pixels², exact
        if squared_norms is None:
            self.squared_norms = np.empty(len(rows), dtype=np.int64)
            step = max(1, BLOCK_BYTES // max(1, rows.shape[1]))
            for start in range(0, len(rows), step):
                self.squared_norms[start : start + step] = pixel_squares(rows[start : start + step])
        self.max_norm = float(np.sqrt(self.squared_norms.max(initial=0)))
        self._precision = gamma(rows.shape[1] + 1, 2.0**-53)
        self.own_rows = OwnRows(sha256)
        self.seconds: dict[str, float] = defaultdict(float)

    @property
    def parameters(self) -> dict:
        """What a report header says of the search: the stages' coordinates, the basis size and
        how many rows either side of a block's first coordinates give its first upper bound."""
        return {
            "stage_dims": [stage.dims for stage in self.stages],
            "basis": len(self.plan.basis),
            "window_rows": WINDOW_ROWS,
        }

    @property
    def nbytes(self) -> int:
        """Memory the search holds per the whole index (rows, bound operands, norms)."""
        held = self.rows.nbytes + self.squared_norms.nbytes + self.own_rows.nbytes
        held += self._order.nbytes + self._position.nbytes + self._first.nbytes
        return held + sum(stage.nbytes for stage in self.stages)

    def _timed(self, step: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[step] += now - started
        return now

    def _slack(self, distances: np.ndarray, query_norms: np.ndarray) -> np.ndarray:
        """e(D) ≥ |255²·E − D| for a pair at integer distance D, E its float64 brute-force distance.

        With a = fl(q / 255) = q / 255 + α (|α_i| ≤ u·q_i / 255), b likewise, S = √D and
        N = ‖q‖ + ‖r‖: Σ(a − b)² differs from D / 255² by at most (2uSN + u²N²) / 255²
        (Cauchy–Schwarz on the cross term) and is at most (S + uN)² / 255²; float64 squares and
        sums it with relative error γ_{d+1}. ‖r‖ is bounded by the largest row norm.
        """
        norms = query_norms + self.max_norm
        root = np.sqrt(distances.astype(np.float64))
        return (
            2 * UNIT_ROUNDOFF * root * norms
            + UNIT_ROUNDOFF**2 * norms**2
            + self._precision * (root + UNIT_ROUNDOFF * norms) ** 2 * 1.01
            + 1.0
        )

    def nearest(self, queries: np.ndarray, own_sha256: Sequence[str] | None = None) -> SearchResult:
        """Brute force's neighbour and float64 distance for each row of (n, d) float32 ``queries``,
        which must be 8-bit pixel embeddings (p / 255: every rgb query is)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_digests(own_sha256, len(queries))
        pixels = np.clip(np.rint(queries * 255), 0, 255).astype(np.uint8)
        if not np.array_equal(rows_as_float(pixels), queries):
            raise ValueError("the exact search takes 8-bit pixel embeddings (p / 255) as queries")
        n = len(queries)
        ids = np.full(n, -1, dtype=np.int64)
        distances = np.full(n, np.inf)
        checked = np.zeros(n, dtype=np.int64)
        if n == 0 or len(self.rows) == 0:
            return SearchResult(ids, distances, checked)
        # Bounded by the (queries × rows) bound matrix, and by the queries' float64 copies (which
        # matter at large image sizes: 10 queries at 256×256).
        per_query = max(4 * len(self.rows), 8 * self.rows.shape[1])
        block = max(1, min(QUERY_BLOCK, BLOCK_BYTES // per_query))
        # Blocks of alike queries (by brightness, the first principal component of photographs)
        # share more of their candidate rows, so the products over their union are smaller.
        brightness = pixels.sum(axis=1, dtype=np.int64)
        order = np.argsort(brightness, kind="stable")
        parts = [order[start : start + block] for start in range(0, n, block)]

        def search(part: np.ndarray):
            own = [own_sha256[i] for i in part] if own_sha256 is not None else None
            return self._nearest_block(pixels[part], queries[part], brightness[part], own)

        for part, found in zip(parts, map_blocks(search, parts, self.threads)):
            ids[part], distances[part], checked[part] = found
        return SearchResult(ids, distances, checked)

    @staticmethod
    def _own_cells(columns: np.ndarray, own) -> tuple[np.ndarray, np.ndarray]:
        """(query, position in ``columns``) of each query's own rows among ascending ``columns``."""
        own_queries, own_rows = own
        if not len(own_rows) or not len(columns):
            return own_queries[:0], own_rows[:0]
        at = np.minimum(np.searchsorted(columns, own_rows), len(columns) - 1)
        hit = columns[at] == own_rows
        return own_queries[hit], at[hit]

    def _distances(self, operand, query_squared, columns: np.ndarray, own) -> np.ndarray:
        """(len(columns), b) exact integer squared distances (pixels²) to the rows at ascending
        positions ``columns``; NO_ROW to a query's own rows."""
        distances = np.empty((len(columns), len(query_squared)), dtype=np.int64)
        step = max(1, BLOCK_BYTES // (8 * max(len(query_squared), self.rows.shape[1] // 8)))
        for start in range(0, len(columns), step):
            chunk = self._order[columns[start : start + step]]
            dots = self.products.dots(self.rows[chunk], operand)
            distances[start : start + step] = self.squared_norms[chunk, None] + query_squared[None] - 2 * dots
        queries, positions = self._own_cells(columns, own)
        distances[positions, queries] = NO_ROW
        return distances

    def _bound(self, stage, coords, centred_squared, coord_error, columns: np.ndarray, own, selected=None):
        """A stage's (bound, terms) over ascending positions ``columns`` (``selected``: the same
        as a slice), the bound at its largest at a query's own rows."""
        if selected is None:
            selected = slice(None) if len(columns) == len(self.rows) else columns  # ascending and unique
        bound, terms = stage.bound_terms(coords, centred_squared, coord_error, selected)
        queries, positions = self._own_cells(columns, own)
        bound[queries, positions] = _largest(bound.dtype)
        return bound, terms

    def _upper(self, bound, known: _KnownDistances, columns) -> np.ndarray:
        """Per query, the smallest exact distance to a pool of rows of low bound: each query's lowest
        in each of ``UPPER_PARTS`` slices of the bound's columns, pooled over the block (``columns``
        maps the columns to rows); NO_ROW where none is finite."""
        if not bound.shape[1]:
            return np.full(len(bound), NO_ROW)
        b, n = bound.shape
        parts = min(UPPER_PARTS, n)
        width = n // parts  # the last part also takes the n % parts columns left over
        lowest = bound[:, : width * (parts - 1)].reshape(b, parts - 1, width).argmin(axis=2)
        lowest += np.arange(parts - 1) * width
        last = width * (parts - 1) + bound[:, width * (parts - 1) :].argmin(axis=1)
        lowest = np.concatenate([lowest, last[:, None]], axis=1)
        lowest = np.sort(lowest[np.take_along_axis(bound, lowest, axis=1) < _largest(bound.dtype)])
        # Sorted, then deduplicated by hand: np.unique took 30 ms for 128 values in some processes.
        pool = columns[lowest[np.r_[True, lowest[1:] != lowest[:-1]]]] if len(lowest) else columns[:0]
        return known.of(pool).min(axis=0, initial=NO_ROW)

    def _reach(self, upper, query_norms) -> np.ndarray:
        """Per query, the squared distance (in φ) beyond which a row is farther than ``upper``
        (pixels², NO_ROW: none, for an infinite reach)."""
        reach = (upper + self._slack(upper, query_norms)) / 255.0**2
        return np.where(upper < NO_ROW, reach, np.inf)

    def _window(self, first, widen, reach) -> tuple[int, int]:
        """The positions [start, stop) of the rows whose first coordinate lies within √reach of
        some query's ``first`` (rounding: ``widen`` per query): ‖x − y‖ ≥ |x₁ − y₁|, so every
        other row is farther than ``reach`` from every query of the block."""
        radius = _window_radius(reach, widen)
        if not np.isfinite(radius).all():
            return 0, len(self._first)
        start = int(np.searchsorted(self._first, (first - radius).min(), side="left"))
        return start, int(np.searchsorted(self._first, (first + radius).max(), side="right"))

    def _first_stage(self, stage, coords, centred_squared, coord_error, query_norms, known, own, count: bool):
        """(union, upper, survivors per query or None unless ``count``) of the first stage, which
        bounds only the rows near the block's first coordinates: those within ``WINDOW_ROWS``
        positions of them give the upper bound, which then gives the window of rows that can be
        nearer (:meth:`_window`)."""
        first, widen = coords[:, 0], coord_error + self._first_error
        n = len(self._first)
        start = max(0, int(np.searchsorted(self._first, first.min(), side="left")) - WINDOW_ROWS)
        stop = min(n, int(np.searchsorted(self._first, first.max(), side="right")) + WINDOW_ROWS)
        core = np.arange(start, stop)
        bound, terms = self._bound(stage, coords, centred_squared, coord_error, core, own, slice(start, stop))
        upper = self._upper(bound, known, core)
        reach = self._reach(upper, query_norms)
        threshold = stage.threshold(reach, terms)
        survivors = bound <= threshold
        window_start, window_stop = self._window(first, widen, reach)
        union = [core[survivors.any(axis=0) & (core >= window_start) & (core < window_stop)]]
        checked = survivors.sum(axis=1) if count else None
        for side in (slice(window_start, min(start, window_stop)), slice(max(stop, window_start), window_stop)):
            if side.stop > side.start:
                columns = np.arange(side.start, side.stop)
                bound, _ = self._bound(stage, coords, centred_squared, coord_error, columns, own, side)
                survivors = bound <= threshold
                union.append(columns[survivors.any(axis=0)])
                if count:
                    checked += survivors.sum(axis=1)
        return np.sort(np.concatenate(union)), upper, checked

    def _threshold(self, stage, upper, query_norms, terms) -> np.ndarray:
        """A stage's bound thresholds: rows above them are farther than ``upper`` (NO_ROW: none)."""
        return stage.threshold(self._reach(upper, query_norms), terms)

    def _project(self, pixels: np.ndarray, pixel_sums: np.ndarray, pixel_norms: np.ndarray):
        """(x̃, η): the queries' coordinates Q(φ − μ) from integer products with the basis digits,
        and a bound per query on |x̃_i − x_i| for every coordinate (``pixel_sums`` Σp and
        ``pixel_norms`` ‖p‖ per query).

        x̃ = (σ / 255) Σ_t unit_t (D_t p) − Qμ differs from Q(p / 255 − μ) by (σ / 255) R p,
        at most σ·max|R|·Σp / 255 per coordinate, and Q(p / 255) from Qφ (φ = fl(p / 255)) by
        at most u‖φ‖ ≤ u(1 + u)‖p‖ / 255 (the rows of Q are unit vectors; 1 + 4u also covers
        float64's rounding of ‖p‖ / 255); 1e-12·Σp / 255 covers float64's sums.
        """
        k = len(self._basis_mean)
        if self._pooling == 1:
            products = self.products.dots(pixels, self._digits).astype(np.float64)
        else:  # D'·s for block sums s, a byte of s at a time: D'·s = Σ_j 256^j D'·byte_j(s), exactly
            sums, products = block_sums(pixels, self._pooling), 0
            for j in range((int(self._pooling**2 * 255).bit_length() + 7) // 8):
                byte = ((sums >> (8 * j)) & 255).astype(np.uint8)
                products = products + 256**j * self.products.dots(byte, self._digits)
            products = products.astype(np.float64)
        scaled = sum(products[:, t * k : (t + 1) * k] * unit for t, unit in enumerate(self._digit_units))
        coords = scaled * (self._basis_scale / 255) - self._basis_mean
        float_norms = pixel_norms * ((1 + 4 * UNIT_ROUNDOFF) / 255)  # ≥ ‖φ‖
        return coords, (self._remainder + 1e-12) * (pixel_sums / 255) + UNIT_ROUNDOFF * float_norms

    def _nearest_block(self, pixels: np.ndarray, queries: np.ndarray, pixel_sums: np.ndarray, own_sha256):
        started = time.perf_counter()
        b = len(pixels)
        centred = np.subtract(queries, self.plan.mean, dtype=np.float64)
        centred_squared = np.einsum("ij,ij->i", centred, centred)
        query_squared = pixel_squares(pixels)
        query_norms = np.sqrt(query_squared.astype(np.float64))
        coords, coord_error = self._project(pixels, pixel_sums, query_norms)
        operand = self.products.operand(pixels)
        own_queries, own_rows = self.own_rows.pairs(own_sha256)
        own = own_queries, self._position[own_rows]
        started = self._timed("project", started)

        known = _KnownDistances(self, operand, query_squared, own)
        union, upper, checked = self._first_stage(
            self.stages[0], coords, centred_squared, coord_error, query_norms, known, own, len(self.stages) == 1
        )
        started = self._timed("stage 1 bound", started)
        for number, stage in enumerate(self.stages[1:], start=2):
            bound, terms = self._bound(stage, coords, centred_squared, coord_error, union, own)
            upper = np.minimum(upper, self._upper(bound, known, union))
            survivors = bound <= self._threshold(stage, upper, query_norms, terms)
            union = union[survivors.any(axis=0)]
            if number == len(self.stages):  # the rows the last stage leaves are the ones verified
                checked = survivors.sum(axis=1)
            started = self._timed(f"stage {number} bound", started)

        exact = known.of(union, keep=False)
        smallest = exact.min(axis=0, initial=NO_ROW)
        # A row can beat the smallest only if D − e(D) ≤ D_min + e(D_min); every such D is below
        # 2·D_min + N², and e grows with D.
        largest = 2 * smallest.astype(np.float64) + (query_norms + self.max_norm) ** 2
        reach = smallest + self._slack(smallest, query_norms) + self._slack(largest, query_norms)
        row_index, query_ids = np.nonzero((exact <= reach[None]) & (exact < NO_ROW))
        started = self._timed("integer distances", started)

        row_ids = self._order[union[row_index]]
        found = np.empty(len(row_ids))
        step = max(1, BLOCK_BYTES // (8 * self.rows.shape[1]))  # (query, row) pairs in float64 at a time
        for start in range(0, len(row_ids), step):
            pairs = slice(start, start + step)
            # The float64 difference and sum brute force computes (float32 → float64 is exact; a
            # float64 copy, then the subtraction in place, runs faster than a casting subtraction).
            difference = rows_as_float(self.rows[row_ids[pairs]]).astype(np.float64)
            difference -= queries[query_ids[pairs]]
            found[pairs] = np.square(difference, out=difference).sum(axis=1)
        ids, distances = closest_pairs(b, query_ids, row_ids, found)
        self._timed("float64 check", started)
        return ids, distances, checked


class _KnownDistances:
    """The exact distances from one block's queries to the rows computed so far. The upper bounds'
    pools and the rows that survive the bounds share many rows; each is computed once."""

    def __init__(self, search: ExactSearch, operand, query_squared: np.ndarray, own) -> None:
        self._search, self._operand, self._query_squared, self._own = search, operand, query_squared, own
        self.rows = np.zeros(0, dtype=np.int64)  # ascending
        self.distances = np.zeros((0, len(query_squared)), dtype=np.int64)

    def of(self, row_ids: np.ndarray, keep: bool = True) -> np.ndarray:
        """(len(row_ids), b) exact distances (:meth:`ExactSearch._distances`) to ascending
        ``row_ids``; those computed now are kept for later calls unless ``keep`` is False."""
        if len(row_ids) > 1 and not (row_ids[1:] > row_ids[:-1]).all():
            raise ValueError("row ids must be strictly ascending (a repeated row would escape leave-one-out)")
        at = np.searchsorted(self.rows, row_ids)
        if len(self.rows):
            known = self.rows[np.minimum(at, len(self.rows) - 1)] == row_ids
        else:
            known = np.zeros(len(row_ids), dtype=bool)
        if known.all():
            return self.distances[at]
        computed = self._search._distances(self._operand, self._query_squared, row_ids[~known], self._own)
        found = computed
        if known.any():
            found = np.empty((len(row_ids), len(self._query_squared)), dtype=np.int64)
            found[known], found[~known] = self.distances[at[known]], computed
        if keep:
            rows = np.concatenate([self.rows, row_ids[~known]])
            order = np.argsort(rows, kind="stable")
            self.rows, self.distances = rows[order], np.concatenate([self.distances, computed])[order]
        return found


class OwnRows:
    """The rows of each query's own file (leave-one-out), looked up by SHA-256 in a sorted copy."""

    def __init__(self, sha256: np.ndarray) -> None:
        order = np.argsort(sha256, kind="stable")
        self.sorted, self.order = sha256[order], order

    @property
    def nbytes(self) -> int:
        return self.sorted.nbytes + self.order.nbytes

    def pairs(self, own_sha256: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) pairs of each query's own file, rows ascending per query (one lookup for
        all the queries: a loop over them cost about 5 µs per query)."""
        if own_sha256 is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        keys, fits = digest_keys(own_sha256, self.sorted.dtype)
        starts = np.searchsorted(self.sorted, keys, side="left")
        counts = np.where(fits, np.searchsorted(self.sorted, keys, side="right") - starts, 0)
        queries = np.repeat(np.arange(len(keys), dtype=np.int64), counts)
        # Query i's rows are order[starts[i] : starts[i] + counts[i]], one after the other.
        first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        return queries, self.order[first + np.arange(len(queries))].astype(np.int64)


def digest_keys(own_sha256: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The digests as keys of the index's bytes ``dtype``, and whether each fits it: a digest longer
    than the index's (not a SHA-256) owns no row, rather than matching one by its first characters."""
    encoded = [sha.encode() for sha in own_sha256]
    fits = np.array([len(key) <= dtype.itemsize for key in encoded], dtype=bool)
    return np.array([key if fit else b"" for key, fit in zip(encoded, fits)], dtype=dtype), fits


def closest_pairs(
    n: int, query_ids: np.ndarray, row_ids: np.ndarray, found: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``n`` queries' nearest row among its (query, row, distance) pairs, ties going to the
    lowest row (−1 / inf for a query without pairs)."""
    order = np.lexsort((row_ids, found, query_ids))  # by query, then distance, then row
    query_ids, row_ids, found = query_ids[order], row_ids[order], found[order]
    first_of_query = np.flatnonzero(np.r_[True, query_ids[1:] != query_ids[:-1]]) if len(order) else order
    ids = np.full(n, -1, dtype=np.int64)
    distances = np.full(n, np.inf)
    ids[query_ids[first_of_query]] = row_ids[first_of_query]
    distances[query_ids[first_of_query]] = found[first_of_query]
    return ids, distances
