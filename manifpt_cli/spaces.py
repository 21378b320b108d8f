"""Stage 2: the four embedding spaces φ of ManiFPT.

| space | φ(x) for x in [0, 1], (3, H, W)                         | stored as        |
|-------|----------------------------------------------------------|------------------|
| rgb   | x                                                        | 3·H·W floats     |
| freq  | per channel log(|fftshift(fft2(x))| + 1e-12)             | 3·H·W floats (the index: the unique half) |
| sl    | ImageNet-supervised ResNet50 features (torchvision V1)   | 2048 floats      |
| ssl   | Barlow Twins ResNet50 features                           | 2048 floats      |

rgb and freq are computed with NumPy (no PyTorch needed at attribution time); sl and ssl run the
backbone of :mod:`models.backbones` in PyTorch at index time and in ONNX Runtime at attribution.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import UsageError, WeightsNotFoundError
from .integrity import state_dict_sha256

if TYPE_CHECKING:
    pass

FREQ_EPS = 1e-12
FEATURE_DIM = 2048  # ResNet50's penultimate features: the sl/ssl embedding size


class Space(str, Enum):
    """An embedding space; the value is the name used on the command line and in files."""

    RGB = "rgb"
    FREQ = "freq"
    SL = "sl"
    SSL = "ssl"

    @property
    def needs_backbone(self) -> bool:
        return self in (Space.SL, Space.SSL)

    def artifact_shape(self, size: int) -> tuple[int, ...]:
        """Shape of one artifact: (3, size, size) for image spaces, (FEATURE_DIM,) for feature spaces."""
        return (FEATURE_DIM,) if self.needs_backbone else (3, size, size)

    @property
    def default_arch(self) -> str:
        """The attributor that suits this space's artifacts (README, "Choosing an attributor")."""
        return default_arch(self.artifact_shape(32))


def default_arch(input_shape: tuple[int, ...]) -> str:
    """The small CNN for image-shaped inputs (C, H, W), an MLP for vectors.

    The paper's attributor is ResNet50-based (``arch="resnet50"``). On CPU and at ~50 images per
    class the small CNN was both ~10× faster and more accurate than resnet18 (README, "Choosing an
    attributor"), so it is the default.
    """
    return "small" if len(input_shape) == 3 else "mlp"


def parse_spaces(text: str) -> list[Space]:
    """``"rgb,freq"`` → [Space.RGB, Space.FREQ]; raises UsageError naming the valid spaces."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    valid = ", ".join(space.value for space in Space)
    if not names:
        raise UsageError(f"no embedding space given; choose from: {valid}")
    spaces = []
    for name in names:
        try:
            space = Space(name)
        except ValueError:
            raise UsageError(f"unknown embedding space {name!r}; choose from: {valid}") from None
        if space not in spaces:
            spaces.append(space)
    return spaces


def pixels_to_float(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


@functools.cache
def _centred_from_half(height: int, width: int) -> np.ndarray:
    """For each bin of the centred (fftshift-ed) H×W spectrum, row-major, its flat position in
    the H×(W//2+1) half spectrum of ``rfft2``.

    A real image's spectrum is conjugate-symmetric, F(-u, -v) = conj F(u, v): a bin ``rfft2``
    leaves out has the magnitude of the mirrored bin.
    """
    rows = (np.arange(height) - height // 2) % height  # fftshift: centred position -> frequency
    cols = (np.arange(width) - width // 2) % width
    mirrored = cols > width // 2
    source_rows = np.where(mirrored[None, :], (-rows[:, None]) % height, rows[:, None])
    source_cols = np.where(mirrored, width - cols, cols)[None, :]
    return (source_rows * (width // 2 + 1) + source_cols).ravel()


def log_spectrum(images: np.ndarray) -> np.ndarray:
    """Per-channel centred log-magnitude spectrum of (N, 3, H, W) float images, as float32.

    log(|fftshift(fft2(x))| + eps), computed on the real FFT's half spectrum and mirrored (faster
    than NumPy's full complex FFT; a value may differ from it in the last float32 digits).
    """
    height, width = images.shape[-2:]
    half = np.log(np.abs(np.fft.rfft2(images, axes=(-2, -1))) + FREQ_EPS).astype(np.float32)
    flat = half.reshape(*half.shape[:-2], -1)
    return np.take(flat, _centred_from_half(height, width), axis=-1).reshape(images.shape)


@dataclass(frozen=True)
class SymmetricHalf:
    """The unique bins of a freq vector: each channel's centred spectrum is point-symmetric bit
    for bit (bin (u, v) and its mirror (−u, −v) are one ``rfft2`` value, :func:`_centred_from_half`),
    so the index stores one bin per mirrored pair and the full vector is a gather away.

    Squared distances between such vectors are Σ_unique w·(x − y)², w = 2 for a mirrored pair and
    1 for a bin that is its own mirror: (0, 0), and (−H/2, ·), (·, −W/2) where a size is even
    (4 per channel when both are even, 2 when one is, 1 when both are odd).
    """

    unique: np.ndarray  # (m,) position in the full vector of each stored bin (the first of its pair)
    mirror: np.ndarray  # (m,) position of its mirror (itself for a self-mirrored bin)
    weights: np.ndarray  # (m,) float64: 2.0 for a mirrored pair, 1.0 for a self-mirrored bin
    full_from_unique: np.ndarray  # (3·H·W,) for each position of the full vector, its stored bin

    def unfold(self, stored: np.ndarray) -> np.ndarray:
        """(n, m) stored bins → (n, 3·H·W) full vectors, bit for bit."""
        return np.take(stored, self.full_from_unique, axis=-1)

    def fold(self, full: np.ndarray) -> np.ndarray:
        """(n, 3·H·W) point-symmetric vectors → (n, m) stored bins; ValueError if one is not symmetric."""
        stored = np.take(full, self.unique, axis=-1)
        if not np.array_equal(stored, np.take(full, self.mirror, axis=-1)):
            raise ValueError("freq embeddings that are not point-symmetric cannot be stored as their unique half")
        return stored


@functools.cache
def symmetric_half(height: int, width: int, channels: int = 3) -> SymmetricHalf:
    """The :class:`SymmetricHalf` of ``channels`` centred H×W spectra, flattened channel-first."""
    # Centred position i holds frequency i − H//2; its mirror −(i − H//2) sits at 2·(H//2) − i (mod H).
    mirror_rows = (2 * (height // 2) - np.arange(height)) % height
    mirror_cols = (2 * (width // 2) - np.arange(width)) % width
    plane = height * width
    mirror = (
        np.arange(channels)[:, None, None] * plane + mirror_rows[None, :, None] * width + mirror_cols[None, None, :]
    ).ravel()
    position = np.arange(channels * plane)
    unique = position[position <= mirror]
    half = SymmetricHalf(
        unique=unique,
        mirror=mirror[unique],
        weights=np.where(mirror[unique] == unique, 1.0, 2.0),
        full_from_unique=np.searchsorted(unique, np.minimum(position, mirror)),
    )
    for table in (half.unique, half.mirror, half.weights, half.full_from_unique):
        table.setflags(write=False)
    return half


class Embedder(Protocol):
    """Maps a batch of (N, H, W, 3) uint8 images to (N, D) float32 embeddings."""

    space: Space

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass
class PixelEmbedder:
    """φ for the rgb and freq spaces (NumPy only)."""

    space: Space

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        images = pixels_to_float(pixels)
        if self.space is Space.FREQ:
            images = log_spectrum(images)
        return images.reshape(len(images), -1)


# --- backbone weights ------------------------------------------------------------------------

# Where torchvision / torch.hub put these files when they download them (TORCH_HOME/hub/checkpoints).
SL_WEIGHTS_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # ResNet50_Weights.IMAGENET1K_V1
# The URL facebookresearch/barlowtwins hubconf.py downloads (torch.hub caches it as resnet50.pth).
SSL_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth"
WEIGHTS_URLS = {Space.SL: SL_WEIGHTS_URL, Space.SSL: SSL_WEIGHTS_URL}
WEIGHTS_LABELS = {Space.SL: "ImageNet-supervised ResNet50", Space.SSL: "Barlow Twins ResNet50"}


@dataclass(frozen=True)
class BackboneWeights:
    """Which weights a backbone runs with: ``source`` says where from, ``sha256`` what they are.

    ``source`` is ``hub:<file name>``, ``file:<path>`` or ``random:<seed>`` (tests only, asked for
    explicitly). ``sha256`` hashes the state dict's names and tensor bytes, so the same weights
    match whatever file they were read from.
    """

    source: str
    sha256: str
    input: str = "resize"  # the input policy: resize, crop or resize-legacy (models.backbones)

    @property
    def load_argument(self) -> str | None:
        """The ``weights`` argument of :func:`load_backbone` that reads the same weights again."""
        kind, _, value = self.source.partition(":")
        return {"hub": None, "file": value, "random": self.source}.get(kind)


def backbone_attrs(backbone: BackboneWeights | None) -> dict[str, str]:
    """HDF5 attributes recording a space's backbone (none for rgb/freq)."""
    if backbone is None:
        return {}
    return {"weights_source": backbone.source, "weights_sha256": backbone.sha256, "backbone_input": backbone.input}


def backbone_weights_from(attrs) -> BackboneWeights:
    """The BackboneWeights recorded by :func:`backbone_attrs` (files before 0.3: ``resize-legacy``)."""
    return BackboneWeights(
        str(attrs["weights_source"]), str(attrs["weights_sha256"]), str(attrs.get("backbone_input", "resize-legacy"))
    )


def hub_cache_path(space: Space) -> str:
    """Where the standard torch hub download of ``space``'s weights lives (honours TORCH_HOME)."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URLS[space]))


def _weights_flag(space: Space) -> str:
    return f"--{space.value}-weights"


BACKBONE_INPUTS = ("resize", "crop")  # what a new index may choose (models.backbones.INPUT_POLICIES)


def load_backbone(space: Space, weights: str | None = None, input_policy: str = "resize"):
    """Build the ``space`` backbone with its weights; returns (module in eval mode, BackboneWeights).

    ``weights`` is None (the torch hub cache), a file path, or ``random:SEED`` (seeded random
    weights, for tests; recorded as such in every file made with them). ``input_policy`` says how
    an image is brought to 224×224 (see :mod:`models.backbones`).

    Raises:
        WeightsNotFoundError: neither the hub cache nor the given file holds the weights.
    """
    import torch

    from models import INPUT_POLICIES, ResNet50Embedding

    if not space.needs_backbone:
        raise UsageError(f"the {space.value} space has no backbone")
    if input_policy not in INPUT_POLICIES:
        raise UsageError(f"unknown backbone input {input_policy!r}; choose one of: {', '.join(BACKBONE_INPUTS)}")
    module = ResNet50Embedding(input_policy)
    if weights and weights.startswith("random:"):
        seed_text = weights.split(":", 1)[1]
        if not seed_text.isdigit():
            raise UsageError(f"random weights need an integer seed, as in random:0 (got {weights!r})")
        with torch.random.fork_rng():
            torch.manual_seed(int(seed_text))
            module = ResNet50Embedding(input_policy)
        source = f"random:{int(seed_text)}"
    else:
        path = weights or hub_cache_path(space)
        if not os.path.isfile(path):
            where = f"the file {path}" if weights else f"the torch hub cache ({path})"
            raise WeightsNotFoundError(
                f"{WEIGHTS_LABELS[space]} weights for the {space.value!r} space were not found in {where}. "
                f"Supply them one of two ways: put {WEIGHTS_URLS[space]} into "
                f"$TORCH_HOME/hub/checkpoints/ (torch's standard cache; TORCH_HOME is now "
                f"{os.environ.get('TORCH_HOME', 'unset')}), or pass {_weights_flag(space)} FILE."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            module.load_trunk_state(state)
        except Exception as exc:
            raise WeightsNotFoundError(f"cannot load {space.value} weights from {path}: {exc}") from None
        source = f"file:{os.path.abspath(path)}" if weights else f"hub:{os.path.basename(path)}"
    module.eval()
    return module, BackboneWeights(source, state_dict_sha256(module.trunk.state_dict()), input_policy)


@dataclass
class TorchBackboneEmbedder:
    """φ for sl/ssl in PyTorch (index build and extraction)."""

    space: Space
    module: object
    weights: BackboneWeights
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(pixels_to_float(pixels)).to(self.device)
            return self.module(batch).float().cpu().numpy()


def make_embedder(
    space: Space, weights: str | None = None, device: str = "cpu", input_policy: str = "resize"
) -> Embedder:
    """The PyTorch/NumPy embedder of ``space`` (see :func:`load_backbone` for ``weights``)."""
    if not space.needs_backbone:
        return PixelEmbedder(space)
    module, resolved = load_backbone(space, weights, input_policy)
    return TorchBackboneEmbedder(space, module, resolved, device)
