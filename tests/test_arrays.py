"""Array files of images (.npy / .npz) as real sets, and decoding that runs ahead of the caller."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli import images
from manifpt_cli.arrays import read_rows
from manifpt_cli.cli import app
from manifpt_cli.engines import _listed
from manifpt_cli.errors import ImageDecodeError, UsageError
from manifpt_cli.images import (
    DecodedImage,
    FailedImage,
    count_images,
    decode_folder,
    decode_image,
    discover_images,
    read_ahead,
    split_array_row,
)
from manifpt_cli.manifold import RealIndex, build_index
from manifpt_cli.settings import RunSettings, cpu_count
from manifpt_cli.spaces import Space

from .conftest import SIZE, finishes, photo_crops, write_crops, writer_for


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Real 32×32 photo crops, N×32×32×3 uint8."""
    return np.stack(photo_crops(2, seed=7))


def decoded(roots, settings=None) -> list:
    return [item for batch in decode_folder(roots, SIZE, settings or RunSettings(batch_size=4)) for item in batch]


def test_rows_of_npz_and_npy_are_the_images_their_pngs_decode_to(crops, tmp_path):
    np.savez_compressed(tmp_path / "real.npz", images=crops, source_id=np.arange(len(crops)))
    np.save(tmp_path / "real.npy", crops)
    write_crops(tmp_path / "png", list(crops), "real")
    from_pngs = decoded([tmp_path / "png"])
    for name in ("real.npz", "real.npy"):
        rows = decoded([tmp_path / name])
        assert [item.path for item in rows] == [f"{tmp_path / name}#row={i}" for i in range(len(crops))]
        for row, png, pixels in zip(rows, from_pngs, crops):
            assert isinstance(row, DecodedImage) and np.array_equal(row.pixels, png.pixels)
            assert row.sha256 == hashlib.sha256(pixels.tobytes()).hexdigest() and row.original_size == (SIZE, SIZE)
            assert row.pixels.flags.writeable
    assert count_images([tmp_path / "real.npz", tmp_path / "real.npy"]) == 2 * len(crops)


def test_rows_of_another_size_follow_the_size_policy_of_files(crops, tmp_path):
    # 40×48 rows are centre-cropped and resized exactly as the PNG of each row is.
    large = np.stack([np.asarray(Image.fromarray(c).resize((48, 40), Image.Resampling.BICUBIC)) for c in crops[:5]])
    np.save(tmp_path / "large.npy", large)
    write_crops(tmp_path / "png", list(large), "large")
    for row, png in zip(decoded([tmp_path / "large.npy"]), decoded([tmp_path / "png"])):
        assert np.array_equal(row.pixels, png.pixels) and row.original_size == png.original_size == (48, 40)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), "must be uint8 of shape (N, H, W, 3)"),
        (np.zeros((2, 8, 8), np.uint8), "must be uint8 of shape (N, H, W, 3)"),
        (np.array([{"pickled": 1}], dtype=object), "must be uint8"),
        (np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8)), "Fortran order"),
    ],
)
def test_an_array_that_is_not_images_is_one_error_row(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    path.write_bytes(_npy_bytes(content))
    (row,) = decoded([path])
    assert isinstance(row, FailedImage) and row.path == str(path) and message in row.error


def test_npz_without_an_images_array_and_rows_over_max_pixels_are_refused(crops, tmp_path):
    np.savez(tmp_path / "two.npz", a=crops, b=crops)
    (row,) = decoded([tmp_path / "two.npz"])
    assert "none is named 'images'" in row.error
    np.savez(tmp_path / "one.npz", pixels=crops[:3])  # a single array is taken whatever its name
    assert len(decoded([tmp_path / "one.npz"])) == 3
    (row,) = decoded([tmp_path / "one.npz"], RunSettings(max_pixels=SIZE * SIZE - 1))
    assert isinstance(row, FailedImage) and "over the limit of 1,023" in row.error


def test_truncated_array_keeps_the_rows_before_the_damage(crops, tmp_path):
    data = _npy_bytes(crops[:10])
    path = tmp_path / "cut.npy"
    path.write_bytes(data[: len(data) - SIZE * SIZE * 3 * 3 - 100])  # rows 0-5 whole, row 6 cut
    rows = decoded([path], RunSettings(batch_size=3))
    assert [type(row) for row in rows] == [DecodedImage] * 6 + [FailedImage]
    assert "truncated: the header declares 10 rows" in rows[-1].error and "rows 0 to 5 were read" in rows[-1].error
    assert np.array_equal(rows[5].pixels, crops[5])


def test_an_npz_member_must_hold_what_its_header_declares_and_be_stored_or_deflated(crops, tmp_path):
    """A bzip2 or LZMA member can unpack gigabytes from a kilobyte in one read, and a deflated one
    can hold more than its header declares: both are one error row, before any row is read."""

    def npz(name: str, method: int, declared_rows: int, data: bytes) -> Path:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (declared_rows, SIZE, SIZE, 3)}
        )
        with zipfile.ZipFile(tmp_path / name, "w", method) as archive:
            archive.writestr("images.npy", header.getvalue() + data)
        return tmp_path / name

    rows = crops[:4].tobytes()
    cases = {
        npz("bzip2.npz", zipfile.ZIP_BZIP2, 4, rows): "compressed with method 12",
        npz("lzma.npz", zipfile.ZIP_LZMA, 4, rows): "compressed with method 14",
        npz("more.npz", zipfile.ZIP_DEFLATED, 1, rows): f"holds {128 + len(rows):,} bytes, but its header declares",
        npz("fewer.npz", zipfile.ZIP_STORED, 5, rows): "bytes, but its header declares",
    }
    for path, message in cases.items():
        (row,) = decoded([path])
        assert isinstance(row, FailedImage) and message in row.error, (path.name, row.error)
    exact = decoded([npz("exact.npz", zipfile.ZIP_DEFLATED, 4, rows)])
    assert [row.pixels.tolist() for row in exact] == crops[:4].tolist()


def test_no_row_of_a_damaged_npz_is_handed_out(crops, tmp_path):
    np.savez_compressed(tmp_path / "real.npz", images=crops)
    data = bytearray((tmp_path / "real.npz").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(byte ^ 0x5A for byte in data[middle : middle + 64])
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    (row,) = decoded([tmp_path / "damaged.npz"])  # ZIP's CRC-32 is checked before the first row
    assert isinstance(row, FailedImage) and row.error.startswith("not a readable .npz archive")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_like_an_array_is_never_opened(tmp_path):
    fifo = tmp_path / "x.npz"
    os.mkfifo(fifo)
    (found,) = finishes(lambda: discover_images([fifo]), writer_for(fifo))  # the content check must not wait
    assert not found.array
    (row,) = finishes(lambda: decoded([fifo]), writer_for(fifo))
    assert isinstance(row, FailedImage) and row.error.startswith("not a regular file (a FIFO)")


def test_index_from_an_array_equals_the_index_from_its_pngs_and_skips_each_row_itself(crops, tmp_path):
    np.savez_compressed(tmp_path / "real.npz", images=crops)
    write_crops(tmp_path / "png", list(crops), "real")
    spaces = [Space.RGB, Space.FREQ]
    build_index([tmp_path / "real.npz"], tmp_path / "array.h5", spaces, settings=RunSettings(batch_size=5))
    build_index([tmp_path / "png"], tmp_path / "png.h5", spaces)
    with RealIndex(tmp_path / "array.h5") as from_array, RealIndex(tmp_path / "png.h5") as from_pngs:
        assert from_array.n_images == len(crops)
        rows = np.arange(len(crops))
        shas = from_array.sha256(rows)
        assert shas == [hashlib.sha256(c.tobytes()).hexdigest() for c in crops]
        for space in spaces:
            own = from_array.all_embeddings(space)
            assert np.array_equal(own, from_pngs.all_embeddings(space))
            # Leave-one-out by SHA-256: a row queried with its own hash never finds itself.
            found = from_array.nearest(space, own, shas)
            assert (found.ids != rows).all() and (found.ids >= 0).all()
            assert (from_array.nearest(space, own).ids == rows).all(), "without its hash it is its own neighbour"


def test_index_build_command_takes_an_array_file_and_ray_refuses_one(crops, tmp_path):
    np.save(tmp_path / "real.npy", crops[:8])
    result = CliRunner().invoke(
        app, ["index", "build", str(tmp_path / "real.npy"), "--out", str(tmp_path / "i.h5"), "-q"]
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "indexed 8 real images" in result.stderr
    with pytest.raises(UsageError, match="local engine"):
        _listed([tmp_path / "real.npy"], RunSettings())


def test_row_names_are_told_from_file_names(crops, tmp_path):
    np.save(tmp_path / "real.npy", crops[:2])
    row = f"{tmp_path / 'real.npy'}#row=1"
    assert split_array_row(row) == (str(tmp_path / "real.npy"), 1)
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(row, SIZE)  # a row is no file: only the array reader reads it
    write_crops(tmp_path, [crops[0]], "photo#row=1")  # a real file with such a name stays a file
    assert split_array_row(str(tmp_path / "photo#row=1_0000.png")) is None
    os.rename(tmp_path / "photo#row=1_0000.png", tmp_path / "real.npy#row=0")
    assert split_array_row(str(tmp_path / "real.npy#row=0")) is None
    assert split_array_row(f"{tmp_path / 'real.npy'}#row=²") is None


# --- decoding ahead of the caller ------------------------------------------------------------------


def test_read_ahead_stays_within_its_depth_and_raises_in_order():
    consumed = 0
    ahead = []

    def source():
        for i in range(20):
            ahead.append(i - consumed)
            yield i
        raise ValueError("after twenty")

    got = []
    with pytest.raises(ValueError, match="after twenty"):
        for item in read_ahead(source(), depth=2):
            got.append(item)
            consumed += 1
    assert got == list(range(20))
    assert max(ahead) <= 2 + 1, "one item in hand and two queued, at most"


def test_closing_read_ahead_stops_and_closes_its_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = read_ahead(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert closed.is_set(), "the source is closed before close() returns"


def test_decoding_threads_and_compute_threads_share_the_cores():
    assert RunSettings(workers=1).compute_threads == max(1, cpu_count() - 1)
    assert RunSettings(workers=cpu_count() + 3).compute_threads == 1
    assert RunSettings(workers=2, threads=5).compute_threads == 5


def test_numpys_blas_gets_the_compute_thread_budget():
    """NumPy's BLAS starts with a thread per core; apply() brings it within --threads."""
    script = (
        "import numpy, sys; from threadpoolctl import threadpool_info as info; "
        "from manifpt_cli.settings import RunSettings; "
        "before = [p['num_threads'] for p in info() if p['user_api'] == 'blas']; "
        "RunSettings(threads=int(sys.argv[1])).apply(); "
        "print(before, [p['num_threads'] for p in info() if p['user_api'] == 'blas'])"
    )
    for threads in (1, 2):
        done = subprocess.run([sys.executable, "-c", script, str(threads)], capture_output=True, text=True, check=True)
        before, after = (json.loads(part) for part in done.stdout.strip().replace("] [", "]|[").split("|"))
        assert before and after and set(after) == {threads}, "NumPy's BLAS and FAISS's alike"


def test_rows_of_an_array_are_attributed_and_verified_against_their_pixels(freq_model, real_index, crops, tmp_path):
    from manifpt_cli.casework import ReportTarget, run_attribution
    from manifpt_cli.report import ReportFormat
    from manifpt_cli.verify import CHANGED, MATCHES, verify_report

    suspects = tmp_path / "suspects.npy"
    np.save(suspects, crops[:6])
    report = tmp_path / "report.csv"
    summary = run_attribution(
        freq_model / "freq.onnx", real_index, [suspects], reports=[ReportTarget(ReportFormat.CSV, report)]
    )
    assert summary.total == summary.attributed == 6
    checked = verify_report(report)
    suspect_checks = [check for check in checked.checks if check.what == "suspect"]
    assert [check.path for check in suspect_checks] == [f"{suspects}#row={i}" for i in range(6)]
    assert checked.ok and all(check.result == MATCHES for check in suspect_checks)
    altered = crops[:6].copy()
    altered[4, 0, 0, 0] ^= 1
    np.save(suspects, altered)
    results = [check.result for check in verify_report(report).checks if check.what == "suspect"]
    assert results == [MATCHES] * 4 + [CHANGED, MATCHES]


def test_array_rows_are_read_a_batch_at_a_time_but_never_more_than_the_block_bytes(crops, tmp_path, monkeypatch):
    """Rows of a large-image array file are read in blocks bounded in bytes, whatever the batch."""
    many = np.concatenate([crops] * 5)[:10]  # 10 rows: blocks of 4 or 3 leave a shorter last one
    np.save(tmp_path / "real.npy", many)
    blocks = []

    def recorded(stream, shape, block):
        blocks.append(block)
        return read_rows(stream, shape, block)

    monkeypatch.setattr(images, "read_rows", recorded)
    assert len(decoded([tmp_path / "real.npy"], RunSettings(batch_size=4))) == len(many)
    monkeypatch.setattr(images, "ARRAY_BLOCK_BYTES", 3 * SIZE * SIZE * 3 + 1)  # three rows and a byte
    rows = decoded([tmp_path / "real.npy"], RunSettings(batch_size=4))
    assert blocks == [4, 3] and [row.pixels.tolist() for row in rows] == many.tolist()
