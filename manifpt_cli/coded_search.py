"""Exact nearest real image (k = 1, squared L2) among float rows (freq's log spectra) by a scan of
8-bit codes with a proven error band, then brute force's float64 distance for the rows it leaves.

Log spectra lie far from any low-dimensional subspace (a PCA bound over 64 of freq's 1,542
coordinates still keeps two thirds of the rows), so every row has to be looked at, but not at full
precision. Every coordinate is coded on one grid, v ≈ μ + s·k with k an integer in −127..127 (μ the
rows' mean, s one step for all coordinates), and each row keeps its residual ρ_r = ‖r − (μ + s·k_r)‖.
A query is coded the same way (ρ_q). The code distance D = ‖k_q − k_r‖² is an integer, which
8-bit integer products compute exactly (:class:`PixelProducts`), and the triangle inequality gives

    s·√D − ρ_q − ρ_r  ≤  ‖q − r‖  ≤  s·√D + ρ_q + ρ_r.

Per block of queries, the search:

1. computes D to every row (one integer product per block of ``ROW_BLOCK`` rows), and the smallest
   D of each group of ``GROUP`` rows;
2. takes as an upper bound the float64 distance to the row of smallest D;
3. keeps the rows whose lower bound does not exceed it (a few dozen of 20,000 for zoo queries),
   looking only in groups whose smallest D is in reach: every row that could win or tie;
4. computes their float64 distances, then brute force's for the few within rounding of the
   smallest (:data:`search.FLOAT64_SLACK`); the smallest wins, ties going to the lowest row.

One step s for all coordinates keeps D an integer. Values off the grid (a spectrum's empty bins are
log ε) are clipped, and their rows' ρ_r grows without bound. So the rows whose ρ_r is over
``OUTLIER_FACTOR`` times the median are coded again on a grid of their own, each with its own ρ_r
in the bound; all the other rows share one ρ_r, the largest among them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .pixel_products import PixelProducts
from .search import BLOCK_BYTES, FLOAT64_SLACK, OwnRows, SearchResult, closest_pairs, gamma

CODE_LIMIT = 127  # codes are −127..127: signed digits for PixelProducts
GRID_STDS = 4.0  # the grid spans ± this many median per-coordinate standard deviations
GRID_SAMPLE = 4096  # evenly spaced rows a grid is fitted on
ROW_BLOCK = 2048  # rows per integer product: their packed codes stay in cache (fastest in a sweep)
QUERY_BLOCK = 256  # queries coded and scanned together (fastest in a sweep of 64..512 at 20,000 rows)
GROUP = 64  # rows whose smallest code distance is kept together (ROW_BLOCK is a multiple)
OUTLIER_FACTOR = 1.5  # rows with a residual over this many medians go on a grid of their own
INT32_DIMS = 12_000  # up to this many coordinates every code-distance term fits int32
BAND_SLACK = 1e-9  # relative to the norms: float64's rounding in coordinates, codes and residuals


class _Grid:
    """Rows ``ids`` coded on one grid: their codes as :class:`PixelProducts` operands a block at a
    time, and per row the constant of its code distance, ρ_r and ‖r − μ‖."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, dims: int, products) -> None:
        self.ids, self.products = ids, products
        self.key_type = np.int64 if dims > INT32_DIMS else np.int32
        self.no_row = np.iinfo(self.key_type).max
        picked = ids[np.unique(np.linspace(0, len(ids) - 1, min(len(ids), GRID_SAMPLE)).astype(np.int64))]
        sample = read(picked)
        spread = float(np.median(sample.std(axis=0))) if len(sample) else 0.0
        self.mean = sample.mean(axis=0) if len(sample) else np.zeros(dims)
        self.step = GRID_STDS * spread / CODE_LIMIT if spread > 0 else 1.0
        self.operands, constants, residuals, squared, self.max_norm = [], [], [], [], 0.0
        for start in range(0, len(ids), ROW_BLOCK):
            coords = read(ids[start : start + ROW_BLOCK])
            codes = self.codes(coords)
            self.operands.append(products.operand(codes))
            codes = codes.astype(np.int64)
            # D = ‖k_q‖² + ‖k_r‖² − 2k_q·k_r, and the products give Σ(k_q + 128)·k_r = k_q·k_r + 128Σk_r.
            constants.append(np.einsum("ij,ij->i", codes, codes) + 256 * codes.sum(axis=1))
            residuals.append(self.residuals(coords, codes))
            squared.append(np.einsum("ij,ij->i", coords, coords))
            self.max_norm = max(self.max_norm, float(np.linalg.norm(coords - self.mean, axis=1).max()))
        self.constants = np.concatenate(constants).astype(self.key_type) if constants else np.zeros(0, np.int64)
        self.row_residuals = np.concatenate(residuals) if residuals else np.zeros(0)
        self.row_squared = np.concatenate(squared) if squared else np.zeros(0)  # ‖r‖²_w, float64

    @property
    def nbytes(self) -> int:
        held = sum(operand.data.nbytes for operand in self.operands) + self.row_squared.nbytes
        return held + self.ids.nbytes + self.constants.nbytes + self.row_residuals.nbytes

    def codes(self, coords: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((coords - self.mean) / self.step), -CODE_LIMIT, CODE_LIMIT).astype(np.int8)

    def residuals(self, coords: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """ρ = ‖v − (μ + s·k)‖ per row, in float64."""
        return np.linalg.norm(coords - self.mean - self.step * codes, axis=1)

    def keys(self, coords: np.ndarray, excluded: tuple[np.ndarray, np.ndarray]):
        """For (b, m) query coordinates: keys (b, columns padded to whole groups) with D = key + the
        query's constant, ``no_row`` at the ``excluded`` (query, column) pairs and in the padding;
        each group's smallest key; the queries' constants and ρ_q."""
        codes = self.codes(coords).astype(np.int64)
        left = (codes + 128).astype(np.uint8)
        b, groups = len(coords), -(-len(self.ids) // GROUP)
        keys = np.full((b, groups * GROUP), self.no_row, dtype=self.key_type)
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
        return keys, smallest, constant, self.residuals(coords, codes)

    def lowest(self, keys: np.ndarray, smallest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(queries with a row not excluded, the column of their smallest key)."""
        group = smallest.argmin(axis=1)
        valid = np.flatnonzero(smallest[np.arange(len(keys)), group] < self.no_row)
        columns = group[valid, None] * GROUP + np.arange(GROUP)
        inside = keys[valid[:, None], columns].argmin(axis=1)
        return valid, columns[np.arange(len(valid)), inside]

    def thresholds(self, root: np.ndarray, row_residuals: np.ndarray, constant: np.ndarray) -> np.ndarray:
        """Largest key of a row that can be within ``root`` − ρ_r of the query: s√D ≤ root + ρ_r."""
        limit = np.floor(np.square((root[:, None] + row_residuals) / self.step) * (1 + BAND_SLACK))
        limit -= constant[:, None]
        return np.minimum(limit, self.no_row - 1).astype(self.key_type)


class CodedSearch:
    """Exact k = 1 search over float rows, each coordinate multiplied by ``scale`` first.

    ``rows`` (n, m): an array or :class:`FileRows` (read a block at a time to code them, and for the
    few candidates' distances; the codes are held, one byte per coordinate). ``sha256`` (n,) S64
    lets a query skip the rows of its own file (leave-one-out). ``threads`` and ``kernel`` go to
    :class:`PixelProducts`.
    """

    def __init__(
        self,
        rows,
        sha256: np.ndarray,
        scale: np.ndarray | None = None,
        threads: int | None = None,
        kernel: str | None = None,
    ) -> None:
        if threads is None:
            import faiss

            threads = faiss.omp_get_max_threads()
        self.rows = rows
        self.n, self.dims = rows.shape
        self.scale = np.ones(self.dims) if scale is None else np.asarray(scale, dtype=np.float64)
        self._weights = np.square(self.scale)
        self.own_rows = OwnRows(sha256)
        products = PixelProducts(threads, kernel)

        def read(ids: np.ndarray) -> np.ndarray:
            return self._coordinates(rows[ids])

        self.grid = _Grid(read, np.arange(self.n), self.dims, products)
        median = float(np.median(self.grid.row_residuals)) if self.n else 0.0
        self.outliers = np.flatnonzero(self.grid.row_residuals > OUTLIER_FACTOR * median)
        self.band = float(np.delete(self.grid.row_residuals, self.outliers).max(initial=0.0))
        self.outlier_grid = _Grid(read, self.outliers, self.dims, products)

    @property
    def nbytes(self) -> int:
        """Memory the search holds (codes, per-row constants and residuals, the SHA-256 lookup)."""
        return self.grid.nbytes + self.outlier_grid.nbytes + self.own_rows.nbytes

    def _coordinates(self, rows: np.ndarray) -> np.ndarray:
        return rows.astype(np.float64) * self.scale

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
        offsets = np.zeros(b) if offsets is None else np.asarray(offsets, dtype=np.float64)
        ids, distances = np.full(b, -1, dtype=np.int64), np.full(b, np.inf)
        checked = np.zeros(b, dtype=np.int64)
        if not b or not self.n:
            return SearchResult(ids, distances, checked)
        block = max(1, min(QUERY_BLOCK, BLOCK_BYTES // (np.dtype(self.grid.key_type).itemsize * self.n)))
        for start in range(0, b, block):
            part = slice(start, start + block)
            own = own_sha256[part] if own_sha256 is not None else None

            def exact_in_block(query_ids, row_ids, start=start):
                return exact(query_ids + start, row_ids)

            ids[part], distances[part], checked[part] = self._nearest_block(
                queries[part], offsets[part], exact_in_block, own
            )
        return SearchResult(ids, distances, checked)

    def _nearest_block(self, queries: np.ndarray, offsets: np.ndarray, exact, own_sha256):
        b = len(queries)
        coords = self._coordinates(queries)
        own_queries, own_rows = self.own_rows.pairs(own_sha256)
        # Both grids skip each query's own rows. The main grid's band does not cover the outliers:
        # it may or may not keep them, and the outlier grid does whatever it does.
        keys, smallest, constant, query_residuals = self.grid.keys(coords, (own_queries, own_rows))
        outlier_at = np.minimum(np.searchsorted(self.outliers, own_rows), max(len(self.outliers) - 1, 0))
        own_outliers = (
            self.outliers[outlier_at] == own_rows if len(self.outliers) else np.zeros(len(own_rows), dtype=bool)
        )
        outlier_keys, outlier_smallest, outlier_constant, outlier_query_residuals = self.outlier_grid.keys(
            coords, (own_queries[own_outliers], outlier_at[own_outliers])
        )

        # Upper bound: the float64 distance to the row of smallest code distance.
        upper = np.full(b, np.inf)
        valid, columns = self.grid.lowest(keys, smallest)
        upper[valid] = self._bounds(queries, offsets, valid, columns)[1]

        # A row that wins or ties is within upper·(1 + κ) exactly, so within √(that − offset) in
        # the coordinates; ``rounding`` covers float64's in coordinates, codes and residuals.
        reach = np.sqrt(np.maximum(upper[valid] * (1 + 2 * FLOAT64_SLACK) - offsets[valid] * (1 - FLOAT64_SLACK), 0))
        query_norms = np.linalg.norm(coords[valid] - self.grid.mean, axis=1) + np.linalg.norm(self.grid.mean)
        rounding = BAND_SLACK * (query_norms + self.grid.max_norm + self.outlier_grid.max_norm + reach + 1)

        # Regular rows: only in groups whose smallest key is within the shared band's threshold.
        limit = self.grid.thresholds(reach + query_residuals[valid] + rounding, np.array([self.band]), constant[valid])
        hit_queries, hit_groups = np.nonzero(smallest[valid] <= limit)
        columns = hit_groups[:, None] * GROUP + np.arange(GROUP)
        cells = keys[valid[hit_queries, None], columns] <= limit[hit_queries]  # never a padding column
        pair_queries = valid[np.repeat(hit_queries, GROUP).reshape(-1, GROUP)[cells]]
        pair_rows = columns[cells]
        if len(self.outliers):
            root = reach + outlier_query_residuals[valid] + rounding
            limits = self.outlier_grid.thresholds(root, self.outlier_grid.row_residuals, outlier_constant[valid])
            hits, columns = np.nonzero(outlier_keys[valid, : len(self.outliers)] <= limits)
            pair_queries = np.concatenate([pair_queries, valid[hits]])
            pair_rows = np.concatenate([pair_rows, self.outliers[columns]])
        pair_queries, pair_rows = self._narrowed(queries, offsets, upper, *_distinct(pair_queries, pair_rows))
        ids, distances = closest_pairs(b, pair_queries, pair_rows, exact(pair_queries, pair_rows))
        return ids, distances, np.bincount(pair_queries, minlength=b)

    def _bounds(self, queries: np.ndarray, offsets: np.ndarray, query_ids: np.ndarray, row_ids: np.ndarray):
        """(lower, upper) float64 bounds on Σ w(r − q)² + offset per (query, row) pair (w = scale²),
        the exact value, and so within FLOAT64_SLACK of brute force's.

        From ‖r‖²_w − 2 r·(w q) + ‖q‖²_w, one product per query: each float64 sum of m terms errs by
        at most γ_m times the sum of their magnitudes, so the whole by at most
        (2γ_{m+2} + 3u)(‖r‖²_w + ‖q‖²_w); 3γ_{m+3} covers it, and the offset's own rounding.
        """
        weighted = queries * self._weights
        query_squared = np.einsum("ij,ij->i", queries, weighted)
        dots = np.empty(len(row_ids))
        order = np.argsort(query_ids, kind="stable")
        starts = np.flatnonzero(np.diff(query_ids[order])) + 1
        for pairs in np.split(order, starts):
            if len(pairs):
                rows = np.asarray(self.rows[row_ids[pairs]], dtype=np.float64)
                dots[pairs] = rows @ weighted[query_ids[pairs[0]]]
        squares = self.grid.row_squared[row_ids] + query_squared[query_ids]
        found = squares - 2 * dots + offsets[query_ids]
        error = 3 * gamma(self.dims + 3, 2.0**-53) * (squares + offsets[query_ids])
        return (found - error) * (1 - FLOAT64_SLACK), (found + error) * (1 + FLOAT64_SLACK)

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
        keep = lower * (1 - 2 * FLOAT64_SLACK) <= best[query_ids] * (1 + 2 * FLOAT64_SLACK)
        return query_ids[keep], row_ids[keep]


def _distinct(query_ids: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (query, row) pairs without repeats (an outlier can be kept by both grids)."""
    if not len(row_ids):
        return query_ids, row_ids
    order = np.lexsort((row_ids, query_ids))
    query_ids, row_ids = query_ids[order], row_ids[order]
    first = np.r_[True, (query_ids[1:] != query_ids[:-1]) | (row_ids[1:] != row_ids[:-1])]
    return query_ids[first], row_ids[first]
