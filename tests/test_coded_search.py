"""The 8-bit code scan (manifpt_cli/coded_search.py) against float64 brute force on real photo crops."""

from __future__ import annotations

import numpy as np
import pytest

from manifpt_cli import coded_search
from manifpt_cli.coded_search import CodedSearch
from manifpt_cli.manifold import pair_means
from manifpt_cli.pixel_products import KERNELS
from manifpt_cli.spaces import PixelEmbedder, Space, symmetric_half

from .conftest import SIZE, SOURCES, degrade, photo_crops, threads_searching


def shas(n: int) -> np.ndarray:
    return np.array([b"%064d" % i for i in range(n)], dtype="S64")


def brute_force(database: np.ndarray, queries: np.ndarray, excluded=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 flat search on the full vectors; ties go to the lowest row; −1 / inf where all are excluded."""
    distances = np.square(queries[:, None, :].astype(np.float64) - database[None].astype(np.float64)).sum(-1)
    if excluded is not None:
        distances[excluded] = np.inf
    ids = np.where(np.isfinite(distances).any(axis=1), distances.argmin(axis=1), -1)
    return ids, distances.min(axis=1)


def pair_distances(rows: np.ndarray, queries: np.ndarray):
    """The search's ``exact`` callback: brute force's float64 distance of (query, row) pairs."""

    def exact(query_ids, row_ids):
        return np.square(np.subtract(rows[row_ids], queries[query_ids], dtype=np.float64)).sum(axis=1)

    return exact


class FreqRows:
    """freq embeddings of crops as the index stores and searches them: the unique half, √w scale."""

    def __init__(self, pixels: np.ndarray, kernel=None, sha256=None, threads: int = 1) -> None:
        self.half = symmetric_half(SIZE, SIZE)
        self.full = PixelEmbedder(Space.FREQ)(pixels)
        sha256 = shas(len(pixels)) if sha256 is None else sha256
        self.search = CodedSearch(self.half.fold(self.full), sha256, np.sqrt(self.half.weights), threads, kernel)

    def nearest(self, queries: np.ndarray, own=None):
        means, offsets = pair_means(self.half, queries)
        return self.search.nearest(means, pair_distances(self.full, queries), offsets, own)


@pytest.fixture(scope="module")
def crops() -> tuple[np.ndarray, np.ndarray]:
    """(reals, queries): crops of the bundled photos, one with a constant channel (its spectrum's
    empty bins are log ε, far off any grid), degraded crops of other regions, a query near the
    flat-channel crop and one far off the grid itself (a flat image blurred)."""
    reals = np.stack(photo_crops(12, seed=3))
    reals[5, :, :, 1] = 77
    rng = np.random.default_rng(4)
    queries = np.stack([degrade(SOURCES[i % 4], crop, rng) for i, crop in enumerate(photo_crops(3, seed=5))])
    near_flat_channel = reals[5].copy()
    near_flat_channel[:, :, 0] = np.clip(
        near_flat_channel[:, :, 0].astype(int) + rng.integers(-2, 3, (SIZE, SIZE)), 0, 255
    )
    flat = np.full((1, SIZE, SIZE, 3), 120, dtype=np.uint8)
    flat[0, 10:20, 10:20] = 140
    blurred = degrade("blur", flat[0], rng)[None]
    return reals, np.concatenate([queries, near_flat_channel[None], blurred])


@pytest.mark.parametrize("kernel", [None, *KERNELS])
def test_neighbours_and_distances_are_brute_forces(crops, kernel):
    reals, suspects = crops
    rows = FreqRows(reals, kernel)
    flat_channel = rows.search._coordinates(rows.search.rows[5:6])
    assert (np.abs(rows.search.grid.coded(flat_channel)[0]) == 127).any(), "its empty bins are off the grid"
    rng = np.random.default_rng(0)
    pairs = rng.choice(len(reals), (8, 2), replace=False)
    near_ties = ((rows.full[pairs[:, 0]].astype(np.float64) + rows.full[pairs[:, 1]]) / 2).astype(np.float32)
    asymmetric = rows.full[:4] + rng.normal(0, 1e-2, rows.full[:4].shape).astype(np.float32)
    queries = np.concatenate([PixelEmbedder(Space.FREQ)(suspects), near_ties, asymmetric])
    found = rows.nearest(queries)
    ids, distances = brute_force(rows.full, queries)
    assert np.array_equal(found.ids, ids)
    assert np.array_equal(found.distances, distances), "the same float64 sum as brute force"
    assert found.ids[len(suspects) - 2] == 5, "the query near the flat-channel crop finds it"
    assert found.checked.mean() < len(reals) / 4, "the band rules out most rows"


def test_rows_the_grid_cannot_tell_apart_tie_to_the_lowest_row(crops):
    """Copies and copies moved by far less than a grid step share their codes: the float64 check decides."""
    reals, _ = crops
    base = PixelEmbedder(Space.FREQ)(reals[:1])
    half = symmetric_half(SIZE, SIZE)
    rng = np.random.default_rng(1)
    stored = half.fold(np.repeat(base, 40, axis=0))
    stored[10:] += rng.normal(0, 1e-5, stored[10:].shape).astype(np.float32)
    stored[3] = stored[7] = stored[0]  # rows 0, 3 and 7: one tie
    full = half.unfold(stored)
    search = CodedSearch(stored, shas(len(stored)), np.sqrt(half.weights), 1)
    queries = np.concatenate([full[[0, 25]], full[[25]] + np.float32(1e-6)])
    means, offsets = pair_means(half, queries)
    exact = pair_distances(full, queries)
    found = search.nearest(means, exact, offsets)
    ids, distances = brute_force(full, queries)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert found.ids[0] == 0 and found.distances[0] == 0


def test_leave_one_out_skips_the_querys_own_rows(crops):
    reals, _ = crops
    own = shas(len(reals) + 1)
    own[-1] = own[2]  # the last row is a copy of row 2, of the same file
    rows = FreqRows(np.concatenate([reals, reals[2:3]]), sha256=own)
    sha_text = [sha.decode() for sha in own]
    found = rows.nearest(rows.full, sha_text)
    excluded = own[:, None] == own[None, :]
    ids, distances = brute_force(rows.full, rows.full, excluded)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert (found.ids != np.arange(len(own))).all() and found.ids[2] not in (2, len(reals))
    alone = CodedSearch(rows.search.rows[:1], own[:1], rows.search.scale, 1)
    means, offsets = pair_means(rows.half, rows.full[:1])
    found = alone.nearest(means, lambda q, r: np.zeros(len(r)), offsets, sha_text[:1])
    assert found.ids.tolist() == [-1] and found.distances.tolist() == [np.inf], "every row is the query's own"


def test_blocks_searched_on_two_threads_keep_their_queries_and_exclusions(crops, monkeypatch):
    """With two threads, blocks of queries are searched at once: each query's offset, exact
    distances and own rows must stay its own, whichever block and thread it lands in."""
    monkeypatch.setattr(coded_search, "QUERY_BLOCK", 2)
    searched_in = threads_searching(monkeypatch, CodedSearch)
    reals, suspects = crops
    rows = FreqRows(reals, threads=2)
    rng = np.random.default_rng(1)
    asymmetric = rows.full[:4] + rng.normal(0, 1e-2, rows.full[:4].shape).astype(np.float32)
    queries = np.concatenate([PixelEmbedder(Space.FREQ)(suspects), rows.full[3:7], asymmetric])
    own = [sha.decode() for sha in shas(len(reals))[[0] * len(suspects) + [3, 4, 5, 6] + [9] * 4]]
    found = rows.nearest(queries, own)
    excluded = np.zeros((len(queries), len(reals)), dtype=bool)
    excluded[: len(suspects), 0] = True
    excluded[np.arange(len(suspects), len(suspects) + 4), [3, 4, 5, 6]] = True
    excluded[len(suspects) + 4 :, 9] = True
    ids, distances = brute_force(rows.full, queries, excluded)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert searched_in == {True}, "every block in the pool's threads"


def test_without_the_residuals_in_the_bound_true_neighbours_are_lost(monkeypatch):
    """The band is what makes the scan exact: bounding by code distances alone loses neighbours."""
    rng = np.random.default_rng(2)
    rows = rng.normal(0, 1, (400, 24)).astype(np.float32)
    queries = (rows[:200] + rng.normal(0, 0.6, (200, 24))).astype(np.float32)
    exact = pair_distances(rows, queries)
    ids, distances = brute_force(rows, queries)
    found = CodedSearch(rows, shas(len(rows)), threads=1).nearest(queries, exact)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    coded = coded_search._Grid.coded

    def without_residuals(self, coords):
        codes, residuals, norms = coded(self, coords)
        return codes, np.zeros_like(residuals), norms

    monkeypatch.setattr(coded_search._Grid, "coded", without_residuals)
    monkeypatch.setattr(coded_search, "GRID_STDS", 40.0)  # a coarse grid: many rows share a code distance
    careless = CodedSearch(rows, shas(len(rows)), threads=1).nearest(queries, exact)
    assert not np.array_equal(careless.ids, ids)


def test_many_coordinates_use_wide_keys():
    """Past INT32_DIMS coordinates the code distances are summed in int64 (freq at 128 px and up)."""
    rng = np.random.default_rng(3)
    dims = coded_search.INT32_DIMS + 100
    rows = rng.normal(0, 1, (12, dims)).astype(np.float32)
    rows[4] = rows[9]
    queries = np.concatenate([rows[[9, 1]], rows[:2] + rng.normal(0, 0.5, (2, dims)).astype(np.float32)])
    search = CodedSearch(rows, shas(len(rows)), threads=1)
    assert search.grid.key_type is np.int64
    exact = pair_distances(rows, queries)
    found = search.nearest(queries, exact)
    ids, distances = brute_force(rows, queries)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert found.ids[0] == 4, "a tie goes to the lowest row"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_block_of_non_negative_codes_gets_the_same_shift(kernel):
    """A block whose codes are all ≥ 0 would get another operand shift than block 0 by default:
    its code distances would be off (found by a review)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (coded_search.ROW_BLOCK + 1, 16)).astype(np.float32)
    rows[-1] = 3.0
    queries = (rows[-1:] + rng.normal(0, 0.05, (1, 16))).astype(np.float32)
    exact = pair_distances(rows, queries)
    found = CodedSearch(rows, shas(len(rows)), threads=1, kernel=kernel).nearest(queries, exact)
    ids, distances = brute_force(rows, queries)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert found.ids[0] == len(rows) - 1


def test_a_query_far_off_the_grid_with_wide_keys():
    """Its key threshold is past int64's range in float64: it is capped below it, not wrapped."""
    rng = np.random.default_rng(3)
    rows = rng.normal(0, 1, (12, coded_search.INT32_DIMS + 100)).astype(np.float32)
    queries = rows[:2].copy()
    queries[:, 0] += np.float32(1e8)
    exact = pair_distances(rows, queries)
    found = CodedSearch(rows, shas(len(rows)), threads=1).nearest(queries, exact)
    ids, distances = brute_force(rows, queries)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)


def test_non_finite_rows_or_queries_are_refused():
    rows = np.ones((3, 4), dtype=np.float32)
    rows[1, 2] = np.inf
    with pytest.raises(ValueError, match="finite rows"):
        CodedSearch(rows, shas(3), threads=1)
    search = CodedSearch(np.ones((3, 4), dtype=np.float32), shas(3), threads=1)
    with pytest.raises(ValueError, match="finite queries"):
        search.nearest(np.full((1, 4), np.nan, dtype=np.float32), lambda q, r: np.zeros(len(r)))
