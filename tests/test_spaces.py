"""Stage 2: the embedding spaces and how backbone weights are found."""

from __future__ import annotations

import numpy as np
import pytest

from manifpt_cli.errors import UsageError, WeightsNotFoundError
from manifpt_cli.spaces import (
    FREQ_EPS,
    PixelEmbedder,
    Space,
    load_backbone,
    make_embedder,
    parse_spaces,
    pixels_to_float,
    symmetric_half,
)


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


@pytest.mark.parametrize(("height", "width"), [(32, 32), (15, 15), (33, 33), (6, 10)])
def test_freq_from_the_real_fft_is_the_centred_spectrum_of_the_full_fft(height, width):
    from PIL import Image

    from manifpt_cli.research.samples import bundled_photo_paths

    photo = Image.open(bundled_photo_paths()[0]).convert("RGB").resize((width * 3, height * 2))
    pixels = np.asarray(photo).reshape(2, height, 3, width, 3).transpose(0, 2, 1, 3, 4).reshape(6, height, width, 3)
    images = pixels_to_float(pixels)
    full = np.log(np.abs(np.fft.fftshift(np.fft.fft2(images, axes=(-2, -1)), axes=(-2, -1))) + FREQ_EPS)
    embedded = PixelEmbedder(Space.FREQ)(pixels)
    assert embedded.dtype == np.float32 and embedded.shape == (6, 3 * height * width)
    assert np.allclose(embedded.reshape(full.shape), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("height", "width", "own_mirrors"), [(32, 32, 4), (31, 31, 1), (6, 5, 2), (5, 6, 2)])
def test_the_symmetric_half_maps_one_to_one_onto_the_full_vector(height, width, own_mirrors):
    half = symmetric_half(height, width)
    full_dim = 3 * height * width
    assert int((half.weights == 1).sum()) == 3 * own_mirrors and half.weights.sum() == full_dim
    assert len(half.unique) == 3 * (height * width + own_mirrors) // 2
    # Each stored bin is one pair {p, mirror(p)}; together the pairs partition the full vector.
    covered = np.concatenate([half.unique, half.mirror[half.weights == 2]])
    assert np.array_equal(np.sort(covered), np.arange(full_dim))
    assert np.array_equal(half.full_from_unique[half.unique], np.arange(len(half.unique)))
    assert np.array_equal(half.full_from_unique[half.mirror], np.arange(len(half.unique)))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    embedded = PixelEmbedder(Space.FREQ)(pixels)
    stored = half.fold(embedded)
    assert np.array_equal(half.unfold(stored), embedded), "φ is point-symmetric bit for bit"
    assert np.array_equal(half.fold(half.unfold(stored)), stored)
    full_distance = np.square(embedded[0].astype(np.float64) - embedded[1]).sum()
    half_distance = (half.weights * np.square(stored[0].astype(np.float64) - stored[1])).sum()
    assert np.isclose(full_distance, half_distance, rtol=1e-12)
    asymmetric = embedded.copy()
    asymmetric[0, half.mirror[half.weights == 2][0]] += 1
    with pytest.raises(ValueError, match="not point-symmetric"):
        half.fold(asymmetric)


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


def test_backbone_input_policies_resize_with_antialiasing_or_crop_as_the_authors():
    import torch
    import torch.nn.functional as F

    resize, weights = load_backbone(Space.SL, "random:0", "resize")
    crop, crop_weights = load_backbone(Space.SL, "random:0", "crop")
    legacy, _ = load_backbone(Space.SL, "random:0", "resize-legacy")
    assert (weights.input, crop_weights.input) == ("resize", "crop") and weights.sha256 == crop_weights.sha256
    large = torch.rand(1, 3, 240, 320)
    with torch.inference_mode():
        expected_crop = crop.trunk(
            (F.interpolate(large, size=(256, 341), mode="bilinear", antialias=True)[..., 16:240, 58:282] - crop.mean)
            / crop.std
        )
        assert torch.allclose(crop(large), expected_crop, atol=1e-5)
        shrunk = F.interpolate(large, size=(224, 224), mode="bilinear", antialias=True)
        assert torch.allclose(resize(large), resize.trunk((shrunk - resize.mean) / resize.std), atol=1e-5)
        assert not torch.allclose(resize(large), legacy(large), atol=1e-3), "antialiasing changes a shrink"
        small = torch.rand(2, 3, 32, 32)
        assert torch.allclose(resize(small), legacy(small), atol=1e-5), "and not an enlargement"
    with pytest.raises(UsageError, match="backbone input"):
        load_backbone(Space.SL, "random:0", "stretch")


def test_an_index_records_its_backbone_input_and_older_ones_read_as_legacy(tmp_path, dataset):
    import shutil

    import h5py

    from manifpt_cli.integrity import IntegrityError
    from manifpt_cli.manifold import RealIndex, build_index
    from manifpt_cli.spaces import backbone_weights_from

    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((dataset / "real").iterdir())[:6]:
        shutil.copy(path, few / path.name)
    out = tmp_path / "sl.h5"
    build_index([few], out, [Space.SL], size=16, weights={Space.SL: "random:0"}, backbone_input="crop")
    with RealIndex(out) as index:
        assert index.backbone_weights(Space.SL).input == "crop"
    with h5py.File(out, "r+") as handle:
        del handle["spaces/sl"].attrs["backbone_input"]
    with pytest.raises(IntegrityError):
        RealIndex(out)  # the attribute is covered by the digest: removing it is tampering
    assert backbone_weights_from({"weights_source": "hub:x", "weights_sha256": "0" * 64}).input == "resize-legacy"
