"""Bit flips in every file manifpt reads: never a traceback, and never a silent success on changed data.

A flipped bit either makes the reader refuse the file with a clear error, or (when it lands in
bytes nothing uses, such as HDF5 free space) changes nothing: the result is then identical to the
clean file's. A few seeds per run keep the suite fast; set MANIFPT_FUZZ_SEEDS for a longer soak.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.errors import ManifptError
from manifpt_cli.spaces import Space
from manifpt_cli.train import load_checkpoint

SEEDS = range(int(os.environ.get("MANIFPT_FUZZ_SEEDS", "4")))
runner = CliRunner()


def flipped_copy(path: Path, tmp_path: Path, seed: int) -> Path:
    """A copy of ``path`` with one random bit flipped."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    target = tmp_path / f"flipped-{seed}{path.suffix}"
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def clean(freq_model, artifacts_file, real_index, dataset, tmp_path_factory):
    work = freq_model
    folder = tmp_path_factory.mktemp("fuzz")
    suspects = folder / "suspects"
    shutil.copytree(dataset / "suspects" / "blur", suspects)
    report = attribute(work / "freq.onnx", real_index, suspects, folder / "clean.csv")
    assert report.exit_code == 0
    return {
        "work": work,
        "index": real_index,
        "artifacts": artifacts_file,
        "suspects": suspects,
        "clean": folder / "clean.csv",
    }


def attribute(model, index, suspects, out):
    args = ["attribute", suspects, "--model", model, "--index", index, "--report", "csv", "--out", out]
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)  # a traceback fails the test


def assert_refused_or_same(result, out: Path, clean_report: Path) -> None:
    assert result.exit_code in (0, 1, 2), result.stderr
    if result.exit_code == 0:
        assert out.read_bytes() == clean_report.read_bytes(), "success on a changed file must mean unchanged rows"
    else:
        assert result.stderr.startswith("error:") and not out.exists()


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_flip_in_the_index(clean, tmp_path, seed):
    index = flipped_copy(Path(clean["index"]), tmp_path, seed)
    out = tmp_path / "r.csv"
    result = attribute(clean["work"] / "freq.onnx", index, clean["suspects"], out)
    assert_refused_or_same(result, out, clean["clean"])


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_flip_in_the_model(clean, tmp_path, seed):
    model = flipped_copy(clean["work"] / "freq.onnx", tmp_path, seed)
    out = tmp_path / "r.csv"
    result = attribute(model, clean["index"], clean["suspects"], out)
    assert result.exit_code in (1, 2), "every byte of a model is covered by its digest"
    assert result.stderr.startswith("error:") and not out.exists()


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_flip_in_the_checkpoint(clean, tmp_path, seed):
    checkpoint = flipped_copy(clean["work"] / "freq.pt", tmp_path, seed)
    try:
        model, metadata = load_checkpoint(checkpoint)
    except ManifptError:
        return  # refused, with a message
    original, original_metadata = load_checkpoint(clean["work"] / "freq.pt")
    assert metadata == original_metadata
    for key, value in original.state_dict().items():
        assert (model.state_dict()[key] == value).all(), key


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_flip_in_the_artifacts_file(clean, tmp_path, seed):
    from manifpt_cli.artifacts import load_artifacts

    artifacts = flipped_copy(Path(clean["artifacts"]), tmp_path, seed)
    try:
        loaded = load_artifacts(artifacts, Space.FREQ)
    except ManifptError:
        return
    original = load_artifacts(clean["artifacts"], Space.FREQ)
    assert np.array_equal(loaded.artifacts, original.artifacts, equal_nan=True)
    assert np.array_equal(loaded.samples.labels, original.samples.labels)
    assert loaded.samples.paths == original.samples.paths
