"""The lean install: building an rgb/freq index and attributing need no PyTorch, scikit-learn,
scikit-image or matplotlib. Each command runs in a subprocess where importing them fails."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from manifpt_cli.manifold import RealIndex

from .conftest import SOURCES

HEAVY = ("torch", "torchvision", "sklearn", "skimage", "matplotlib", "scipy", "onnx", "onnxscript")

# Runs the real CLI with an import hook that refuses the optional extras, as if not installed.
LEAN_CLI = f"""
import sys

class RefuseExtras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, RefuseExtras())
from manifpt_cli.cli import main
sys.argv = ["manifpt", *sys.argv[1:]]
main()
"""


def lean(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LEAN_CLI, *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def exported_model(freq_model):
    return freq_model / "freq.onnx"


def test_hook_really_refuses_the_extras():
    result = lean("train", "--artifacts", "x.h5", "--space", "freq", "--out", "x.pt")
    assert result.returncode == 2, result.stderr
    assert 'pip install "manifpt[train]"' in result.stderr and "Traceback" not in result.stderr


def test_index_build_and_attribute_without_the_extras(dataset, real_index, exported_model, tmp_path):
    index = tmp_path / "lean.h5"
    built = lean("index", "build", dataset / "real", "--out", index, "--space", "rgb,freq", "-q")
    assert built.returncode == 0, built.stderr
    with RealIndex(index) as lean_index, RealIndex(real_index) as full_index:
        assert lean_index.index_hash == full_index.index_hash, "the same files give the same index"

    artifacts = tmp_path / "artifacts.h5"
    sources = [arg for name in SOURCES[:2] for arg in ("--source", f"{name}={dataset / 'train' / name}")]
    extracted = lean("extract", "--index", index, *sources, "--out", artifacts, "-q")
    assert extracted.returncode == 0 and artifacts.is_file(), extracted.stderr

    report = tmp_path / "report.csv"
    suspects = dataset / "suspects"
    result = lean(
        "attribute", suspects, "--model", exported_model, "--index", index, "--report", "csv", "--out", report
    )
    assert result.returncode == 0, result.stderr
    with open(report, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(1 for path in suspects.rglob("*.png")) and all(row["status"] == "ok" for row in rows)
    assert {row["predicted"] for row in rows} <= set(SOURCES)
    assert json.loads((tmp_path / "report.csv.meta.json").read_text())["index_hash"]


@pytest.mark.parametrize(
    "command",
    [["zoo", "list", "."], ["demo", "--quick"], ["export", "x.pt", "--out", "x.onnx"]],
    ids=lambda command: command[0],
)
def test_commands_that_need_an_extra_say_which(command, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"placeholder")
    result = subprocess.run(
        [sys.executable, "-c", LEAN_CLI, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert 'pip install "manifpt[train]"' in result.stderr and "Traceback" not in result.stderr
