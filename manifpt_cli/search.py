"""Exact nearest real image (k = 1, squared L2), without scanning every real image in full.

A PCA basis Q (k orthonormal rows, fitted at build time on a seeded sample) and the mean μ give,
for x = Q(q − μ), y = Q(r − μ) and the residual norms ρ = ‖(I − QᵀQ)(· − μ)‖, the lower bound

    LB(q, r) = ‖x − y‖² + (ρ_q − ρ_r)² ≤ ‖q − r‖²

(Pythagoras, then the triangle inequality on the residuals). It is the squared distance between the
augmented vectors [x, ρ_q] and [y, ρ_r], so one matrix product per batch of queries gives it for
every real image. Candidates are visited in increasing LB and checked exactly; the search stops
once the next candidate's LB exceeds the best distance found (strictly, so every row tied at the
minimum is visited and the lowest row wins). Where a space's bound prunes too little (the log
spectra of ``freq`` are noise-like), the basis is the identity: the same code then scans every row
in one float32 product, with the same rigorous margins, and checks the few rows near the minimum.

Rounding never prunes the true neighbour: every float32 quantity carries a proven margin (see
:func:`_lower_bound_margin` and :data:`CHECK_RELATIVE_ERROR`), and the distance reported is the
float64 sum that brute force computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNIT_ROUNDOFF = 2.0**-24  # float32: fl(a ∘ b) = (a ∘ b)(1 + δ), |δ| ≤ u
PLAN_SAMPLE = 4096  # real images the basis is fitted on (seeded)
PLAN_TRIAL_QUERIES = 64  # sample rows used as leave-one-out queries to judge the basis
PRUNED_ENOUGH = 0.1  # a basis is kept when it leaves at most this fraction of rows to check
CHECK_BLOCK = 32  # candidates checked per step


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a float32 sum of n products (any order)."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def _lower_bound_margin(dims: int) -> float:
    """Factor c such that LB_float32 − c·(‖x‖ + max‖y‖)² ≤ LB_exact ≤ ‖q − r‖².

    The float32 product G = ‖y‖² − 2 x·y over m = dims + 1 augmented coordinates errs by at most
    γ_m·2‖x‖‖y‖ (dot product) plus u·(‖y‖² + 2‖x‖‖y‖) (the addition of ‖y‖²); rounding x and y
    to float32 moves ‖x − y‖ by at most u(‖x‖ + ‖y‖), so ‖x − y‖² by at most 2u(‖x‖ + ‖y‖)².
    All terms are below (2γ_m + 4u)(‖x‖ + ‖y‖)²; 8u and 1e-9 on top cover the float64 projection
    and residual norms (errors ~1e-15 relative) with room to spare.
    """
    return 2 * gamma(dims + 1) + 8 * UNIT_ROUNDOFF + 1e-9


# A float32 distance Σ fl(fl(r − q)²) of d non-negative terms is within γ_{d+2}·D of the exact sum
# D (each term carries (1+δ)³ and the sum (1+θ), |θ| ≤ γ_{d−1}); the float64 sum brute force
# reports is within 1e-12·D of D. CHECK_RELATIVE_ERROR(d) = 2γ_{d+2} covers both.
def check_relative_error(dim: int) -> float:
    return 2 * gamma(dim + 2)


@dataclass
class SearchPlan:
    """The projection a space is searched with: ``basis`` (k, d) float64 orthonormal rows (k = 0:
    none, every row is scanned in full, centred) and ``mean`` (d,) float64."""

    mean: np.ndarray
    basis: np.ndarray

    @property
    def projected(self) -> bool:
        return len(self.basis) > 0

    def augment(self, vectors: np.ndarray) -> np.ndarray:
        """[Q(v − μ), ρ] in float64 for (n, d) vectors: the coordinates the lower bound lives in
        (v − μ itself where there is no basis)."""
        centred = vectors.astype(np.float64) - self.mean
        if not self.projected:
            return centred
        coords = centred @ self.basis.T
        residual = np.sqrt(
            np.maximum(np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", coords, coords), 0)
        )
        return np.concatenate([coords, residual[:, None]], axis=1)


def _candidate_fraction(plan: SearchPlan, sample: np.ndarray, queries: int) -> float:
    """Mean fraction of the sample whose lower bound does not exceed a held-out row's exact
    nearest distance (the rows the search would have to check)."""
    trial, rest = sample[:queries].astype(np.float64), sample[queries:].astype(np.float64)
    exact = np.square(trial[:, None, :] - rest[None]).sum(-1).min(axis=1)
    a, b = plan.augment(trial), plan.augment(rest)
    bound = np.square(a[:, None, :] - b[None]).sum(-1)
    return float((bound <= exact[:, None]).mean())


def fit_plan(embeddings: np.ndarray, dims: int, seed: int = 0) -> SearchPlan:
    """PCA basis of ``dims`` rows on a seeded sample of (n, d) float32 embeddings, or none (k = 0)
    where it would leave more than :data:`PRUNED_ENOUGH` of the rows to check."""
    n, d = embeddings.shape
    rng = np.random.default_rng(seed)
    sample = embeddings[np.sort(rng.choice(n, size=min(n, PLAN_SAMPLE), replace=False))].astype(np.float64)
    mean = sample.mean(axis=0)
    dims = min(dims, d, len(sample) - 1)
    if dims < 1 or len(sample) <= 8 * PLAN_TRIAL_QUERIES:
        return SearchPlan(mean, np.zeros((0, d)))
    centred = sample - mean
    # Randomised range finder (two power iterations), then an exact SVD of the small projection:
    # the rows come out orthonormal to float64 precision, which is all the bound needs.
    basis, _ = np.linalg.qr(centred.T @ (centred @ rng.standard_normal((d, dims + 16))))
    basis, _ = np.linalg.qr(centred.T @ (centred @ basis))
    _, _, vt = np.linalg.svd(centred @ basis, full_matrices=False)
    plan = SearchPlan(mean, np.ascontiguousarray((basis @ vt.T).T[:dims]))
    shuffled = sample[rng.permutation(len(sample))]
    if _candidate_fraction(plan, shuffled[: 8 * PLAN_TRIAL_QUERIES], PLAN_TRIAL_QUERIES) > PRUNED_ENOUGH:
        return SearchPlan(mean, np.zeros((0, d)))
    return plan


def rows_as_float(rows: np.ndarray) -> np.ndarray:
    """Stored rows as the float32 embeddings they encode: uint8 rgb rows are pixel values, φ = p / 255."""
    if rows.dtype == np.uint8:
        floats = rows.astype(np.float32)
        floats /= np.float32(255.0)  # the same operation as spaces.pixels_to_float: bit-identical
        return floats
    return rows


@dataclass
class SearchResult:
    ids: np.ndarray
    distances: np.ndarray
    checked: np.ndarray  # candidates whose distance was computed, per query


class ExactSearch:
    """Exact k = 1 search over ``rows`` (n, d) uint8 or float32, held in memory.

    ``vectors`` are the stored float32 :meth:`SearchPlan.augment` of every row ((n, k + 1), or the
    centred rows (n, d) where the plan has no basis).
    ``sha256`` (n,) S64 lets a query skip the rows of its own file (leave-one-out).
    """

    def __init__(self, rows: np.ndarray, plan: SearchPlan, vectors: np.ndarray | None, sha256: np.ndarray) -> None:
        self.rows, self.plan = rows, plan
        self.operand = np.ascontiguousarray(vectors, dtype=np.float32)
        squared = np.einsum("ij,ij->i", self.operand, self.operand, dtype=np.float64)
        self.operand_squared = squared.astype(np.float32)
        self.max_norm = float(np.sqrt(squared.max())) if len(squared) else 0.0
        self.margin = _lower_bound_margin(self.operand.shape[1] - 1)
        self.check_error = check_relative_error(rows.shape[1])
        order = np.argsort(sha256, kind="stable")
        self._sha_sorted, self._sha_order = sha256[order], order

    def _own_rows(self, sha: bytes) -> np.ndarray:
        start = np.searchsorted(self._sha_sorted, sha, side="left")
        stop = np.searchsorted(self._sha_sorted, sha, side="right")
        return self._sha_order[start:stop]

    def _distances32(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        difference = rows_as_float(self.rows[ids]) - query
        return np.einsum("ij,ij->i", difference, difference).astype(np.float64)

    def _distances64(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The float64 distance brute force reports (same operations, same summation)."""
        vectors = rows_as_float(self.rows[ids]).astype(np.float64)
        return np.square(vectors - query.astype(np.float64)).sum(axis=1)

    def nearest(self, queries: np.ndarray, own_sha256: Sequence[str] | None = None) -> SearchResult:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        ids = np.full(n, -1, dtype=np.int64)
        distances = np.full(n, np.inf)
        checked = np.zeros(n, dtype=np.int64)
        if n == 0 or len(self.rows) == 0:
            return SearchResult(ids, distances, checked)
        coords = self.plan.augment(queries)
        coords32 = coords.astype(np.float32)
        bound = coords32 @ (-2 * self.operand.T)
        bound += self.operand_squared
        query_squared = np.einsum("ij,ij->i", coords, coords)
        margins = self.margin * (np.sqrt(query_squared) + self.max_norm) ** 2
        for i in range(n):
            if own_sha256 is not None:
                bound[i, self._own_rows(own_sha256[i].encode())] = np.inf
            first = int(bound[i].argmin())
            if not np.isfinite(bound[i, first]):
                continue  # every row is the query's own file
            seed = np.array([first])
            found = [(seed, self._distances32(queries[i], seed))]
            best_upper = float(found[0][1][0]) * (1 + self.check_error)
            limit = np.nextafter(np.float32(best_upper - query_squared[i] + margins[i]), np.float32(np.inf))
            candidates = np.flatnonzero(bound[i] <= limit)
            order = np.argsort(bound[i, candidates], kind="stable")
            candidates = candidates[order]
            lower = bound[i, candidates].astype(np.float64) + query_squared[i] - margins[i]
            for start in range(0, len(candidates), CHECK_BLOCK):
                if lower[start] > best_upper:
                    break
                block = candidates[start : start + CHECK_BLOCK]
                estimate = self._distances32(queries[i], block)
                found.append((block, estimate))
                best_upper = min(best_upper, float(estimate.min()) * (1 + self.check_error))
            visited = np.concatenate([block for block, _ in found])
            estimates = np.concatenate([estimate for _, estimate in found])
            checked[i] = len(np.unique(visited))
            close = np.unique(visited[estimates * (1 - self.check_error) <= best_upper])  # sorted rows
            exact = self._distances64(queries[i], close)
            winner = int(np.argmin(exact))  # first minimum: the lowest row among ties (rows sorted)
            ids[i], distances[i] = close[winner], exact[winner]
        return SearchResult(ids, distances, checked)
