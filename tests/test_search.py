"""Exact nearest-neighbour search (manifpt_cli/search.py) against brute force on real photo crops."""

from __future__ import annotations

import numpy as np
import pytest

from manifpt_cli.pixel_products import COLUMN_CHUNK, KERNELS, PixelProducts, is_exact, pixel_squares
from manifpt_cli.search import ExactSearch, OwnRows, SearchPlan, _augmented, fit_plan, project_rows
from manifpt_cli.spaces import PixelEmbedder, Space

from .conftest import SOURCES, degrade, photo_crops, threads_searching

DIMS = 24


@pytest.fixture(autouse=True)
def narrow_window(monkeypatch):
    """A few rows either side of a block's first coordinates, so that the window's sides are
    searched here (at the default every row of these small sets is in the first part)."""
    import manifpt_cli.search as search_module

    monkeypatch.setattr(search_module, "WINDOW_ROWS", 4)


@pytest.fixture(scope="module")
def crops() -> tuple[np.ndarray, np.ndarray]:
    """(reals, queries): uint8 crops of the bundled photos, and degraded crops of other regions."""
    reals = np.stack(photo_crops(20, seed=3))
    rng = np.random.default_rng(4)
    queries = np.stack([degrade(SOURCES[i % 4], crop, rng) for i, crop in enumerate(photo_crops(2, seed=5))])
    return reals, queries


def pca_plan(embeddings: np.ndarray, dims: int = DIMS) -> SearchPlan:
    mean = embeddings.astype(np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    return SearchPlan(mean, vt[:dims])


def searcher(
    pixels: np.ndarray, plan_kind: str, sha256=None, kernel=None, threads: int = 1
) -> tuple[ExactSearch, np.ndarray]:
    """The rgb search over ``pixels`` with a full-SVD basis ("pca") or the seeded one of index
    builds ("fit"), and its rows' embeddings."""
    embeddings = PixelEmbedder(Space.RGB)(pixels)
    rows = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1))
    plan = pca_plan(embeddings) if plan_kind == "pca" else fit_plan(rows, DIMS)
    if sha256 is None:
        sha256 = np.array([b"%064d" % i for i in range(len(pixels))], dtype="S64")
    projected, norms = project_rows(plan, rows)
    return ExactSearch(rows, plan, projected, norms, sha256, (8, DIMS), threads, kernel), embeddings


def brute_force(database: np.ndarray, queries: np.ndarray, excluded=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 flat search; ties go to the lowest row (argmin's first minimum)."""
    distances = np.square(queries[:, None, :].astype(np.float64) - database[None].astype(np.float64)).sum(-1)
    if excluded is not None:
        distances[excluded] = np.inf
    return distances.argmin(axis=1), distances.min(axis=1)


@pytest.mark.parametrize(("plan_kind", "kernel"), [("pca", None), ("fit", None), *(("fit", k) for k in KERNELS)])
def test_neighbours_and_distances_are_brute_forces(crops, plan_kind, kernel):
    reals, queries = crops
    search, database = searcher(reals, plan_kind, kernel=kernel)
    query_vectors = PixelEmbedder(Space.RGB)(queries)
    found = search.nearest(query_vectors)
    ids, distances = brute_force(database, query_vectors)
    assert np.array_equal(found.ids, ids)
    assert np.array_equal(found.distances, distances), "the same float64 sum as brute force"
    assert found.checked.mean() < len(reals) / 2, "the bound prunes"


def test_exact_ties_go_to_the_lowest_row_and_near_ties_to_the_nearer(crops):
    reals, queries = crops
    reals = reals.copy()
    reals[200] = reals[40]  # the same image under another file (other SHA-256): a tie
    reals[300] = reals[41]
    reals[301] = reals[41]
    reals[301, 5, 5, 0] = min(int(reals[41, 5, 5, 0]) + 1, 254)  # one pixel one step further...
    probe = reals[301].copy()
    probe[5, 5, 0] += 1  # ...so this probe is nearer to row 301 than to row 41 or 300
    search, database = searcher(reals, "pca")
    targets = np.stack([reals[40], reals[200], probe])
    noisy = targets.copy()
    noisy[:, 0, 0, :] ^= 1  # not a copy of any real: a tie between rows 40 and 200
    query_vectors = PixelEmbedder(Space.RGB)(np.concatenate([targets, noisy]))
    found = search.nearest(query_vectors)
    ids, distances = brute_force(database, query_vectors)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert list(found.ids[:2]) == [40, 40] and found.ids[3] == 40
    assert found.ids[2] == 301


def test_leave_one_out_skips_every_row_of_the_querys_file(crops):
    reals = crops[0].copy()
    reals[100] = reals[7]  # the same file twice: both rows carry its SHA-256
    sha256 = np.array([b"%064d" % i for i in range(len(reals))], dtype="S64")
    sha256[100] = sha256[7]
    search, database = searcher(reals, "pca", sha256)
    rows = np.array([7, 8, 9, 100])
    own = [s.decode() for s in sha256[rows]]
    found = search.nearest(database[rows], own)
    excluded = sha256[None, :] == sha256[rows][:, None]
    ids, distances = brute_force(database, database[rows], excluded)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert not np.isin(found.ids, [7, 100]).any() and (found.distances > 0).all()
    alone = searcher(reals[[7, 100]], "pca", sha256[[7, 100]])[0].nearest(database[:1], [sha256[7].decode()])
    assert alone.ids[0] == -1 and np.isinf(alone.distances[0]), "no neighbour but the image itself"


def test_own_rows_are_every_row_of_each_querys_digest_in_row_order():
    rng = np.random.default_rng(6)
    sha256 = np.array([b"%064x" % v for v in rng.integers(0, 30, 200)], dtype="S64")  # many repeats
    own = [f"{v:064x}" for v in rng.integers(0, 40, 50)]  # some in the index, some not, some twice
    queries, rows = OwnRows(sha256).pairs(own)
    expected = [(i, row) for i, digest in enumerate(own) for row in np.flatnonzero(sha256 == digest.encode())]
    assert list(zip(queries.tolist(), rows.tolist())) == expected and len(expected) > len(own)
    assert [len(found) for found in OwnRows(sha256).pairs([])] == [0, 0]
    # Not digests: a longer string owns no row (not the row its first 64 characters name), nor does
    # a non-ASCII one.
    known = sha256[0].decode()
    queries, rows = OwnRows(sha256).pairs([known + "0", "é" * 64, known])
    assert queries.tolist() == [2] * int((sha256 == sha256[0]).sum())


def lower_bound(plan: SearchPlan, a: np.ndarray, b: np.ndarray, dims: int = DIMS) -> np.ndarray:
    return np.square(_augmented(*plan.project(a), dims)[0] - _augmented(*plan.project(b), dims)[0]).sum(axis=1)


def bound_violations(bound: np.ndarray, a: np.ndarray, b: np.ndarray) -> int:
    exact = np.square(a.astype(np.float64) - b.astype(np.float64)).sum(axis=1)
    return int((bound > exact * (1 + 1e-12)).sum())


def test_the_bound_never_exceeds_the_distance_and_the_check_catches_one_that_does(crops):
    reals, queries = crops
    for space in (Space.RGB, Space.FREQ):
        embeddings = PixelEmbedder(space)(reals)
        plan = pca_plan(embeddings)
        a, b = embeddings[:120], embeddings[120:240]
        assert bound_violations(lower_bound(plan, a, b), a, b) == 0
        assert bound_violations(lower_bound(plan, a, b, 4), a, b) == 0, "leading coordinates: a looser bound"
        assert bound_violations(lower_bound(plan, a, b) * 1.5, a, b) > 0, "a too large bound is detected"


def test_a_too_large_bound_would_prune_the_true_neighbour(crops, monkeypatch):
    """The search depends on its margin: with the bound inflated it misses neighbours (so the
    comparison tests above can fail)."""
    import manifpt_cli.search as search_module

    reals, queries = crops
    query_vectors = PixelEmbedder(Space.RGB)(queries)
    monkeypatch.setattr(search_module, "_lower_bound_margin", lambda dims: -0.5)
    search, database = searcher(reals, "pca")
    ids, _ = brute_force(database, query_vectors)
    assert not np.array_equal(search.nearest(query_vectors).ids, ids)


def test_the_window_bounds_fewer_rows_and_a_narrower_one_would_miss_neighbours(crops, monkeypatch):
    """Stage 1 bounds only the rows whose first coordinate can be near enough (the others are
    never looked at), and the window depends on its radius: shrunk, it drops true neighbours."""
    import manifpt_cli.search as search_module

    reals, queries = crops
    monkeypatch.setattr(search_module, "QUERY_BLOCK", 2)  # a block's first coordinates close together
    search, database = searcher(reals, "fit")
    query_vectors = PixelEmbedder(Space.RGB)(queries)
    bounded = []
    first_bound = search._bound

    def spy(stage, *args, **kwargs):
        if stage is search.stages[0]:
            bounded.append(len(args[3]))
        return first_bound(stage, *args, **kwargs)

    monkeypatch.setattr(search, "_bound", spy)
    found = search.nearest(query_vectors)
    ids, distances = brute_force(database, query_vectors)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    blocks = -(-len(queries) // search_module.QUERY_BLOCK)
    assert sum(bounded) < 0.9 * blocks * len(reals), "the window leaves rows out"
    monkeypatch.setattr(search_module, "_window_radius", lambda reach, widen: 0.1 * np.sqrt(reach))
    assert not np.array_equal(search.nearest(query_vectors).ids, ids)


class SaturatingProducts(PixelProducts):
    """What an AVX2 u8 × s8 kernel without VNNI computes: pairs of products summed in saturating int16."""

    def dots(self, rows, operand):
        pairs = rows.astype(np.int64)[:, None, :] * operand.data.T.astype(np.int64)[None, :, :]
        pairs = pairs.reshape(*pairs.shape[:2], -1, 2).sum(axis=-1)
        total = np.clip(pairs, -(2**15), 2**15 - 1).sum(axis=-1)
        return total[:, :-1] - operand.shift * total[:, -1:]


def test_a_saturating_kernel_is_caught_and_every_kernel_here_is_exact(crops):
    saturating = SaturatingProducts(kernel="u8s8")
    assert not is_exact(saturating)
    pixels = crops[0].reshape(len(crops[0]), -1)[:50]
    exact = pixels[:30].astype(np.int64) @ pixels[30:].T.astype(np.int64)
    found = saturating.dots(pixels[:30], saturating.operand(pixels[30:]))
    assert not np.array_equal(found, exact), "photos saturate it too"
    digits = np.random.default_rng(1).integers(-127, 128, (20, pixels.shape[1]))
    wide = np.random.default_rng(0).integers(0, 256, (4, 2 * COLUMN_CHUNK + 7), dtype=np.uint8)  # 256 px is 6 chunks
    wide[0] = 255  # where an int32 accumulator over all columns would overflow
    wide_exact = wide.astype(np.int64) @ wide.T.astype(np.int64)
    for kernel in KERNELS:
        products = PixelProducts(kernel=kernel)
        assert is_exact(products)
        assert np.array_equal(products.dots(pixels[:30], products.operand(pixels[30:])), exact)
        assert np.array_equal(products.dots(wide, products.operand(wide)), wide_exact)
        assert np.array_equal(products.dots(pixels, products.operand(digits)), pixels.astype(np.int64) @ digits.T)
    assert PixelProducts().kernel in KERNELS


def test_pixel_squares_are_exact_at_the_widths_where_int32_would_overflow():
    """All-255 rows are the largest ‖p‖²: int32 holds them up to COLUMN_CHUNK columns, and the
    wider rows (256 px rgb is 6 chunks) are summed in int64."""
    for width in (COLUMN_CHUNK, COLUMN_CHUNK + 1, 6 * COLUMN_CHUNK):
        pixels = np.full((2, width), 255, dtype=np.uint8)
        pixels[1, ::3] = 7
        expected = [sum(int(p) ** 2 for p in row) for row in pixels]
        squares = pixel_squares(pixels)
        assert squares.dtype == np.int64 and squares.tolist() == expected
    assert 255**2 * 6 * COLUMN_CHUNK > 2**31 - 1, "the widest rows would wrap in int32"


def test_only_pixel_rows_and_pixel_queries_are_searched(crops):
    search, database = searcher(crops[0], "pca")
    with pytest.raises(ValueError, match="8-bit pixel"):
        search.nearest(database[:2] + np.float32(1e-3))
    with pytest.raises(ValueError, match="uint8 pixel rows"):
        ExactSearch(database, search.plan, *project_rows(search.plan, database), search.own_rows.sorted)


@pytest.mark.parametrize("threads", [1, 2])
def test_queries_blocked_by_brightness_keep_their_own_neighbours_and_exclusions(crops, monkeypatch, threads):
    """Queries are searched in blocks of alike ones (ordered by brightness), on two threads at
    once where there are two: each must still get its own neighbour, and skip its own file's
    rows, whatever block, and thread, it lands in."""
    import manifpt_cli.search as search_module

    monkeypatch.setattr(search_module, "QUERY_BLOCK", 3)
    searched_in = threads_searching(monkeypatch, ExactSearch)
    reals, queries = crops
    sha256 = np.array([b"%064d" % i for i in range(len(reals))], dtype="S64")
    search, database = searcher(reals, "fit", sha256, threads=threads)
    rows = np.random.default_rng(0).permutation(len(reals))[:10]
    query_vectors = np.concatenate([database[rows], PixelEmbedder(Space.RGB)(queries[:10])])
    assert not np.array_equal(np.argsort(query_vectors.sum(axis=1), kind="stable"), np.arange(20)), "reordered"
    own = [s.decode() for s in sha256[rows]] + ["f" * 64] * 10  # the first ten are index rows
    found = search.nearest(query_vectors, own)
    excluded = np.zeros((20, len(reals)), dtype=bool)
    excluded[np.arange(10), rows] = True
    ids, distances = brute_force(database, query_vectors, excluded)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert searched_in == {threads > 1}, "seven blocks: in the pool's threads, where there are two"


def test_fit_plan_is_seeded_and_orthonormal(crops):
    embeddings = PixelEmbedder(Space.RGB)(crops[0])
    plan, again = fit_plan(embeddings, DIMS, seed=1), fit_plan(embeddings, DIMS, seed=1)
    assert np.array_equal(plan.basis, again.basis)
    assert np.allclose(plan.basis @ plan.basis.T, np.eye(len(plan.basis)), atol=1e-12)


def test_large_images_fit_their_basis_on_pooled_rows_and_the_search_stays_exact(crops, monkeypatch):
    from manifpt_cli import search as search_module

    reals, queries = crops
    rows = np.ascontiguousarray(reals.transpose(0, 3, 1, 2).reshape(len(reals), -1))
    assert search_module.pooling_factor(32, rows.shape[1]) == 1, "32 px: the full-size sample fits"
    assert np.array_equal(fit_plan(rows, DIMS, image_size=32).basis, fit_plan(rows, DIMS).basis)
    # Memory for a quarter of the full-size sample: pooled 2 × 2, it keeps all its rows.
    monkeypatch.setattr(search_module, "PLAN_BYTES", search_module.PLAN_SAMPLE * 8 * rows.shape[1] // 4)
    assert search_module.pooling_factor(32, rows.shape[1]) == 2
    assert search_module.pooling_factor(30, 3 * 30**2) == 2, "30 px: 2 divides it, 4 does not"
    assert search_module.pooling_factor(None, rows.shape[1]) == 1, "no layout, no pooling"
    plan = fit_plan(rows, DIMS, seed=1, image_size=32)
    assert np.array_equal(plan.basis, fit_plan(rows, DIMS, seed=1, image_size=32).basis), "seeded"
    assert np.allclose(plan.basis @ plan.basis.T, np.eye(DIMS), atol=1e-12), "orthonormal, as the bound needs"
    blocks = plan.basis.reshape(DIMS, 3, 16, 2, 16, 2)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :, :, :1, :, :1], blocks.shape)), "constant per block"
    assert np.allclose(plan.mean, rows.mean(axis=0) / 255), "every row is in the sample here"

    projected, norms = project_rows(plan, rows)
    sha256 = np.array([b"%064d" % i for i in range(len(rows))], dtype="S64")
    search = ExactSearch(rows, plan, projected, norms, sha256, (8, DIMS), 1)
    query_vectors = PixelEmbedder(Space.RGB)(queries)
    pixels = np.rint(query_vectors * 255).astype(np.uint8)
    sums, squares = pixels.sum(axis=1, dtype=np.int64), np.sqrt(pixel_squares(pixels).astype(np.float64))
    assert search._pooling == 2, "queries are projected from 2 × 2 block sums"
    full_size = np.subtract(query_vectors, plan.mean, dtype=np.float64) @ plan.basis.T
    assert plan.pooling == 2 and np.allclose(plan.project(query_vectors)[0], full_size, rtol=0, atol=1e-12)
    coords, error = search._project(pixels, sums, squares)
    assert (np.abs(coords - full_size) <= error[:, None]).all(), "within the proven error"
    white = np.full((1, rows.shape[1]), 255, dtype=np.uint8)
    assert (search_module.block_sums(white, 16) == 256 * 255).all(), "sums past 16 bits"
    reference = rows.reshape(len(rows), 3, 16, 2, 16, 2).sum(axis=(3, 5)).reshape(len(rows), -1)
    assert np.array_equal(search_module.block_sums(rows, 2), reference)
    found = search.nearest(query_vectors)
    ids, distances = brute_force(PixelEmbedder(Space.RGB)(reals), query_vectors)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert found.checked.mean() < len(reals) / 2, "the pooled basis prunes"


@pytest.mark.parametrize("query_type", ["INT8", "UINT8"])
def test_the_hand_written_model_is_the_one_onnx_helper_makes(query_type):
    onnx = pytest.importorskip("onnx")
    from manifpt_cli.pixel_products import matmul_integer_model

    ours = onnx.load_from_string(matmul_integer_model(getattr(onnx.TensorProto, query_type)))
    onnx.checker.check_model(ours, full_check=True)
    helper = onnx.helper

    def info(name, elem_type, dims):
        return helper.make_tensor_value_info(name, elem_type, list(dims))

    node = helper.make_node("MatMulInteger", ["rows", "queries"], ["dots"])
    inputs = [
        info("rows", onnx.TensorProto.UINT8, "mk"),
        info("queries", getattr(onnx.TensorProto, query_type), "kn"),
    ]
    graph = helper.make_graph([node], "pixel_products", inputs, [info("dots", onnx.TensorProto.INT32, "mn")])
    assert ours.graph == graph
    assert [(o.domain, o.version) for o in ours.opset_import] == [("", 13)]


def test_the_hand_written_float_model_is_the_one_onnx_helper_makes_and_computes_the_products():
    onnx = pytest.importorskip("onnx")
    from manifpt_cli.pixel_products import FloatProducts, transposed_gemm_model

    ours = onnx.load_from_string(transposed_gemm_model())
    onnx.checker.check_model(ours, full_check=True)
    helper, FLOAT = onnx.helper, onnx.TensorProto.FLOAT
    node = helper.make_node("Gemm", ["queries", "rows"], ["products"], transB=1)
    inputs = [helper.make_tensor_value_info("queries", FLOAT, ["m", "k"])]
    inputs.append(helper.make_tensor_value_info("rows", FLOAT, ["n", "k"]))
    output = helper.make_tensor_value_info("products", FLOAT, ["m", "n"])
    assert ours.graph == helper.make_graph([node], "float_products", inputs, [output])
    rng = np.random.default_rng(0)
    queries, rows = rng.standard_normal((5, 67), dtype=np.float32), rng.standard_normal((300, 67), dtype=np.float32)
    products = FloatProducts()
    assert np.allclose(products(queries, rows), queries.astype(np.float64) @ rows.T, rtol=1e-5, atol=1e-4)
    assert products(queries, rows[:0]).shape == (5, 0) and products(queries[:0], rows).shape == (0, 300)


def test_a_row_almost_in_the_basis_span_is_not_pruned():
    """A row whose residual ρ is tiny: its float32 projection moves ρ by far more than float32
    rounding (√u, not u). One-row indexes with a basis nearly through the row, and queries off it
    along the residual; without the rows' own error term some of these lost their only row."""
    from manifpt_cli.search import rows_as_float

    rng = np.random.default_rng(0)
    for _ in range(200):
        row = rng.integers(30, 226, 3).astype(np.uint8)
        phi = rows_as_float(row[None])[0].astype(np.float64)
        tilt = np.cross(phi, rng.standard_normal(3))
        basis = phi + 10 ** rng.uniform(-6, -3.5) * np.linalg.norm(phi) * tilt / np.linalg.norm(tilt)
        basis /= np.linalg.norm(basis)
        residual = phi - (phi @ basis) * basis
        query = np.clip(np.rint(row + 25 * residual / np.linalg.norm(residual)), 0, 255).astype(np.uint8)
        plan = SearchPlan(np.zeros(3), basis[None])
        search = ExactSearch(row[None], plan, *project_rows(plan, row[None]), np.array([b"x" * 64]), kernel="float64")
        found = search.nearest(rows_as_float(query[None]))
        expected = np.square(rows_as_float(query[None]).astype(np.float64) - phi).sum()
        assert found.ids[0] == 0 and found.distances[0] == expected
