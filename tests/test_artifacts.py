"""Stage 4: artifacts φ(x) − φ(x*) for labelled folders."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from manifpt_cli.artifacts import extract_artifacts, load_artifacts
from manifpt_cli.errors import MismatchError, UsageError
from manifpt_cli.images import decode_image
from manifpt_cli.integrity import IntegrityError
from manifpt_cli.manifold import RealIndex, build_index
from manifpt_cli.settings import RunSettings
from manifpt_cli.spaces import FEATURE_DIM, PixelEmbedder, Space

from .conftest import SIZE, SOURCES, replace_dataset


def test_artifact_is_embedding_minus_nearest_real_embedding(artifacts_file, real_index):
    with h5py.File(artifacts_file) as handle, RealIndex(real_index) as index:
        for space in (Space.RGB, Space.FREQ):
            group = handle[f"spaces/{space.value}"]
            for row in (0, 77, len(group["artifacts"]) - 1):
                path = handle["samples/path"].asstr()[row]
                phi = PixelEmbedder(space)(decode_image(path, SIZE).pixels[None])[0]
                neighbour = group["neighbor_id"][row]
                expected = phi - index.all_embeddings(space)[neighbour]
                assert np.allclose(group["artifacts"][row].ravel(), expected, atol=1e-5)
                assert np.isclose(group["neighbor_distance"][row], (expected.astype(np.float64) ** 2).sum(), rtol=1e-3)


def test_labels_and_metadata(artifacts_file, real_index):
    data = load_artifacts(artifacts_file, Space.RGB)
    assert data.samples.label_names == list(SOURCES)
    assert data.artifacts.shape[1:] == (3, SIZE, SIZE)
    labels = data.samples.labels
    assert np.bincount(labels).tolist() == [len(labels) // 4] * 4
    with RealIndex(real_index) as index:
        assert data.samples.index_hash == index.index_hash


def test_real_class_uses_leave_one_out(tmp_path, real_index, dataset):
    out = tmp_path / "with_real.h5"
    result = extract_artifacts(real_index, [("blur", str(dataset / "train" / "blur"))], out, real=dataset / "real")
    assert result.label_names == ["blur", "real"]
    with h5py.File(out) as handle:
        labels = handle["samples/label"][...]
        distances = handle["spaces/rgb/neighbor_distance"][...]
    assert (distances[labels == 1] > 0).all(), "a real image in the index must not be its own neighbour"


def test_bad_files_and_bad_options(tmp_path, real_index, dataset):
    folder = tmp_path / "fakes"
    folder.mkdir()
    for path in sorted((dataset / "train" / "jpeg").iterdir())[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zero.png").write_bytes(b"")
    (folder / "readme.txt").write_text("notes")
    result = extract_artifacts(
        real_index, [("jpeg", str(folder)), ("blur", str(dataset / "train" / "blur"))], tmp_path / "a.h5"
    )
    assert result.counts["jpeg"] == 4 and [name for name, _ in result.failures] == ["jpeg"]
    # A file that is not an image is skipped, as `index build` skips it: recorded, not a failure.
    assert [(name, os.path.basename(item.path)) for name, item in result.skipped] == [("jpeg", "readme.txt")]
    with h5py.File(tmp_path / "a.h5") as handle:
        errors = list(handle["failures/error"].asstr()[...])
    assert sum(error.startswith("skipped:") for error in errors) == 1 and len(errors) == 2
    with pytest.raises(UsageError, match="unique"):
        extract_artifacts(real_index, [("real", str(folder))], tmp_path / "b.h5", real=folder)
    with pytest.raises(UsageError, match="no 'sl' space"):
        extract_artifacts(real_index, [("x", str(folder))], tmp_path / "c.h5", spaces=[Space.SL])
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "c.h5").exists()


def test_feature_space_needs_the_index_weights(tmp_path, dataset):
    real = sorted((dataset / "real").iterdir())[:6]
    folder = tmp_path / "real"
    folder.mkdir()
    for path in real:
        (folder / path.name).write_bytes(path.read_bytes())
    index = tmp_path / "sl.h5"
    build_index([folder], index, [Space.SL], size=SIZE, weights={Space.SL: "random:1"})
    out = tmp_path / "sl_artifacts.h5"
    extract_artifacts(index, [("a", str(folder))], out)  # finds random:1 again from the index record
    data = load_artifacts(out, Space.SL)
    assert data.artifacts.shape == (6, FEATURE_DIM) and data.backbone.source == "random:1"
    with pytest.raises(MismatchError, match="not the ones index"):
        extract_artifacts(index, [("a", str(folder))], tmp_path / "x.h5", weights={Space.SL: "random:2"})


def test_interrupted_extract_leaves_nothing_under_the_final_name(tmp_path, real_index, dataset):
    from .test_manifold import InterruptAfter

    out = tmp_path / "artifacts.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_artifacts(
            real_index,
            [("jpeg", str(dataset / "train" / "jpeg"))],
            out,
            settings=RunSettings(batch_size=8, progress=InterruptAfter(2)),
        )
    assert list(tmp_path.iterdir()) == []


def test_an_artifacts_file_that_does_not_store_what_it_declares_is_refused(artifacts_file, tmp_path):
    """As for indexes (test_integrity): rows declared but never written, compressed or kept in
    another file are refused before the digest reads any dataset."""
    for name, layout, message in [
        ("unwritten.h5", {"shape": (2**20, 3, SIZE, SIZE), "chunks": (85, 3, SIZE, SIZE)}, "declares .* bytes but"),
        ("compressed.h5", {"compression": "gzip"}, "is compressed or filtered"),
        (
            "external.h5",
            {"shape": (2**30, 3, SIZE, SIZE), "external": [("/dev/zero", 0, h5py.h5f.UNLIMITED)]},
            "outside",
        ),
    ]:
        damaged = tmp_path / name
        shutil.copy(artifacts_file, damaged)
        with h5py.File(damaged, "r+") as handle:
            replace_dataset(handle["spaces/rgb"], "artifacts", **layout)
        with pytest.raises(IntegrityError, match=message):
            load_artifacts(damaged, Space.RGB)


def test_the_index_images_shown_come_from_verified_rows_or_from_the_files(real_index, tmp_path):
    """An index opened to search freq verifies freq alone: rgb rows altered in the file must not
    become the nearest real image an investigator is shown; the files are read again instead."""
    from manifpt_cli.artifacts import index_images

    altered = shutil.copy(real_index, tmp_path / "altered.h5")
    with h5py.File(altered, "r+") as handle:
        rows = handle["spaces/rgb/embeddings"]
        rows[0] = 255 - rows[0]  # what a picture of the index would show
    with RealIndex(altered, verify=[Space.FREQ]) as index:
        (shown,) = index_images(index, np.array([0]), RunSettings())
        path = index.paths(np.array([0]))[0]
    assert np.array_equal(shown.pixels, decode_image(path, SIZE).pixels), "the file's own pixels"
    with pytest.raises(IntegrityError):
        RealIndex(altered, verify=[Space.RGB])
    with RealIndex(real_index, verify=[Space.RGB]) as index:  # verified: from the rows, the same pixels
        (from_rows,) = index_images(index, np.array([0]), RunSettings())
    assert np.array_equal(from_rows.pixels, shown.pixels)
