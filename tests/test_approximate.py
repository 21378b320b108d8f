"""Approximate FAISS indexes (IVF, HNSW): real FAISS and HDF5, images decoded from disk."""

from __future__ import annotations

import hashlib
import shutil

import faiss
import numpy as np
import pytest
from PIL import Image

from manifpt_cli.errors import EXIT_USAGE, UsageError
from manifpt_cli.manifold import RealIndex, build_index, fold_queries
from manifpt_cli.spaces import PixelEmbedder, Space

from .conftest import SIZE
from .test_integrity import cli
from .test_manifold import brute_force_nearest


@pytest.fixture(scope="module")
def real_with_an_outlier(dataset, tmp_path_factory):
    """The session's reals plus two copies of a white image, which IVF puts in a list of its own."""
    folder = tmp_path_factory.mktemp("outlier") / "real"
    shutil.copytree(dataset / "real", folder)
    Image.fromarray(np.full((SIZE, SIZE, 3), 255, np.uint8)).save(folder / "white_a.png")
    shutil.copy(folder / "white_a.png", folder / "white_b.png")
    return folder


def test_a_query_whose_probed_list_holds_only_its_copies_is_searched_further(real_with_an_outlier, tmp_path):
    out = tmp_path / "ivf.h5"
    build_index([real_with_an_outlier], out, [Space.FREQ], size=SIZE, faiss_factory="IVF4,Flat")
    white = PixelEmbedder(Space.FREQ)(np.asarray(Image.open(real_with_an_outlier / "white_a.png"))[None])
    own = hashlib.sha256((real_with_an_outlier / "white_a.png").read_bytes()).hexdigest()
    with RealIndex(out) as index:
        searched, _ = fold_queries(index.stored_layout(Space.FREQ), white)  # FAISS's coordinates
        _, candidates = index.faiss_index(Space.FREQ).search(np.ascontiguousarray(searched, np.float32), 8)
        copies = [i for i, path in enumerate(index.paths(np.arange(index.n_images))) if "white" in path]
        assert sorted(candidates[0][candidates[0] >= 0]) == copies and (candidates[0] < 0).any(), (
            "the situation under test: the probed list holds only the copies, FAISS pads with -1"
        )
        found = index.nearest(Space.FREQ, white, [own])
        database = index.all_embeddings(Space.FREQ)
    others = np.setdiff1d(np.arange(len(database)), copies)
    expected_id, expected_distance = brute_force_nearest(database[others], white)
    assert found.ids.tolist() == [others[expected_id[0]]]
    assert found.distances.tolist() == expected_distance.tolist()


@pytest.mark.parametrize(
    ("factory", "parameters"),
    [("IVF4,Flat", {"nprobe": 3, "nlist": 4}), ("HNSW32", {"efSearch": 24, "M": 32})],
)
def test_the_header_says_approximate_with_the_parameters_searched(dataset, tmp_path, factory, parameters):
    out = tmp_path / "approximate.h5"
    build_index([dataset / "real"], out, [Space.RGB], size=SIZE, faiss_factory=factory)
    with RealIndex(out) as index:
        searched = faiss.downcast_index(index.faiss_index(Space.RGB))
        if "nprobe" in parameters:
            searched.nprobe = parameters["nprobe"]
        else:
            searched.hnsw.efSearch = parameters["efSearch"]
        description = index.search_description(Space.RGB)
    assert description["exact"] is False and f"FAISS {factory} (approximate)" in description["method"]
    assert description["parameters"] == parameters
    assert "scan" in description["fallback"]


def test_too_few_images_to_train_is_a_usage_error(dataset, tmp_path):
    with pytest.raises(UsageError, match=r"cannot train index 'IVF4,PQ16' on \d+ images"):
        build_index([dataset / "real"], tmp_path / "pq.h5", [Space.RGB], size=SIZE, faiss_factory="IVF4,PQ16")
    assert not (tmp_path / "pq.h5").exists()


@pytest.mark.parametrize(
    ("factory", "option", "value", "parameter"),
    [
        ("IVF4,Flat", "--nprobe", 3, "nprobe"),
        ("PCA16,IVF4,Flat", "--nprobe", 2, "nprobe"),  # behind a transform (once a crash, found by review)
        ("HNSW32", "--ef-search", 40, "efSearch"),
    ],
)
def test_index_build_stores_the_search_parameters_given(dataset, tmp_path, factory, option, value, parameter):
    out = tmp_path / "approximate.h5"
    cli("index", "build", dataset / "real", "--out", out, "--space", "rgb", "--faiss", factory, option, value, "-q")
    with RealIndex(out) as index:
        assert index.search_description(Space.RGB)["parameters"][parameter] == value, "searched with it, and said so"


@pytest.mark.parametrize(
    ("space", "factory", "option", "message"),
    [
        ("rgb", "Flat", "--nprobe", "searched exactly"),
        ("freq", "Flat", "--ef-search", "searched exactly"),
        ("rgb", "HNSW32", "--nprobe", "no search parameter 'nprobe'"),
        ("freq", "IVF4,Flat", "--ef-search", "no search parameter 'efSearch'"),
        ("rgb", "IVF4,Flat", "--nprobe", "more than the 4 lists"),
    ],
)
def test_a_search_parameter_the_index_does_not_have_is_refused_up_front(
    dataset, tmp_path, space, factory, option, message
):
    out = tmp_path / "refused.h5"
    args = ("index", "build", dataset / "real", "--out", out, "--space", space, "--faiss", factory, option, 8)
    result = cli(*args, code=EXIT_USAGE)
    assert message in result.stderr and not out.exists()


@pytest.mark.parametrize("space", [Space.RGB, Space.FREQ])
def test_an_approximate_search_is_made_from_the_bytes_its_verification_read(dataset, tmp_path, monkeypatch, space):
    """As the exact searches (test_manifold): opened for searching, a FAISS space's serialised
    index and the rows its candidates are re-ranked on come from the read that verified them, so
    zeroing both on disk after the open changes nothing, and no dataset is read again. Opened
    without, the same damage is read: FAISS refuses the zeroed index."""
    import h5py

    from manifpt_cli.errors import FormatError

    from .test_manifold import _overwrite_on_disk

    out = tmp_path / "ivf.h5"
    build_index([dataset / "real"], out, [space], size=SIZE, faiss_factory="IVF4,Flat")
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((dataset / "suspects").rglob("*.png"))])
    queries = PixelEmbedder(space)(pixels)
    with RealIndex(out) as index:
        expected = index.nearest(space, queries)
    for searching in (True, False):
        copy = tmp_path / f"searching-{searching}.h5"
        shutil.copy(out, copy)
        with RealIndex(copy, searching=[space] if searching else ()) as index:
            for name in ("faiss_index", "embeddings"):
                _overwrite_on_disk(copy, f"spaces/{space.value}/{name}")
            if not searching:
                with pytest.raises(FormatError, match="FAISS index cannot be read"):
                    index.nearest(space, queries)
                continue

            def refused(*args, **kwargs):
                raise AssertionError("read from the index file after it was opened and verified")

            monkeypatch.setattr(h5py.Dataset, "__getitem__", refused)
            got = index.nearest(space, queries)
            scanned = index._scan_nearest(space, queries[:2], None)  # the fallback scan reads the kept rows too
            monkeypatch.undo()
        assert np.array_equal(got.ids, expected.ids) and np.array_equal(got.distances, expected.distances)
        assert scanned[0].tolist() == expected.ids[:2].tolist()
