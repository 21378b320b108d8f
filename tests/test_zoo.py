"""The reference generator zoo: every family trains a few steps and samples the right images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.errors import UsageError
from manifpt_cli.research.zoo import list_zoo, make_design, read_zoo_metadata, sample_generator, train_generator

FAMILIES = [
    ("gan", "tconv", "batch", "ns"),
    ("gan", "pixelshuffle", "group", "wgan-gp"),
    ("gan", "bilinear", "none", "lsgan"),
    ("gan", "nearest", "batch", "hinge"),
    ("vae", "bilinear", "batch", None),
    ("flow", None, None, None),
    ("diffusion", "nearest", "group", None),
]


@pytest.mark.parametrize("family, upsample, norm, loss", FAMILIES, ids=lambda v: str(v))
def test_each_family_trains_and_samples(tmp_path, dataset, family, upsample, norm, loss):
    design = make_design(family, upsample, norm, loss, size=16, width=8)
    model_dir = tmp_path / "zoo" / f"{family}-{design.upsample}"
    result = train_generator([dataset / "real"], model_dir, design, iters=3, batch_size=8, seed=0)
    expected = {"gan": {"d", "g"}, "vae": {"recon", "kl"}, "flow": {"bpd"}, "diffusion": {"mse"}}[family]
    assert set(result.final_losses) == expected
    assert all(np.isfinite(v) for v in result.final_losses.values())
    written = sample_generator(model_dir, 5, tmp_path / "samples", seed=1, batch_size=2)
    assert len(written) == 5
    for path in written:
        with Image.open(path) as image:
            assert image.size == (16, 16) and image.mode == "RGB"
    metadata = read_zoo_metadata(model_dir)
    assert metadata["design"]["family"] == family and metadata["design"]["upsample"] == design.upsample
    assert metadata["design"]["loss"] == design.loss and metadata["training"]["iters"] == 3


def test_sampling_is_deterministic_per_seed(tmp_path, dataset):
    design = make_design("gan", size=16, width=8)
    train_generator([dataset / "real"], tmp_path / "g", design, iters=2, batch_size=8)
    first = [np.asarray(Image.open(p)) for p in sample_generator(tmp_path / "g", 4, tmp_path / "a", seed=7)]
    again = [np.asarray(Image.open(p)) for p in sample_generator(tmp_path / "g", 4, tmp_path / "b", seed=7)]
    other = [np.asarray(Image.open(p)) for p in sample_generator(tmp_path / "g", 4, tmp_path / "c", seed=8)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def test_design_choices_a_family_lacks_are_refused():
    with pytest.raises(UsageError, match="GAN loss"):
        make_design("vae", loss="hinge")
    with pytest.raises(UsageError, match="flow"):
        make_design("flow", upsample="tconv")
    with pytest.raises(UsageError, match="choose one of: gan, vae, flow, diffusion"):
        make_design("autoregressive")
    with pytest.raises(UsageError, match="tconv, nearest, bilinear, pixelshuffle"):
        make_design("gan", upsample="cubic")


def zoo_train(*args: str):
    return CliRunner().invoke(app, ["zoo", "train", *args])


def test_zoo_cli_train_sample_list(tmp_path, dataset):
    runner = CliRunner()
    zoo = tmp_path / "zoo"
    result = zoo_train(
        "--real",
        str(dataset / "real"),
        "--out",
        str(zoo / "tiny-gan"),
        "--family",
        "gan",
        "--upsample",
        "nearest",
        "--loss",
        "hinge",
        "--size",
        "16",
        "--iters",
        "2",
        "--batch-size",
        "8",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(
        app, ["zoo", "sample", str(zoo / "tiny-gan"), "--n", "3", "--out", str(tmp_path / "s"), "-q"]
    )
    assert result.exit_code == 0 and len(list((tmp_path / "s").iterdir())) == 3
    result = runner.invoke(app, ["zoo", "list", str(zoo)])
    assert result.exit_code == 0 and "tiny-gan" in result.stdout and "hinge" in result.stdout
    assert [m["name"] for m in list_zoo(zoo)] == ["tiny-gan"]
    result = zoo_train("--real", str(dataset / "real"), "--out", str(zoo / "x"), "--family", "vae", "--loss", "hinge")
    assert result.exit_code == 2 and "GAN loss" in result.stderr
    assert not (zoo / "x").exists()


def test_zoo_train_refuses_its_own_input_folder_and_an_existing_generator_before_training(
    tmp_path, dataset, monkeypatch
):
    import manifpt_cli.research.zoo as zoo

    def no_training(*args, **kwargs):
        raise AssertionError("refused only after loading the real images")

    monkeypatch.setattr(zoo, "load_real_images", no_training)
    design = make_design("vae", size=16, width=8)
    with pytest.raises(UsageError, match="inside the input folder"):
        train_generator([dataset / "real"], dataset / "real" / "gen", design, iters=1)
    assert not (dataset / "real" / "gen").exists()
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generator.pt").write_bytes(b"an earlier generator")
    with pytest.raises(UsageError, match="already exists"):
        train_generator([dataset / "real"], tmp_path / "gen", design, iters=1)


def test_zoo_train_lists_the_real_files_it_could_not_decode(tmp_path, dataset):
    import shutil

    real = tmp_path / "real"
    real.mkdir()
    for path in sorted((dataset / "real").iterdir())[:8]:
        shutil.copy(path, real)
    (real / "bad.png").write_bytes(b"not a png")
    result = zoo_train(
        "--real",
        str(real),
        "--out",
        str(tmp_path / "zoo" / "g"),
        "--family",
        "vae",
        "--size",
        "16",
        "--width",
        "4",
        "--iters",
        "1",
        "--batch-size",
        "4",
        "-q",
    )
    assert result.exit_code == 3 and "bad.png" in result.stderr, result.stderr
    assert (tmp_path / "zoo" / "g" / "generator.pt").is_file(), "trained on the rest"
