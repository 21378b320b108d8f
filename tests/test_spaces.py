"""Stage 2: the embedding spaces and how backbone weights are found."""

from __future__ import annotations

import numpy as np
import pytest

from manifpt_cli.errors import UsageError, WeightsNotFoundError
from manifpt_cli.spaces import FREQ_EPS, PixelEmbedder, Space, load_backbone, make_embedder, parse_spaces


def test_rgb_is_the_pixels_in_unit_range():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    embedded = PixelEmbedder(Space.RGB)(pixels)
    assert embedded.shape == (2, 3 * 8 * 8) and embedded.dtype == np.float32
    assert np.allclose(embedded.reshape(2, 3, 8, 8), pixels.transpose(0, 3, 1, 2) / 255.0)


def test_freq_of_a_constant_image_is_one_centred_peak():
    # A constant image c has all its energy at DC: |F(0,0)| = c·H·W, placed at the centre by fftshift.
    pixels = np.full((1, 8, 8, 3), 51, dtype=np.uint8)  # 0.2 in [0, 1]
    spectrum = PixelEmbedder(Space.FREQ)(pixels).reshape(3, 8, 8)
    assert np.allclose(spectrum[:, 4, 4], np.log(0.2 * 64 + FREQ_EPS), atol=1e-5)
    off_centre = np.delete(spectrum.reshape(3, -1), 4 * 8 + 4, axis=1)
    assert (off_centre < -20).all(), "every other frequency is log(1e-12)-small"


def test_parse_spaces_names_the_valid_ones():
    assert parse_spaces("rgb, FREQ,rgb") == [Space.RGB, Space.FREQ]
    with pytest.raises(UsageError, match="rgb, freq, sl, ssl"):
        parse_spaces("rgb,pixels")


def test_missing_weights_name_both_ways_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(WeightsNotFoundError) as caught:
        make_embedder(Space.SL)
    message = str(caught.value)
    assert "TORCH_HOME" in message and "--sl-weights" in message and "resnet50-0676ba61.pth" in message
    with pytest.raises(WeightsNotFoundError, match="--ssl-weights"):
        make_embedder(Space.SSL, str(tmp_path / "missing.pth"))


def test_random_weights_are_explicit_seeded_and_recorded():
    _, first = load_backbone(Space.SL, "random:3")
    _, again = load_backbone(Space.SSL, "random:3")
    _, other = load_backbone(Space.SL, "random:4")
    assert first.source == "random:3" and first.sha256 == again.sha256 != other.sha256
    with pytest.raises(UsageError, match="integer seed"):
        load_backbone(Space.SL, "random:x")


def test_weights_file_and_hub_cache_load_the_same_weights(tmp_path, monkeypatch):
    import torch

    module, random = load_backbone(Space.SL, "random:5")
    state = {"fc.weight": torch.zeros(1000, 2048), **module.trunk.state_dict()}  # as torchvision saves it
    weights_file = tmp_path / "resnet50.pth"
    torch.save(state, weights_file)
    _, from_file = load_backbone(Space.SSL, str(weights_file))
    assert from_file.sha256 == random.sha256 and from_file.source == f"file:{weights_file}"

    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet50-0676ba61.pth").write_bytes(weights_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    _, from_hub = load_backbone(Space.SL)
    assert from_hub.sha256 == random.sha256 and from_hub.source == "hub:resnet50-0676ba61.pth"


def test_backbone_embeds_small_images_to_2048(tmp_path):
    embedder = make_embedder(Space.SL, "random:0")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = embedder(pixels)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
