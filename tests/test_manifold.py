"""Stage 3: the real-manifold index — real FAISS, real HDF5."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.errors import FormatError, UsageError
from manifpt_cli.manifold import RealIndex, build_index, describe_index
from manifpt_cli.progress import Progress
from manifpt_cli.settings import RunSettings
from manifpt_cli.spaces import PixelEmbedder, Space

from .conftest import SIZE, write_crops


def brute_force_nearest(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distances = ((queries[:, None, :].astype(np.float64) - database[None].astype(np.float64)) ** 2).sum(-1)
    return distances.argmin(1), distances.min(1)


def test_index_layout_and_attributes(real_index):
    with h5py.File(real_index) as handle:
        attrs = handle.attrs
        assert attrs["format"] == "manifpt-real-index" and attrs["format_version"] == 6
        assert attrs["image_size"] == SIZE and len(attrs["index_hash"]) == 64
        n = attrs["n_images"]
        assert handle["files/path"].shape == (n,) and handle["files/sha256"].shape == (n,)
        unique_bins = 3 * (SIZE * SIZE + 4) // 2  # one bin per mirrored pair, and the 4 self-mirrored ones
        for space, dtype, stored_dim in (("rgb", np.uint8, 3 * SIZE * SIZE), ("freq", np.float32, unique_bins)):
            group = handle[f"spaces/{space}"]
            assert group["embeddings"].shape == (n, stored_dim) and group["embeddings"].dtype == dtype
            assert group.attrs["metric"] == "squared_l2" and group.attrs["faiss_factory"] == "Flat"
            assert group.attrs["dim"] == 3 * SIZE * SIZE
        assert handle["spaces/freq"].attrs["layout"] == "symmetric-half" and "layout" not in handle["spaces/rgb"].attrs
        rgb, freq = handle["spaces/rgb"], handle["spaces/freq"]
        assert "faiss_index" not in rgb and "faiss_index" not in freq, "both exact searches need none"
        assert rgb.attrs["search"] == "exact-pca" and freq.attrs["search"] == "exact-codes"
        k = len(rgb["search_basis"])
        assert rgb["search_basis"].shape == (k, 3 * SIZE * SIZE) and rgb["search_projected"].shape == (n, k)
        assert rgb["search_norms"].shape == (n,) and rgb["search_mean"].shape == (3 * SIZE * SIZE,)
    summary = describe_index(real_index)
    assert [s["faiss_ntotal"] for s in summary["spaces"]] == [n, n]
    assert [s["search"] for s in summary["spaces"]] == ["exact", "exact"]
    with RealIndex(real_index) as index:
        rgb = index.search_description(Space.RGB)
        assert rgb["exact"] and "PCA" in rgb["method"] and rgb["parameters"]["window_rows"] > 0
        assert rgb["parameters"]["stage_dims"][0] < rgb["parameters"]["stage_dims"][-1] == rgb["parameters"]["basis"]
        freq = index.search_description(Space.FREQ)
        assert freq["exact"] and "8-bit code scan" in freq["method"] and freq["parameters"]["grid_step"] > 0


@pytest.mark.parametrize("space", [Space.RGB, Space.FREQ])
def test_the_neighbour_is_brute_forces(real_index, dataset, space):
    """End to end: the index's search (exact search for rgb, FAISS flat for freq) against float64
    brute force over the embeddings as built, on real suspects and on copies of the reals."""
    from manifpt_cli.images import decode_folder

    batch = next(decode_folder([dataset / "suspects" / "blur"], SIZE, RunSettings(batch_size=12)))
    queries = PixelEmbedder(space)(np.stack([item.pixels for item in batch]))
    with RealIndex(real_index) as index:
        database = index.all_embeddings(space)
        queries = np.concatenate([queries, database[:3]])
        found = index.nearest(space, queries)
        expected_ids, expected_d = brute_force_nearest(database, queries)
        assert np.array_equal(index.embeddings(space, found.ids), database[found.ids])
    assert np.array_equal(found.ids, expected_ids)
    assert np.array_equal(found.distances, expected_d)


@pytest.mark.parametrize("space", [Space.RGB, Space.FREQ])
def test_rows_read_from_the_file_give_what_held_rows_give(real_index, dataset, space, monkeypatch):
    """Above HELD_ROWS_BYTES a space's rows stay in the file (read row by row at their offsets): the
    same neighbours, distances and artifacts, and the memory held is the chunk offsets."""
    import manifpt_cli.file_rows as file_rows
    from manifpt_cli.images import decode_folder

    batch = next(decode_folder([dataset / "suspects" / "blur"], SIZE, RunSettings(batch_size=12)))
    queries = PixelEmbedder(space)(np.stack([item.pixels for item in batch]))
    with RealIndex(real_index) as index:
        held = index.nearest(space, queries)
        held_rows = index.embeddings(space, held.ids[::-1])
    with h5py.File(real_index) as handle:
        stored = handle[f"spaces/{space.value}/embeddings"][...]
    monkeypatch.setattr(file_rows, "HELD_ROWS_BYTES", 0)
    with RealIndex(real_index) as index:
        mapped = index.nearest(space, queries)
        assert np.array_equal(index.embeddings(space, held.ids[::-1]), held_rows)
        rows = index._rows(space)
        assert isinstance(rows, file_rows.FileRows) and rows.nbytes < stored.nbytes / 100
        assert np.array_equal(rows[:], stored) and np.array_equal(rows[[5, 0, 5]], stored[[5, 0, 5]])
        with pytest.raises(IndexError):
            rows[[len(stored)]]
    assert np.array_equal(mapped.ids, held.ids) and np.array_equal(mapped.distances, held.distances)


def test_file_rows_find_every_chunk_and_refuse_unwritten_ones(tmp_path):
    from manifpt_cli.file_rows import FileRows

    rows = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    with h5py.File(tmp_path / "rows.h5", "w") as handle:
        handle.create_dataset("whole", data=rows, chunks=(3, 4))
        handle.create_dataset("partly", shape=(10, 4), dtype="f4", chunks=(2, 4))[:4] = rows[:4]
    with h5py.File(tmp_path / "rows.h5", "r") as handle:
        read = FileRows(tmp_path / "rows.h5", handle["whole"])
        ids = np.array([9, 0, 4, 3, 9])
        assert np.array_equal(read[ids], rows[ids])
        read.close()
        with pytest.raises(ValueError, match="never written"):
            FileRows(tmp_path / "rows.h5", handle["partly"])


def test_a_compressed_large_space_is_a_format_error(real_index, tmp_path):
    """Rows stored compressed cannot be read by position, and manifpt never writes them: the same
    data gzip-compressed (its digest would still verify) is refused as the index opens, and
    :class:`FileRows` refuses such a dataset itself."""
    from manifpt_cli.file_rows import FileRows

    copy = tmp_path / "compressed.h5"
    shutil.copy(real_index, copy)
    with h5py.File(copy, "r+") as handle:
        group = handle["spaces/rgb"]
        rows = group["embeddings"][...]
        del group["embeddings"]
        group.create_dataset("embeddings", data=rows, chunks=(4, rows.shape[1]), compression="gzip")
    with pytest.raises(FormatError, match="compressed"):
        RealIndex(copy)
    with h5py.File(copy) as handle, pytest.raises(ValueError, match="compressed"):
        FileRows(copy, handle["spaces/rgb/embeddings"])


COPIES = 12  # more than the FAISS candidates re-ranked at first, so ties must widen the search


@pytest.fixture(scope="module", params=[SIZE, SIZE - 1], ids=["even", "odd"])
def freq_index(request, dataset, tmp_path_factory):
    """A freq index of the real photos plus ``COPIES`` files with one photo's pixels (other bytes,
    so other SHA-256s: exact ties), at an even and an odd size (self-mirrored bins differ)."""
    from PIL import Image, PngImagePlugin

    folder = tmp_path_factory.mktemp("freq-reals")
    shutil.copytree(dataset / "real", folder / "real")
    tied = Image.open(sorted((dataset / "real").iterdir())[5])
    for i in range(COPIES):
        note = PngImagePlugin.PngInfo()
        note.add_text("copy", str(i))
        tied.save(folder / "real" / f"tied_{i:02d}.png", pnginfo=note)
    out = folder / "freq.h5"
    build_index([folder / "real"], out, [Space.FREQ], size=request.param)
    with RealIndex(out) as index:
        yield index


def brute_force_leave_one_out(index, queries, shas=None):
    """float64 brute force on the FULL vectors; rows with a query's SHA-256 skipped; ties: lowest row."""
    database = index.all_embeddings(Space.FREQ).astype(np.float64)
    distances = np.stack([np.square(database - query).sum(-1) for query in queries.astype(np.float64)])
    if shas is not None:
        own = np.array([s.encode() for s in shas], dtype="S64")
        distances[index._sha256[None, :] == own[:, None]] = np.inf
    return distances.argmin(1), distances.min(1)


def test_freq_neighbours_are_brute_forces_on_the_full_vectors(freq_index, dataset):
    """Suspects, exact ties, near-ties and leave-one-out, at an even and an odd image size."""
    from manifpt_cli.images import decode_folder

    index = freq_index
    database = index.all_embeddings(Space.FREQ)
    assert database.shape == (index.n_images, 3 * index.image_size**2)
    batches = decode_folder([dataset / "suspects"], index.image_size, RunSettings())
    suspects = np.stack([item.pixels for batch in batches for item in batch])
    first_copy = [Path(p).name for p in index.paths(range(index.n_images))].index("tied_00.png")
    tied_rows = np.flatnonzero((database == database[first_copy]).all(axis=1))
    assert len(tied_rows) == COPIES + 1, "the copies and the photo they copy"
    rng = np.random.default_rng(0)
    pairs = rng.choice(index.n_images, (16, 2), replace=False)
    # Midpoints of two reals are near-ties: their two distances agree to rounding.
    near_ties = ((database[pairs[:, 0]].astype(np.float64) + database[pairs[:, 1]]) / 2).astype(np.float32)
    perturbed = database[:4] + rng.normal(0, 1e-3, database[:4].shape).astype(np.float32)  # not point-symmetric
    queries = np.concatenate([PixelEmbedder(Space.FREQ)(suspects), near_ties, perturbed, database])
    found = index.nearest(Space.FREQ, queries)
    expected_ids, expected_d = brute_force_leave_one_out(index, queries)
    assert np.array_equal(found.ids, expected_ids) and np.array_equal(found.distances, expected_d)
    assert found.ids[-index.n_images + tied_rows[-1]] == tied_rows[0], "a tie goes to the lowest row"
    # Leave-one-out: each real skips itself; a tied copy finds the lowest other copy at distance 0.
    shas = index.sha256(np.arange(index.n_images))
    found = index.nearest(Space.FREQ, database, shas)
    expected_ids, expected_d = brute_force_leave_one_out(index, database, shas)
    assert np.array_equal(found.ids, expected_ids) and np.array_equal(found.distances, expected_d)
    assert found.ids[tied_rows[0]] == tied_rows[1] and found.distances[tied_rows[0]] == 0
    assert (found.ids != np.arange(index.n_images)).all()


def test_an_image_is_never_its_own_neighbour(real_index):
    with RealIndex(real_index) as index:
        rows = np.arange(5)
        own = index.all_embeddings(Space.RGB)[rows]
        shas = [s.decode() for s in index._sha256[rows]]
        with_self = index.nearest(Space.RGB, own)
        without_self = index.nearest(Space.RGB, own, shas)
    assert np.array_equal(with_self.ids, rows) and np.allclose(with_self.distances, 0)
    assert (without_self.ids != rows).all()
    assert (without_self.distances > 0).all()


@pytest.mark.parametrize("space", [Space.RGB, Space.FREQ])
def test_leave_one_out_needs_one_digest_per_query(real_index, space):
    """A short digest list used to leave the freq queries past its end free to match themselves."""
    with RealIndex(real_index) as index:
        own = index.all_embeddings(space)[:3]
        with pytest.raises(ValueError, match="2 file digests for 3 queries"):
            index.nearest(space, own, [s.decode() for s in index._sha256[:2]])


def test_freq_at_64_px_allows_for_brute_forces_rounding_of_12288_terms(tmp_path):
    """Above about 11,000 terms, γ of float64 brute force's sum passes the fixed 1e-12 slack: the
    search's pruning must allow for the larger rounding (and still give brute force's answer)."""
    from manifpt_cli.research.samples import bundled_photo_paths, random_crops
    from manifpt_cli.search import FLOAT64_SLACK, float64_slack

    rng = np.random.default_rng(3)
    crops = np.stack([c for photo in bundled_photo_paths() for c in random_crops(photo, 4, 64, rng)])
    np.save(tmp_path / "reals.npy", crops[::2])
    build_index([tmp_path / "reals.npy"], tmp_path / "freq64.h5", [Space.FREQ], size=64)
    queries = PixelEmbedder(Space.FREQ)(crops[1::2])
    with RealIndex(tmp_path / "freq64.h5") as index:
        found = index.nearest(Space.FREQ, queries)
        assert index.coded_search(Space.FREQ).slack == float64_slack(3 * 64 * 64) > 1.3 * FLOAT64_SLACK
        ids, distances = brute_force_leave_one_out(index, queries)
    assert np.array_equal(found.ids, ids) and np.array_equal(found.distances, distances)
    assert float64_slack(3 * 32 * 32) == FLOAT64_SLACK


def test_a_search_in_another_thread_keeps_the_index_thread_budget(real_index, dataset):
    """OpenMP keeps a thread count per thread: a search first run in a read-ahead thread used to
    start one ONNX Runtime thread per core (spinning beside the attributor) whatever --threads said."""
    import threading

    import faiss

    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((dataset / "real").iterdir())[:4]])
    counts = []

    def search() -> None:
        for space in (Space.RGB, Space.FREQ):
            index.nearest(space, PixelEmbedder(space)(pixels))
        counts.append(faiss.omp_get_max_threads())

    with RealIndex(real_index, threads=1) as index:
        worker = threading.Thread(target=search)
        worker.start()
        worker.join()
        assert counts == [1]
        sessions = [index.exact_search(Space.RGB).products, index.exact_search(Space.RGB).float_products]
        sessions.append(index.coded_search(Space.FREQ).grid.products)
        assert [s._session.get_session_options().intra_op_num_threads for s in sessions] == [1, 1, 1]
        assert index.exact_search(Space.RGB).threads == index.coded_search(Space.FREQ).threads == 1


def test_duplicate_files_are_all_skipped(tmp_path, dataset):
    folder = tmp_path / "real"
    folder.mkdir()
    source = sorted((dataset / "real").iterdir())[0]
    for i in range(6):  # six copies of one image: leave-one-out must look past all of them
        shutil.copy(source, folder / f"copy_{i}.png")
    shutil.copy(sorted((dataset / "real").iterdir())[1], folder / "other.png")
    build_index([folder], tmp_path / "dup.h5", [Space.RGB], size=SIZE)
    with RealIndex(tmp_path / "dup.h5") as index:
        query = index.all_embeddings(Space.RGB)[:1]
        found = index.nearest(Space.RGB, query, [index._sha256[0].decode()])
        assert index.paths(found.ids) == [str(folder / "other.png")]


def test_ivf_factory_string(tmp_path, dataset):
    out = tmp_path / "ivf.h5"
    build_index([dataset / "real"], out, [Space.RGB, Space.FREQ], size=SIZE, faiss_factory="IVF4,Flat")
    assert [s["faiss_factory"] for s in describe_index(out)["spaces"]] == ["IVF4,Flat"] * 2
    with RealIndex(out) as index:  # approximate: rows are read back from the file, freq unfolded
        database = index.all_embeddings(Space.FREQ)
        rows = np.array([7, 2, 7])
        assert database.shape[1] == 3 * SIZE * SIZE
        assert np.array_equal(index.embeddings(Space.FREQ, rows), database[rows])
        found = index.nearest(Space.FREQ, database[:5])
        assert np.array_equal(found.ids, np.arange(5)) and (found.distances == 0).all()
        own = index._sha256[0].decode()
        assert index.nearest(Space.FREQ, database[:1], [own]).ids[0] != 0, "leave-one-out"
        # A longer string is not that digest: it used to be cut to 64 characters and match row 0.
        assert index.nearest(Space.FREQ, database[:1], [own + "0"]).ids[0] == 0
        with pytest.raises(ValueError, match="1 file digests for 2 queries"):
            index.nearest(Space.FREQ, database[:2], [own])
    with pytest.raises(UsageError, match="FAISS cannot build"):
        build_index([dataset / "real"], tmp_path / "bad.h5", [Space.RGB], size=SIZE, faiss_factory="NotAnIndex")
    assert not (tmp_path / "bad.h5").exists()


def test_undecodable_files_are_listed_not_fatal(tmp_path, dataset):
    folder = tmp_path / "real"
    shutil.copytree(dataset / "real", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = build_index([folder], tmp_path / "r.h5", [Space.RGB], size=SIZE)
    assert [f.path.endswith("broken.png") for f in result.failures] == [True]
    with h5py.File(tmp_path / "r.h5") as handle:
        assert handle["failures/path"].asstr()[0].endswith("broken.png")
        assert handle.attrs["n_images"] == len(list((dataset / "real").iterdir()))
        stored = list(zip(handle["failures/path"].asstr()[...], handle["failures/error"].asstr()[...]))
    with RealIndex(tmp_path / "r.h5") as index:
        assert index._failures == stored, "kept from the provenance digest's read"
        assert index.failures() == stored and index.n_failures == 1
    info = CliRunner().invoke(app, ["index", "info", str(tmp_path / "r.h5"), "--failures"], terminal_width=250)
    assert info.exit_code == 0 and "1 file(s) left out of the index" in info.stdout
    assert "broken.png" in info.stdout and stored[0][1][:30] in info.stdout


class InterruptAfter(Progress):
    def __init__(self, steps: int) -> None:
        self.left = steps

    def advance(self, steps: int = 1, **fields: object) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def test_interrupted_build_leaves_nothing_under_the_final_name(tmp_path, dataset):
    out = tmp_path / "real.h5"
    out.write_bytes(b"an older file that must survive")
    with pytest.raises(KeyboardInterrupt):
        build_index(
            [dataset / "real"],
            out,
            [Space.RGB],
            size=SIZE,
            settings=RunSettings(batch_size=16, progress=InterruptAfter(2)),
            overwrite=True,
        )
    assert out.read_bytes() == b"an older file that must survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.h5"], "no partial file left behind"


def test_reader_refuses_other_files_and_versions(tmp_path, real_index):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs["format"] = "something-else"
    with pytest.raises(FormatError, match="not a manifpt-real-index"):
        RealIndex(other)
    newer = tmp_path / "newer.h5"
    shutil.copy(real_index, newer)
    with h5py.File(newer, "a") as handle:
        handle.attrs["format_version"] = 99
    with pytest.raises(FormatError, match="version 99"):
        RealIndex(newer)


def test_a_version_4_index_is_read_as_it_is(tmp_path, real_index):
    """Version 4 held a flat FAISS index of freq beside its rows: the same search, not read."""
    import faiss

    from manifpt_cli.integrity import index_digest, space_digest
    from manifpt_cli.manifold import faiss_coordinates

    old = tmp_path / "v4.h5"
    shutil.copy(real_index, old)
    with h5py.File(old, "a") as handle:
        freq = handle["spaces/freq"]
        flat = faiss.IndexFlatL2(freq["embeddings"].shape[1])
        flat.add(faiss_coordinates(RealIndex(real_index).stored_layout(Space.FREQ), freq["embeddings"][...]))
        freq["faiss_index"] = faiss.serialize_index(flat)
        del freq.attrs["search"]
        handle.attrs["format_version"] = 4
        digests = {}
        for space in ("rgb", "freq"):
            group = handle[f"spaces/{space}"]
            digests[space] = group.attrs["digest"] = space_digest(group)
        handle.attrs["index_hash"] = index_digest(handle, digests)
    with RealIndex(real_index) as current, RealIndex(old) as earlier:
        queries = current.all_embeddings(Space.FREQ)[:8] + np.float32(0.01)
        found, again = current.nearest(Space.FREQ, queries), earlier.nearest(Space.FREQ, queries)
        assert np.array_equal(found.ids, again.ids) and np.array_equal(found.distances, again.distances)
        assert earlier.search_description(Space.FREQ)["exact"] and not earlier._faiss, "its FAISS index is not read"
    assert describe_index(old)["format_version"] == 4


def test_a_version_5_index_is_read_and_its_provenance_shown_as_unverified(tmp_path, real_index):
    """Version 5 differs from 6 only by the provenance digest: it opens, and `index info` says that
    its provenance and failures list are not covered."""
    from manifpt_cli.integrity import index_digest

    old = tmp_path / "v5.h5"
    shutil.copy(real_index, old)
    with h5py.File(old, "a") as handle:
        handle.attrs["format_version"] = 5
        digests = {space: handle[f"spaces/{space}"].attrs["digest"] for space in ("rgb", "freq")}
        handle.attrs["index_hash"] = index_digest(handle, digests)
    with RealIndex(real_index) as current, RealIndex(old) as earlier:
        assert current.index_hash != earlier.index_hash, "the format version is in the hash"
        assert current.verification["provenance"] == "ok"
        assert earlier.verification["provenance"] == "not covered (index format 5)"
    summary = describe_index(old)
    assert summary["format_version"] == 5 and not summary["provenance_verified"]
    assert describe_index(real_index)["provenance_verified"]
    info = CliRunner().invoke(app, ["index", "info", str(old)], terminal_width=200)
    assert info.exit_code == 0 and "no digest over manifpt_version, created_utc or its failures" in info.stdout
    current = CliRunner().invoke(app, ["index", "info", str(real_index)], terminal_width=200)
    assert current.exit_code == 0 and "no digest over" not in current.stdout


def test_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        build_index([tmp_path / "empty"], tmp_path / "x.h5", [Space.RGB])
    assert not (tmp_path / "x.h5").exists()


def test_index_hash_depends_on_the_images(tmp_path, dataset):
    crops = [np.full((SIZE, SIZE, 3), value, np.uint8) for value in (10, 90, 200)]
    write_crops(tmp_path / "a", crops, "c")
    write_crops(tmp_path / "b", crops[:2], "c")
    first = build_index([tmp_path / "a"], tmp_path / "a.h5", [Space.RGB], size=SIZE).index_hash
    again = build_index([tmp_path / "a"], tmp_path / "a2.h5", [Space.RGB], size=SIZE).index_hash
    other = build_index([tmp_path / "b"], tmp_path / "b.h5", [Space.RGB], size=SIZE).index_hash
    assert first == again != other


def test_index_hash_does_not_depend_on_the_blas_threads(tmp_path, dataset):
    from threadpoolctl import threadpool_limits

    hashes = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            built = build_index([dataset / "real"], tmp_path / f"{threads}.h5", [Space.RGB], size=SIZE)
            hashes.append(built.index_hash)
    assert hashes[0] == hashes[1]


def test_a_failing_write_of_the_faiss_index_is_reported_as_itself():
    """FAISS turns an exception in its write callback into RuntimeError("py err"); the index
    writer's own error (a full disk: NoSpaceError) must reach the user instead."""
    import faiss

    from manifpt_cli.manifold import write_faiss_index
    from manifpt_cli.outputs import NoSpaceError

    index = faiss.IndexFlatL2(8)
    index.add(np.random.default_rng(0).random((4000, 8), dtype=np.float32))
    written = []

    def append(data: bytes) -> int:
        if written:
            raise NoSpaceError("no space left for the index")
        written.append(len(data))
        return len(data)

    with pytest.raises(NoSpaceError, match="no space left"):
        write_faiss_index(index, append)


def test_an_index_cut_short_after_it_was_opened_is_an_integrity_error(real_index, tmp_path, monkeypatch):
    """Rows read from the file later (large spaces) meet a file truncated since it was verified:
    a clear IntegrityError, not a short read handed on as pixels."""
    import manifpt_cli.file_rows as file_rows
    from manifpt_cli.integrity import IntegrityError

    copy = tmp_path / "copy.h5"
    shutil.copy(real_index, copy)
    monkeypatch.setattr(file_rows, "HELD_ROWS_BYTES", 0)
    with RealIndex(copy) as index:
        rows = index._rows(Space.RGB)
        holding_the_last_row = rows.chunk_offsets[(len(rows) - 1) // rows.rows_per_chunk]
        os.truncate(copy, int(holding_the_last_row))
        with pytest.raises(IntegrityError, match="changed after it was opened"):
            rows[[len(rows) - 1]]


def _overwrite_on_disk(path: Path, dataset_name: str) -> None:
    """Zero a dataset's first stored bytes in place, behind any open handle's back."""
    with h5py.File(path, "r") as handle:
        dataset = handle[dataset_name]
        offset = dataset.id.get_offset()
        offset = dataset.id.get_chunk_info(0).byte_offset if offset is None else offset
        size = min(4096, dataset.id.get_storage_size())
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(bytes(size))


def test_opened_for_searching_an_index_reads_nothing_from_its_file_again(real_index, dataset, monkeypatch):
    """Attributes, tables and the file list come from the one read that verified them: with every
    read of an attribute or dataset failing after the open, the searches, their description, the
    spaces' settings and the neighbours' paths all still come, as they did before."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((dataset / "real").iterdir())[:4]])
    spaces = (Space.RGB, Space.FREQ)
    queries = {space: PixelEmbedder(space)(pixels) for space in spaces}

    def answers(index):
        found = {space: index.nearest(space, queries[space]) for space in spaces}
        return (
            [(found[s].ids.tolist(), found[s].distances.tolist(), index.paths(found[s].ids)) for s in spaces],
            [(index.search_description(s), index.space_attrs(s), index.stored_layout(s) is None) for s in spaces],
            index.attrs,
        )

    with RealIndex(real_index) as index:
        expected = answers(index)

    def refused(*args, **kwargs):
        raise AssertionError("read from the index file after it was opened and verified")

    with RealIndex(real_index, searching=spaces) as index:
        for method in ("__getitem__", "__iter__", "__contains__", "get"):
            monkeypatch.setattr(h5py.AttributeManager, method, refused)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", refused)
        got = answers(index)
    assert repr(got) == repr(expected)


@pytest.mark.parametrize("layout", ["held", "chunks-of-3-rows", "rows-in-the-file"])
def test_a_search_is_made_from_the_bytes_its_verification_read(real_index, dataset, tmp_path, monkeypatch, layout):
    """With ``searching``, the tables come from the verifying read: the file is read once, and a
    change to it after opening cannot reach the search (rows above HELD_ROWS_BYTES excepted: they
    stay in the file, their norms do not). Without, they are read again."""
    from manifpt_cli import file_rows, integrity

    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((dataset / "real").iterdir())[:6]])
    with RealIndex(real_index) as untouched:
        expected = untouched.exact_search(Space.RGB)
        found = untouched.nearest(Space.RGB, PixelEmbedder(Space.RGB)(pixels))
        stored_rows = untouched.all_embeddings(Space.RGB)
        shas = untouched._sha256.copy()
    if layout == "chunks-of-3-rows":  # the digest's chunks then start mid-table: rows land where they start
        monkeypatch.setattr(integrity, "CHUNK_BYTES", 3 * stored_rows.shape[1])
    rows_in_file = layout == "rows-in-the-file"
    if rows_in_file:
        monkeypatch.setattr(file_rows, "HELD_ROWS_BYTES", 0)
    for searching, same in (([Space.RGB, Space.FREQ], True), ((), False)):
        copy = tmp_path / f"searching-{same}.h5"
        shutil.copy(real_index, copy)
        with RealIndex(copy, verify=[Space.RGB, Space.FREQ], searching=searching) as index:
            for name in ("spaces/rgb/search_projected", "spaces/rgb/embeddings", "spaces/freq/embeddings"):
                _overwrite_on_disk(copy, name)
            _overwrite_on_disk(copy, "files/sha256")
            search = index.exact_search(Space.RGB)
            operands_match = all(np.array_equal(a.operand, b.operand) for a, b in zip(search.stages, expected.stages))
            assert operands_match == same
            assert np.array_equal(search.squared_norms, expected.squared_norms) == same
            assert np.array_equal(search.rows[:], expected.rows) == (same and not rows_in_file)
            assert not np.array_equal(index.all_embeddings(Space.RGB), stored_rows), "the file itself did change"
            assert np.array_equal(index._sha256, shas), "the SHA-256 list is the one read when the index was opened"
            freq_rows = index._rows(Space.FREQ)[np.arange(8)]
            assert (np.count_nonzero(freq_rows) == freq_rows.size) == (same and not rows_in_file)
            if same and not rows_in_file:
                got = index.nearest(Space.RGB, PixelEmbedder(Space.RGB)(pixels))
                assert np.array_equal(got.ids, found.ids) and np.array_equal(got.distances, found.distances)


def test_an_80_px_index_fits_its_basis_on_pooled_rows_and_searches_exactly(tmp_path):
    """At 80 px, 4,096 full-size rows would pass the basis's sample memory: the build pools 2 × 2."""
    from manifpt_cli.research.samples import bundled_photo_paths, random_crops
    from manifpt_cli.search import SearchPlan

    rng = np.random.default_rng(7)
    crops = [c for photo in bundled_photo_paths() for c in random_crops(photo, 6, 80, rng)]
    reals, suspects = np.stack(crops[::2]), np.stack(crops[1::2])
    np.save(tmp_path / "reals.npy", reals)
    out = tmp_path / "real80.h5"
    build_index([tmp_path / "reals.npy"], out, [Space.RGB], size=80)
    with h5py.File(out, "r") as handle:
        plan = SearchPlan(handle["spaces/rgb/search_mean"][()], handle["spaces/rgb/search_basis"][()])
    assert plan.pooling == 2
    queries = PixelEmbedder(Space.RGB)(suspects)
    with RealIndex(out) as index:
        found = index.nearest(Space.RGB, queries)
    database = PixelEmbedder(Space.RGB)(reals).astype(np.float64)
    distances = np.square(queries[:, None, :].astype(np.float64) - database[None]).sum(-1)
    assert np.array_equal(found.ids, distances.argmin(axis=1))
    assert np.array_equal(found.distances, distances.min(axis=1)), "brute force's float64 sums"
