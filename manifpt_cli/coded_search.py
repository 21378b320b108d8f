"""Exact nearest real image (k = 1, squared L2) among float rows (freq's log spectra) by a scan of
8-bit codes with a proven error band, then brute force's float64 distance for the rows it leaves.

Log spectra lie far from any low-dimensional subspace (a PCA bound over 64 of freq's 1,542
coordinates still keeps two thirds of the rows), so every row has to be looked at, but not at full
precision. Every coordinate is coded on one grid: v ≈ μ + s·k, k = rint((v − μ)/s) clipped to
−127..127 (μ the rows' mean, s one step for all coordinates). Clipping to the grid's range,
c(v) = min(max(v, μ − 127s), μ + 127s) per coordinate, never increases a distance,
‖c(q) − c(r)‖ ≤ ‖q − r‖, and c(v) lies within ρ = ‖c(v) − (μ + s·k)‖ ≤ s√m / 2 of its grid point
(m coordinates), whatever v. The code distance D = ‖k_q − k_r‖² is an integer, which
8-bit integer products compute exactly (:class:`PixelProducts`), so

    s·√D − ρ_q − ρ_r  ≤  ‖c(q) − c(r)‖  ≤  ‖q − r‖.

Values far off the grid (a spectrum's empty bins are log 10⁻¹²) only make the bound looser for
their rows; every row's ρ stays under s√m / 2, and the search uses the largest ρ_r for all.

Per block of queries, the search:

1. computes D to every row (one integer product per block of ``ROW_BLOCK`` rows), and the smallest
   D of each group of ``GROUP`` rows;
2. takes as an upper bound the float64 distance to the row of smallest D;
3. keeps the rows whose lower bound does not exceed it (a few of 20,000 for zoo queries), looking
   only in groups whose smallest D is in reach: every row that could win or tie;
4. computes their float64 distances with a proven error, then brute force's own sum for the few
   within rounding of the smallest; the smallest wins, ties going to the lowest row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .pixel_products import PixelProducts
from .search import (
    BLOCK_BYTES,
    OwnRows,
    SearchResult,
    check_digests,
    closest_pairs,
    float64_slack,
    gamma,
    map_blocks,
)

CODE_LIMIT = 127  # codes are −127..127: signed digits for PixelProducts
GRID_STDS = 4.0  # the grid spans ± this many median per-coordinate standard deviations
GRID_SAMPLE = 4096  # evenly spaced rows a grid is fitted on
ROW_BLOCK = 2048  # rows per integer product: their packed codes stay in cache (fastest in a sweep)
QUERY_BLOCK = 256  # queries coded and scanned together (fastest in a sweep of 64..512 at 20,000 rows)
GROUP = 64  # rows whose smallest code distance is kept together (ROW_BLOCK is a multiple)
INT32_DIMS = 12_000  # up to this many coordinates every code-distance term fits int32
BAND_SLACK = 1e-9  # relative to the norms: float64's rounding in coordinates, codes and residuals


class _Grid:
    """n rows coded on one grid: their codes as :class:`PixelProducts` operands a block at a time,
    and per row the constant of its code distance and ‖r‖²; the largest ρ_r and ‖r − μ‖."""

    def __init__(self, read: Callable[[np.ndarray | slice], np.ndarray], n: int, dims: int, products) -> None:
        self.n, self.products = n, products
        self.key_type = np.int64 if dims > INT32_DIMS else np.int32
        self.no_row = np.iinfo(self.key_type).max
        picked = np.unique(np.linspace(0, n - 1, min(n, GRID_SAMPLE)).astype(np.int64))
        sample = read(picked)
        spread = float(np.median(sample.std(axis=0))) if len(sample) else 0.0
        self.mean = sample.mean(axis=0) if len(sample) else np.zeros(dims)
        self.step = GRID_STDS * spread / CODE_LIMIT if spread > 0 else 1.0
        self.operands, constants, squared, self.max_norm, self.max_residual = [], [], [], 0.0, 0.0
        for start in range(0, n, ROW_BLOCK):
            coords = read(slice(start, start + ROW_BLOCK))  # one read of the block, also from a file
            squared.append(np.einsum("ij,ij->i", coords, coords))
            codes, residuals, centred_norms = self.coded(coords)
            self.operands.append(products.operand(codes, signed=True))  # one shift for every block
            codes = codes.astype(np.int64)
            # D = ‖k_q‖² + ‖k_r‖² − 2k_q·k_r, and the products give Σ(k_q + 128)·k_r = k_q·k_r + 128Σk_r.
            constants.append(np.einsum("ij,ij->i", codes, codes) + 256 * codes.sum(axis=1))
            self.max_residual = max(self.max_residual, float(residuals.max()))
            self.max_norm = max(self.max_norm, float(centred_norms.max()))
        self.constants = np.concatenate(constants).astype(self.key_type) if constants else np.zeros(0, np.int64)
        self.row_squared = np.concatenate(squared) if squared else np.zeros(0)  # ‖r‖²_w, float64

    @property
    def nbytes(self) -> int:
        return sum(operand.data.nbytes for operand in self.operands) + self.row_squared.nbytes + self.constants.nbytes

    def coded(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, ρ, ‖v − μ‖) per row of (b, m) float64 coordinates v: the codes k = rint((v − μ)/s)
        clipped to ±127 (int8), and in float64 ρ = ‖c(v) − (μ + s·k)‖, c clipping v to the grid's
        range. One centred copy of the rows, worked on in place."""
        centred = coords - self.mean
        centred_norms = np.sqrt(np.einsum("ij,ij->i", centred, centred))
        codes = np.rint(centred / self.step)
        np.clip(codes, -CODE_LIMIT, CODE_LIMIT, out=codes)
        reach = CODE_LIMIT * self.step
        np.clip(centred, -reach, reach, out=centred)
        centred -= self.step * codes
        return codes.astype(np.int8), np.sqrt(np.einsum("ij,ij->i", centred, centred)), centred_norms

    def keys(self, coords: np.ndarray, excluded: tuple[np.ndarray, np.ndarray]):
        """For (b, m) query coordinates: keys (b, columns padded to whole groups) with D = key + the
        query's constant, ``no_row`` at the ``excluded`` (query, column) pairs and in the padding;
        each group's smallest key; the queries' constants, ρ_q and ‖q − μ‖."""
        codes, residuals, centred_norms = self.coded(coords)
        codes = codes.astype(np.int64)
        left = (codes + 128).astype(np.uint8)
        b, groups = len(coords), -(-self.n // GROUP)
        keys = np.empty((b, groups * GROUP), dtype=self.key_type)  # every row's column is written below
        keys[:, self.n :] = self.no_row  # the padding
        excluded_queries, excluded_columns = excluded
        order = np.argsort(excluded_columns, kind="stable")
        excluded_queries, excluded_columns = excluded_queries[order], excluded_columns[order]
        for block, operand in enumerate(self.operands):
            start = block * ROW_BLOCK
            key = keys[:, start : start + operand.data.shape[1] - 1]
            raw = self.products.products(left, operand).astype(self.key_type, copy=False)
            np.multiply(raw[:, :-1], -2, out=key, casting="unsafe")
            key += self.constants[start : start + key.shape[1]]
            here = slice(*np.searchsorted(excluded_columns, [start, start + key.shape[1]]))
            key[excluded_queries[here], excluded_columns[here] - start] = self.no_row
        smallest = keys.reshape(b, groups, GROUP).min(axis=2)
        # The ones column Σ(k_q + 128) undoes the operands' shift: D needs Σ(k_q + 128)·k_r.
        shift = self.operands[0].shift if self.operands else 0
        constant = np.einsum("ij,ij->i", codes, codes) + 2 * shift * left.sum(axis=1, dtype=np.int64)
        return keys, smallest, constant, residuals, centred_norms

    def lowest(self, keys: np.ndarray, smallest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(queries with a row not excluded, the column of their smallest key)."""
        group = smallest.argmin(axis=1)
        valid = np.flatnonzero(smallest[np.arange(len(keys)), group] < self.no_row)
        columns = group[valid, None] * GROUP + np.arange(GROUP)
        inside = keys[valid[:, None], columns].argmin(axis=1)
        return valid, columns[np.arange(len(valid)), inside]

    def thresholds(self, root: np.ndarray, band: float, constant: np.ndarray) -> np.ndarray:
        """(b, 1) largest keys of rows that can be within ``root`` − ρ_q of a query, ρ_r ≤ ``band``:
        s√D ≤ root + band."""
        limit = np.floor(np.square((root[:, None] + band) / self.step) * (1 + BAND_SLACK))
        limit -= constant[:, None]
        below = np.nextafter(np.float64(self.no_row), 0.0)  # int64's largest rounds up to 2⁶³ in float64
        return np.minimum(limit, below).astype(self.key_type)


class CodedSearch:
    """Exact k = 1 search over float rows, each coordinate multiplied by ``scale`` first.

    ``rows`` (n, m): an array or :class:`FileRows` (read a block at a time to code them, and for the
    few candidates' distances; the codes are held, one byte per coordinate). ``sha256`` (n,) S64
    lets a query skip the rows of its own file (leave-one-out). ``threads`` search blocks of
    queries at once (:func:`search.map_blocks`); ``kernel`` goes to :class:`PixelProducts`.
    ``terms``: how many squared differences brute force's distance adds (freq: the full vector's
    3·S², not the m stored bins), which sets how far its rounding may reach (:func:`float64_slack`).
    """

    def __init__(
        self,
        rows,
        sha256: np.ndarray,
        scale: np.ndarray | None = None,
        threads: int | None = None,
        kernel: str | None = None,
        terms: int | None = None,
    ) -> None:
        if threads is None:
            import faiss

            threads = faiss.omp_get_max_threads()
        self.rows, self.threads = rows, threads
        self.n, self.dims = rows.shape
        self.slack = float64_slack(terms or self.dims)  # brute force's rounding, relative
        self.scale = np.ones(self.dims) if scale is None else np.asarray(scale, dtype=np.float64)
        self._weights = np.square(self.scale)
        self.own_rows = OwnRows(sha256)
        products = PixelProducts(kernel)

        def read(ids: np.ndarray | slice) -> np.ndarray:
            coords = self._coordinates(rows[ids])
            _check_finite(coords, "rows")
            return coords

        self.grid = _Grid(read, self.n, self.dims, products)
        self.band = self.grid.max_residual  # the largest ρ_r, ≤ s√m / 2

    @property
    def nbytes(self) -> int:
        """Memory the search holds (codes, per-row constants, the SHA-256 lookup)."""
        return self.grid.nbytes + self.own_rows.nbytes

    def _coordinates(self, rows: np.ndarray) -> np.ndarray:
        return np.multiply(rows, self.scale, dtype=np.float64)  # one pass: float32 → float64 is exact

    def nearest(
        self,
        queries: np.ndarray,
        exact: Callable[[np.ndarray, np.ndarray], np.ndarray],
        offsets: np.ndarray | None = None,
        own_sha256: Sequence[str] | None = None,
    ) -> SearchResult:
        """Brute force's neighbour and float64 distance for each of (b, m) ``queries`` (unscaled,
        as the rows), given ``exact(query_ids, row_ids)``: brute force's float64 distance per pair.

        ``offsets`` (b,) ≥ 0 are added to every distance of a query (the part of freq's full vector
        distance that its pair means leave out: :func:`manifold.pair_means`).
        """
        b = len(queries)
        check_digests(own_sha256, b)
        offsets = np.zeros(b) if offsets is None else np.asarray(offsets, dtype=np.float64)
        ids, distances = np.full(b, -1, dtype=np.int64), np.full(b, np.inf)
        checked = np.zeros(b, dtype=np.int64)
        if not b or not self.n:
            return SearchResult(ids, distances, checked)
        block = max(1, min(QUERY_BLOCK, BLOCK_BYTES // (np.dtype(self.grid.key_type).itemsize * self.n)))
        parts = [slice(start, start + block) for start in range(0, b, block)]

        def search(part: slice):
            def exact_in_block(query_ids, row_ids):
                return exact(query_ids + part.start, row_ids)

            own = own_sha256[part] if own_sha256 is not None else None
            return self._nearest_block(queries[part], offsets[part], exact_in_block, own)

        for part, found in zip(parts, map_blocks(search, parts, self.threads)):
            ids[part], distances[part], checked[part] = found
        return SearchResult(ids, distances, checked)

    def _nearest_block(self, queries: np.ndarray, offsets: np.ndarray, exact, own_sha256):
        b = len(queries)
        coords = self._coordinates(queries)
        _check_finite(coords, "queries")
        keys, smallest, constant, query_residuals, centred_norms = self.grid.keys(
            coords, self.own_rows.pairs(own_sha256)
        )
        # Upper bound: the float64 distance to the row of smallest code distance.
        upper = np.full(b, np.inf)
        valid, columns = self.grid.lowest(keys, smallest)
        upper[valid] = self._bounds(queries, offsets, valid, columns)[1]

        # A row that wins or ties is within upper·(1 + κ) exactly, so within √(that − offset) in
        # the coordinates; ``rounding`` covers float64's in coordinates, codes and residuals.
        reach = np.sqrt(np.maximum(upper[valid] * (1 + 2 * self.slack) - offsets[valid] * (1 - self.slack), 0))
        query_norms = centred_norms[valid] + np.linalg.norm(self.grid.mean)
        rounding = BAND_SLACK * (query_norms + self.grid.max_norm + reach + 1)
        limit = self.grid.thresholds(reach + query_residuals[valid] + rounding, self.band, constant[valid])
        # Only in groups whose smallest key is within reach.
        hit_queries, hit_groups = np.nonzero(smallest[valid] <= limit)
        columns = hit_groups[:, None] * GROUP + np.arange(GROUP)
        cells = keys[valid[hit_queries, None], columns] <= limit[hit_queries]  # never a padding column
        pair_queries = valid[np.repeat(hit_queries, GROUP).reshape(-1, GROUP)[cells]]
        pair_rows = columns[cells]
        pair_queries, pair_rows = self._narrowed(queries, offsets, upper, pair_queries, pair_rows)
        ids, distances = closest_pairs(b, pair_queries, pair_rows, exact(pair_queries, pair_rows))
        return ids, distances, np.bincount(pair_queries, minlength=b)

    def _bounds(self, queries: np.ndarray, offsets: np.ndarray, query_ids: np.ndarray, row_ids: np.ndarray):
        """(lower, upper) float64 bounds on Σ w(r − q)² + offset per (query, row) pair (w = scale²),
        the exact value, and so within ``slack`` of brute force's.

        From ‖r‖²_w − 2 r·(w q) + ‖q‖²_w, one product per query: each float64 sum of m terms errs by
        at most γ_m times the sum of their magnitudes, so the whole by at most
        (2γ_{m+2} + 3u)(‖r‖²_w + ‖q‖²_w); 3γ_{m+3} covers it, and the offset's own rounding.
        """
        weighted = queries * self._weights
        query_squared = np.einsum("ij,ij->i", queries, weighted)
        dots = np.empty(len(row_ids))
        order = np.argsort(query_ids, kind="stable")
        starts = np.flatnonzero(np.diff(query_ids[order])) + 1
        step = max(1, BLOCK_BYTES // (8 * self.dims))  # rows in float64 at a time
        for of_query in np.split(order, starts):
            for start in range(0, len(of_query), step):
                pairs = of_query[start : start + step]
                rows = np.asarray(self.rows[row_ids[pairs]], dtype=np.float64)
                dots[pairs] = rows @ weighted[query_ids[pairs[0]]]
        squares = self.grid.row_squared[row_ids] + query_squared[query_ids]
        found = squares - 2 * dots + offsets[query_ids]
        error = 3 * gamma(self.dims + 3, 2.0**-53) * (squares + offsets[query_ids])
        return (found - error) * (1 - self.slack), (found + error) * (1 + self.slack)

    def _narrowed(self, queries, offsets, upper, query_ids: np.ndarray, row_ids: np.ndarray):
        """The (query, row) pairs that :meth:`_bounds` leave within reach of their query's best:
        the only ones brute force can rank first."""
        if not len(row_ids):
            return query_ids, row_ids
        lower, upper_pair = self._bounds(queries, offsets, query_ids, row_ids)
        best = upper.copy()
        np.minimum.at(best, query_ids, upper_pair)
        # Brute force's distance is within κ of the exact one: a pair ranks first only if
        # lower·(1 − κ) ≤ best·(1 + κ); the factors here are wider.
        keep = lower * (1 - 2 * self.slack) <= best[query_ids] * (1 + 2 * self.slack)
        return query_ids[keep], row_ids[keep]


def _check_finite(coords: np.ndarray, what: str) -> None:
    """Embeddings are finite by construction; an inf or NaN would silently void every bound."""
    if not np.isfinite(coords).all():
        raise ValueError(f"the code scan takes finite {what}; these hold inf or NaN")
