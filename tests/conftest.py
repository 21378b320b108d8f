"""Shared fixtures: real photographs (crops of the photos bundled in scikit-image / scikit-learn),
"sources" made by passing real crops through deterministic degradations, and a real index.

Everything is written under pytest's tmp dirs; nothing comes from ../shared or the network.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

os.environ.setdefault("COLUMNS", "200")  # pin Rich's console width for stable output

import numpy as np
import pytest
from PIL import Image, ImageFilter

from manifpt_cli.research.samples import bundled_photo_paths, random_crops

SIZE = 32


def degrade(name: str, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Deterministic stand-ins for generators: each leaves a different, consistent trace."""
    image = Image.fromarray(pixels)
    if name == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=15)
        return np.asarray(Image.open(buffer).convert("RGB"))
    if name == "blur":
        return np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)))
    if name == "nearest":
        small = image.resize((SIZE // 2, SIZE // 2), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((SIZE, SIZE), Image.Resampling.NEAREST))
    if name == "noise":
        return np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    raise ValueError(name)


SOURCES = ("jpeg", "blur", "nearest", "noise")


def write_crops(folder: Path, crops: list[np.ndarray], prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(folder / f"{prefix}_{i:04d}.png")


def photo_crops(n_per_photo: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    crops = []
    for photo in bundled_photo_paths():
        crops += random_crops(photo, n_per_photo, SIZE, rng)
    return crops


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    found = bundled_photo_paths()
    assert len(found) >= 10, "scikit-image's bundled photographs are missing"
    return found


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """root/real (index photos), root/train/<source>, root/suspects/<source> — PNG files on disk."""
    root = tmp_path_factory.mktemp("dataset")
    write_crops(root / "real", photo_crops(12, seed=0), "real")
    for split, seed in (("train", 1), ("suspects", 2)):
        rng = np.random.default_rng(seed + 100)
        base = photo_crops(3 if split == "train" else 1, seed)
        for source in SOURCES:
            write_crops(root / split / source, [degrade(source, crop, rng) for crop in base], source)
    return root


@pytest.fixture(scope="session")
def real_index(dataset, tmp_path_factory) -> Path:
    from manifpt_cli.manifold import build_index
    from manifpt_cli.spaces import Space

    out = tmp_path_factory.mktemp("index") / "real.h5"
    build_index([dataset / "real"], out, [Space.RGB, Space.FREQ], size=SIZE)
    return out


@pytest.fixture(scope="session")
def artifacts_file(real_index, dataset, tmp_path_factory) -> Path:
    from manifpt_cli.artifacts import extract_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "artifacts.h5"
    sources = [(name, str(dataset / "train" / name)) for name in SOURCES]
    extract_artifacts(real_index, sources, out)
    return out


@pytest.fixture(scope="session")
def freq_model(artifacts_file, tmp_path_factory) -> Path:
    """A freq attributor trained on the session's artifacts and exported: the folder holding
    ``freq.pt`` and ``freq.onnx``."""
    from manifpt_cli.export import export_onnx
    from manifpt_cli.spaces import Space
    from manifpt_cli.train import TrainConfig, train_attributor

    work = tmp_path_factory.mktemp("freq-model")
    train_attributor(artifacts_file, Space.FREQ, work / "freq.pt", config=TrainConfig(epochs=2))
    export_onnx(work / "freq.pt", work / "freq.onnx")
    return work


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `manifpt demo --quick` per session (about 30 s on 2 cores): its folder and its CLI result.
    Tests that run commands on its files write their outputs elsewhere, or replace its own."""
    from typer.testing import CliRunner

    from manifpt_cli.cli import app

    workdir = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(workdir), "-q"])
    assert result.exit_code == 0, result.stderr
    return workdir, result


def replace_dataset(group, name: str, **layout) -> None:
    """``group[name]`` made anew, of the same type and attributes, with ``layout`` (h5py's
    create_dataset keywords): its data copied, or with ``shape`` given, nothing written."""
    old = group[name]
    dtype, attrs = old.dtype, dict(old.attrs)
    data = None if "shape" in layout else old[...]
    del group[name]
    group.create_dataset(name, data=data, dtype=dtype, **layout).attrs.update(attrs)


def finishes(task, unblock, timeout: float = 20.0):
    """``task()``'s result; fail (after calling ``unblock`` to free the thread) if it hangs."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = task()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        unblock()
        thread.join(5)
        pytest.fail(f"still running after {timeout} s: a FIFO was opened and waited on")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def writer_for(fifo: Path):
    """Opening the FIFO's write end (then closing it) frees a reader blocked on it."""

    def unblock() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    return unblock


def threads_searching(monkeypatch, search_class) -> set[bool]:
    """Patch ``search_class._nearest_block`` to note, for each block, whether it ran in one of
    :func:`manifpt_cli.search.map_blocks`'s threads; the set of what was noted."""
    searched_in: set[bool] = set()
    nearest_block = search_class._nearest_block

    def recorded(self, *args):
        searched_in.add(threading.current_thread().name.startswith("manifpt-search"))
        return nearest_block(self, *args)

    monkeypatch.setattr(search_class, "_nearest_block", recorded)
    return searched_in
