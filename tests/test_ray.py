"""The Ray engine on a real local Ray cluster (2 CPUs): the same index and the same report rows
as the local engine, and the same guarantees."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app

pytest.importorskip("ray", reason="the [ray] extra is not installed")
pytestmark = pytest.mark.slow
runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def model(freq_model):
    return freq_model / "freq.onnx"


def test_index_build_on_ray_gives_the_same_index(dataset, real_index, tmp_path):
    out = tmp_path / "ray.h5"
    cli("index", "build", dataset / "real", "--out", out, "--engine", "ray", "--workers", "2", "-q")
    with h5py.File(out) as on_ray, h5py.File(real_index) as local:
        assert on_ray.attrs["index_hash"] == local.attrs["index_hash"]


def test_attribution_on_ray_gives_the_same_rows(dataset, real_index, model, tmp_path):
    suspects = tmp_path / "suspects"
    shutil.copytree(dataset / "suspects", suspects)
    (suspects / "broken.png").write_bytes(b"\x89PNG truncated")  # one bad file is one row on Ray too
    (suspects / "notes.txt").write_text("not an image")
    args = ["attribute", suspects, "--model", model, "--index", real_index, "--report", "csv", "--batch-size", "16"]
    cli(*args, "--out", tmp_path / "local.csv", code=3)
    cli(*args, "--out", tmp_path / "ray.csv", "--engine", "ray", "--workers", "2", code=3)
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


def test_engine_ray_without_ray_installed_says_how_to_get_it(real_index, model, dataset):
    script = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'ray': raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "from manifpt_cli.cli import main\n"
        "sys.argv = ['manifpt', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = ["attribute", dataset / "suspects", "--model", model, "--index", real_index, "--engine", "ray"]
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 2 and 'pip install "manifpt[ray]"' in result.stderr, result.stderr
