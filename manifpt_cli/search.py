"""Exact nearest real image (k = 1, squared L2), without scanning every real image in full.

A PCA basis Q (k orthonormal rows, fitted at build time on a seeded sample) and the mean μ give,
for x = Q(q − μ), y = Q(r − μ) and the residual norms ρ = ‖(I − QᵀQ)(· − μ)‖, the lower bound

    LB(q, r) = ‖x − y‖² + (ρ_q − ρ_r)² ≤ ‖q − r‖²

(Pythagoras, then the triangle inequality on the residuals). It is the squared distance between the
augmented vectors [x, ρ_q] and [y, ρ_r], so one matrix product per block of queries gives it for
every real image. Any leading j < k of the basis rows give a looser bound of the same form, with
ρ grown by the dropped coordinates. The search runs in stages, all batched over a block of queries:

1. the bound in the first ``STAGE_DIMS[0]`` coordinates for every row (one small float32 product),
   and an upper bound per query: the distance to its row of smallest bound;
2. the bound in all k coordinates for the rows that stage 1 left (their union over the block), and
   a tighter upper bound from the ``PROBES`` rows of smallest bound;
3. float32 distances to the rows that survive (one product over their union);
4. the float64 sum brute force computes, for the rows within rounding of the smallest distance.

A row is dropped only when its bound exceeds a query's upper bound (strictly, so every row tied at
the minimum survives and the lowest row wins). Rounding never drops the true neighbour: every
float32 quantity carries a proven margin (:func:`_lower_bound_margin`, :func:`_distance_margin`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

UNIT_ROUNDOFF = 2.0**-24  # float32: fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u
PLAN_SAMPLE = 4096  # real images the basis is fitted on (seeded), fewer where they would pass PLAN_BYTES
PLAN_BYTES = 512 * 2**20  # memory for the float64 sample the basis is fitted on
STAGE_DIMS = (64, 256)  # coordinates of the stage-1 bound, and of the basis (stage 3); bench/exact_search.py
PROBES = 4  # rows per query of lowest stage-3 bound whose distance tightens the upper bound
QUERY_BLOCK = 128  # queries searched together (their candidate rows are shared in the products)
BLOCK_BYTES = 64 * 2**20  # at most this much memory for one block's (queries × rows) bound matrix


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a float32 sum of n products (any order)."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def _lower_bound_margin(dims: int) -> float:
    """Factor c such that LB_float32 − c·(‖x‖ + max‖y‖)² ≤ LB_exact ≤ ‖q − r‖².

    The float32 product G = ‖y‖² − 2 x·y over m = dims + 1 augmented coordinates errs by at most
    γ_m·2‖x‖‖y‖ (dot product) plus u·(‖y‖² + 2‖x‖‖y‖) (the addition of ‖y‖²); rounding x and y
    to float32 moves ‖x − y‖ by at most u(‖x‖ + ‖y‖), so ‖x − y‖² by at most 2u(‖x‖ + ‖y‖)².
    All terms are below (2γ_m + 4u)(‖x‖ + ‖y‖)²; 8u and 1e-9 on top cover the float64 projection
    and residual norms (computed from float32 coordinates: errors ~u relative) with room to spare.
    """
    return 2 * gamma(dims + 1) + 8 * UNIT_ROUNDOFF + 1e-9


def _distance_margin(dim: int) -> float:
    """Factor c such that |E − ‖q − r‖²| ≤ c·‖q − μ‖·max‖r‖ + 1e-9·(‖q − μ‖² + max‖r − μ‖²).

    E = ‖q − μ‖² + ‖r − μ‖² − 2(s·(q − μ)·p − (q − μ)·μ), with r = fl(s·p) the stored row p read
    as floats (s = 1/255 for pixels, 1 otherwise). The float32 product (q − μ)·p errs by at most
    γ_d‖q − μ‖‖p‖, fl(s·p) differs from s·p by at most u·|s·p|, and rounding q − μ to float32
    moves the product by at most u‖q − μ‖‖r‖ (6u covers both, twice); the float64 rest (1e-9).
    """
    return 2 * gamma(dim + 1) + 6 * UNIT_ROUNDOFF


def _round_up32(values: np.ndarray) -> np.ndarray:
    """float64 thresholds as the float32 at or above each (so no comparison loses a row)."""
    rounded = values.astype(np.float32)
    return np.where(rounded < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


@dataclass
class SearchPlan:
    """The projection a space is searched with: ``basis`` (k, d) float64 orthonormal rows and
    ``mean`` (d,) float64."""

    mean: np.ndarray
    basis: np.ndarray

    def project(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q(v − μ), ‖v − μ‖²) in float64 for (n, d) float vectors."""
        centred = vectors.astype(np.float64) - self.mean
        return centred @ self.basis.T, np.einsum("ij,ij->i", centred, centred)


def fit_plan(embeddings: np.ndarray, dims: int = STAGE_DIMS[-1], seed: int = 0) -> SearchPlan:
    """PCA basis of ``dims`` rows on a seeded sample of (n, d) embeddings (uint8 rows: pixels)."""
    n, d = embeddings.shape
    rng = np.random.default_rng(seed)
    size = min(n, max(dims + 17, min(PLAN_SAMPLE, PLAN_BYTES // (8 * d))))  # large images: fewer rows
    picked = np.sort(rng.choice(n, size=size, replace=False))
    centred = rows_as_float(embeddings[picked]).astype(np.float64)  # ``embeddings`` may be an HDF5 dataset
    mean = centred.mean(axis=0)
    dims = max(1, min(dims, d, len(centred) - 1))
    centred -= mean
    # Randomised range finder (two power iterations), then an exact SVD of the small projection:
    # the rows come out orthonormal to float64 precision, which is all the bound needs.
    basis, _ = np.linalg.qr(centred.T @ (centred @ rng.standard_normal((d, dims + 16))))
    basis, _ = np.linalg.qr(centred.T @ (centred @ basis))
    _, _, vt = np.linalg.svd(centred @ basis, full_matrices=False)
    return SearchPlan(mean, np.ascontiguousarray((basis @ vt.T).T[:dims]))


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


def _augmented(coords: np.ndarray, centred_squared: np.ndarray, dims: int) -> np.ndarray:
    """[x_1..x_dims, ρ] in float64: the first ``dims`` coordinates and the norm of the rest."""
    kept = coords[:, :dims].astype(np.float64)
    residual = np.sqrt(np.maximum(centred_squared - np.einsum("ij,ij->i", kept, kept), 0))
    return np.concatenate([kept, residual[:, None]], axis=1)


@dataclass
class SearchResult:
    ids: np.ndarray
    distances: np.ndarray
    checked: np.ndarray  # rows whose full distance was computed, per query


@dataclass
class _Stage:
    """One lower bound: ``operand`` (n, dims + 1) float32 augmented rows, their squared norms."""

    dims: int
    operand: np.ndarray
    squared: np.ndarray = field(init=False)
    max_norm: float = field(init=False)
    margin: float = field(init=False)

    def __post_init__(self) -> None:
        squared = np.einsum("ij,ij->i", self.operand, self.operand, dtype=np.float64)
        self.squared = squared.astype(np.float32)
        self.max_norm = float(np.sqrt(squared.max())) if len(squared) else 0.0
        self.margin = _lower_bound_margin(self.dims)

    def bound_terms(self, coords: np.ndarray, centred_squared: np.ndarray, rows=slice(None)):
        """(G, offset) with ‖a − b‖² − margin ≥ G + offset: G = ‖b‖² − 2a·b in float32 per
        (query, row), offset = ‖a‖² − margin per query (float64)."""
        augmented = _augmented(coords, centred_squared, self.dims)
        operand = self.operand[rows]
        bound = augmented.astype(np.float32) @ (-2 * operand.T)
        bound += self.squared[rows]
        query_squared = np.einsum("ij,ij->i", augmented, augmented)
        return bound, query_squared - self.margin * (np.sqrt(query_squared) + self.max_norm) ** 2


class ExactSearch:
    """Exact k = 1 search over ``rows`` (n, d) uint8 pixels or float32 embeddings, held in memory.

    ``projected`` (n, k) float32 and ``centred_squared`` (n,) float64 are :func:`project_rows` of
    the rows (stored in the index); ``sha256`` (n,) S64 lets a query skip the rows of its own file
    (leave-one-out). ``seconds`` adds up the time spent in each step, for benchmarks.
    """

    def __init__(
        self,
        rows: np.ndarray,
        plan: SearchPlan,
        projected: np.ndarray,
        centred_squared: np.ndarray,
        sha256: np.ndarray,
        stage_dims: Sequence[int] = STAGE_DIMS,
    ) -> None:
        self.rows, self.plan = rows, plan
        dims = sorted({min(k, projected.shape[1]) for k in stage_dims})
        self.stages = [
            _Stage(k, _augmented(projected, centred_squared, k).astype(np.float32)) for k in (dims[0], dims[-1])
        ]
        self.centred_squared = centred_squared
        self.scale = 1 / 255 if rows.dtype == np.uint8 else 1.0
        self.max_row_norm = float(np.sqrt(np.max(centred_squared, initial=0.0))) + float(np.linalg.norm(plan.mean))
        self.max_centred = float(np.sqrt(np.max(centred_squared, initial=0.0)))
        self.distance_margin = _distance_margin(rows.shape[1])
        order = np.argsort(sha256, kind="stable")
        self._sha_sorted, self._sha_order = sha256[order], order
        self.seconds: dict[str, float] = defaultdict(float)

    @property
    def nbytes(self) -> int:
        """Memory the search holds per the whole index (rows, bound operands, norms)."""
        held = self.rows.nbytes + self.centred_squared.nbytes + self._sha_order.nbytes
        return held + sum(stage.operand.nbytes + stage.squared.nbytes for stage in self.stages)

    def _own_rows(self, sha: bytes) -> np.ndarray:
        start = np.searchsorted(self._sha_sorted, sha, side="left")
        stop = np.searchsorted(self._sha_sorted, sha, side="right")
        return self._sha_order[start:stop]

    def _timed(self, step: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[step] += now - started
        return now

    def _upper_estimates(self, centred: np.ndarray, query_squared: np.ndarray, query_ids, row_ids) -> np.ndarray:
        """E + margin ≥ ‖q − r‖² for (query, row) pairs (float64), from a float32 dot per pair."""
        dots = np.einsum("ij,ij->i", centred[query_ids], self.rows[row_ids].astype(np.float32), dtype=np.float32)
        estimate = self._estimate(dots, centred, query_squared, query_ids, row_ids)
        return estimate + self._margins(query_squared)[query_ids]

    def _probe(self, bound, centred, query_squared, columns, probes: int) -> np.ndarray:
        """An upper bound per query: the smallest distance to its ``probes`` rows of lowest bound
        (``columns`` maps the bound's columns to rows); inf where every bound is inf."""
        probes = min(probes, bound.shape[1])
        if probes == 0:
            return np.full(len(bound), np.inf)
        if probes == 1:
            nearest = bound.argmin(axis=1)[:, None]
        else:
            nearest = np.argpartition(bound, probes - 1, axis=1)[:, :probes]
        b = len(bound)
        query_ids = np.repeat(np.arange(b), probes)
        upper = self._upper_estimates(centred, query_squared, query_ids, columns[nearest.ravel()]).reshape(b, probes)
        upper[~np.isfinite(np.take_along_axis(bound, nearest, axis=1))] = np.inf
        return upper.min(axis=1)

    def _estimate(self, dots, centred, query_squared, query_ids, row_ids) -> np.ndarray:
        mean_dot = centred.astype(np.float64) @ self.plan.mean
        cross = dots.astype(np.float64) * self.scale - mean_dot[query_ids]
        return query_squared[query_ids] + self.centred_squared[row_ids] - 2 * cross

    def _margins(self, query_squared: np.ndarray) -> np.ndarray:
        norms = np.sqrt(query_squared)
        extra = 1e-9 * (query_squared + self.max_centred**2)
        return self.distance_margin * norms * self.max_row_norm + extra

    def nearest(self, queries: np.ndarray, own_sha256: Sequence[str] | None = None) -> SearchResult:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        ids = np.full(n, -1, dtype=np.int64)
        distances = np.full(n, np.inf)
        checked = np.zeros(n, dtype=np.int64)
        if n == 0 or len(self.rows) == 0:
            return SearchResult(ids, distances, checked)
        # Bounded by the (queries × rows) bound matrix, and by the probes' float32/float64 copies of
        # the queries and their rows (which matter at large image sizes: 10 queries at 256×256).
        per_query = max(4 * len(self.rows), 8 * PROBES * self.rows.shape[1])
        block = max(1, min(QUERY_BLOCK, BLOCK_BYTES // per_query))
        for start in range(0, n, block):
            part = slice(start, start + block)
            own = own_sha256[part] if own_sha256 is not None else None
            ids[part], distances[part], checked[part] = self._nearest_block(queries[part], own)
        return SearchResult(ids, distances, checked)

    def _nearest_block(self, queries: np.ndarray, own_sha256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        started = time.perf_counter()
        b = len(queries)
        coords, query_squared = self.plan.project(queries)
        centred = (queries.astype(np.float64) - self.plan.mean).astype(np.float32)
        started = self._timed("project", started)

        first, last = self.stages
        bound, offset = first.bound_terms(coords, query_squared)
        if own_sha256 is not None:
            for i, sha in enumerate(own_sha256):
                bound[i, self._own_rows(sha.encode())] = np.inf
        started = self._timed("stage 1 bound", started)

        upper = self._probe(bound, centred, query_squared, np.arange(len(self.rows)), 1)
        searched = np.isfinite(upper)  # False: every row is the query's own file
        if not searched.any():
            return np.full(b, -1, dtype=np.int64), np.full(b, np.inf), np.zeros(b, dtype=np.int64)
        survivors = bound <= _round_up32(np.where(searched, upper - offset, -np.inf))[:, None]
        union = np.flatnonzero(survivors.any(axis=0))
        survivors = survivors[:, union]
        started = self._timed("stage 1 survivors", started)

        bound, offset = last.bound_terms(coords, query_squared, union)
        bound[~survivors] = np.inf
        upper = np.minimum(upper, self._probe(bound, centred, query_squared, union, PROBES))
        survivors = bound <= _round_up32(np.where(searched, upper - offset, -np.inf))[:, None]
        keep = survivors.any(axis=0)
        union, survivors = union[keep], survivors[:, keep]
        started = self._timed("stage 2 bound", started)

        dots = np.empty((len(centred), len(union)), dtype=np.float32)
        step = max(1, BLOCK_BYTES // (4 * self.rows.shape[1]))  # rows read as float32 at a time
        for start in range(0, len(union), step):
            dots[:, start : start + step] = centred @ self.rows[union[start : start + step]].astype(np.float32).T
        query_ids, row_index = np.nonzero(survivors)
        estimate = self._estimate(dots[query_ids, row_index], centred, query_squared, query_ids, union[row_index])
        margins = self._margins(query_squared)[query_ids]
        best_upper = np.full(b, np.inf)
        np.minimum.at(best_upper, query_ids, estimate + margins)
        close = estimate - margins <= best_upper[query_ids]
        started = self._timed("float32 distances", started)

        query_ids, row_ids = query_ids[close], union[row_index[close]]
        exact = np.empty(len(row_ids))
        step = max(1, BLOCK_BYTES // (8 * self.rows.shape[1]))  # (query, row) pairs in float64 at a time
        for start in range(0, len(row_ids), step):
            pairs = slice(start, start + step)
            difference = rows_as_float(self.rows[row_ids[pairs]]).astype(np.float64)
            difference -= queries[query_ids[pairs]].astype(np.float64)
            exact[pairs] = np.square(difference).sum(axis=1)  # the float64 sum brute force computes
        # Lowest distance, then lowest row: sort pairs by (query, distance, row), take each query's first.
        order = np.lexsort((row_ids, exact, query_ids))
        query_ids, row_ids, exact = query_ids[order], row_ids[order], exact[order]
        first_of_query = np.flatnonzero(np.r_[True, query_ids[1:] != query_ids[:-1]]) if len(order) else order
        ids = np.full(b, -1, dtype=np.int64)
        distances = np.full(b, np.inf)
        ids[query_ids[first_of_query]] = row_ids[first_of_query]
        distances[query_ids[first_of_query]] = exact[first_of_query]
        self._timed("float64 check", started)
        return ids, distances, survivors.sum(axis=1)
