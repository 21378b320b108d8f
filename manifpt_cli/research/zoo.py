"""The reference generator zoo: small generators whose design choices are known and recorded.

A zoo model is a folder holding ``generator.pt``: ``{"state_dict", "metadata": "<JSON>"}`` with
``format`` = ``manifpt-zoo-generator``, the ``design`` (family, upsampling, normalisation, loss,
depth, skip connections, latent size, width, image size) and the ``training`` record. The fingerprint
analysis groups generators by these design fields.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..formats import FORMAT_VERSIONS, ZOO_FORMAT, load_checkpoint_payload, provenance, save_checkpoint
from ..images import decode_folder, split_batch
from ..outputs import check_outputs, results_folder
from ..settings import DEFAULT_SETTINGS, RunSettings
from .generators import GAN, NORMS, UPSAMPLINGS, VAE, Diffusion, Flow

CHECKPOINT_NAME = "generator.pt"
FAMILIES = ("gan", "vae", "flow", "diffusion")
GAN_LOSSES = ("ns", "hinge", "lsgan", "wgan-gp")
# Per family: (default upsampling, default normalisation, the loss it trains with). A flow's
# "upsampling" is its unsqueeze, a pixel shuffle; it has no normalisation layers.
FAMILY_DEFAULTS = {
    "gan": ("tconv", "batch", "ns"),
    "vae": ("tconv", "batch", "elbo"),
    "flow": ("pixelshuffle", "none", "nll"),
    "diffusion": ("nearest", "group", "ddpm"),
}
LEARNING_RATES = {"gan": 2e-4, "vae": 1e-3, "flow": 1e-3, "diffusion": 5e-4}


@dataclass
class Design:
    """Everything that shapes a generator's fingerprint (stored in its checkpoint)."""

    family: str
    upsample: str
    norm: str
    loss: str
    size: int = 32
    width: int = 32
    latent_dim: int = 64
    depth: int = 3  # resolution doublings (4×4 → size) or coupling/U-Net levels
    skip_connections: bool = False


def make_design(
    family: str,
    upsample: str | None = None,
    norm: str | None = None,
    loss: str | None = None,
    size: int = 32,
    width: int = 32,
) -> Design:
    """Fill in a family's defaults and refuse choices the family does not have."""
    if family not in FAMILIES:
        raise UsageError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    default_upsample, default_norm, default_loss = FAMILY_DEFAULTS[family]
    if family == "flow" and (upsample not in (None, default_upsample) or norm not in (None, default_norm)):
        raise UsageError("a flow's upsampling is fixed (pixelshuffle unsqueeze) and it has no normalisation")
    if family != "gan" and loss not in (None, default_loss):
        raise UsageError(f"loss chooses a GAN loss; a {family} trains with its own ({default_loss})")
    design = Design(family, upsample or default_upsample, norm or default_norm, loss or default_loss, size, width)
    if design.upsample not in UPSAMPLINGS:
        raise UsageError(f"unknown upsampling {design.upsample!r}; choose one of: {', '.join(UPSAMPLINGS)}")
    if design.norm not in NORMS:
        raise UsageError(f"unknown normalisation {design.norm!r}; choose one of: {', '.join(NORMS)}")
    if family == "gan" and design.loss not in GAN_LOSSES:
        raise UsageError(f"unknown GAN loss {design.loss!r}; choose one of: {', '.join(GAN_LOSSES)}")
    if size < 16 or size & (size - 1):
        raise UsageError(f"zoo generators need a power-of-two size ≥ 16, got {size}")
    design.depth = int(np.log2(size)) - 2 if family in ("gan", "vae") else (6 if family == "flow" else 2)
    design.skip_connections = family == "diffusion"
    return design


def build_generator(design: Design):
    if design.family == "gan":
        return GAN(design.size, design.latent_dim, design.width, design.upsample, design.norm)
    if design.family == "vae":
        return VAE(design.size, design.latent_dim, design.width, design.upsample, design.norm)
    if design.family == "flow":
        return Flow(design.size, 2 * design.width, design.depth)
    return Diffusion(design.size, design.width, design.upsample, design.norm)


def load_real_images(roots, size: int, settings: RunSettings = DEFAULT_SETTINGS) -> tuple[np.ndarray, list]:
    """All decodable images under ``roots`` as (N, size, size, 3) uint8, and the files that could
    not be decoded (:class:`FailedImage`; files that are not images are skipped)."""
    decoded, failures = [], []
    for batch in decode_folder(roots, size, settings):
        images, failed, _ = split_batch(batch)
        decoded.extend(item.pixels for item in images)
        failures.extend(failed)
    if not decoded:
        raise UsageError("no decodable real image found to train the generator on")
    return np.stack(decoded), failures


def _gan_losses(model, real, loss: str):
    """(discriminator loss, a closure giving the generator loss) for one step."""
    import torch
    import torch.nn.functional as F

    z = torch.randn(len(real), model.latent_dim, device=real.device)
    fake = model.generator(z)
    d_real, d_fake = model.discriminator(real), model.discriminator(fake.detach())
    if loss == "ns":
        d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    elif loss == "hinge":
        d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    elif loss == "lsgan":
        d_loss = 0.5 * ((d_real - 1).pow(2).mean() + d_fake.pow(2).mean())
    else:  # wgan-gp
        mix = torch.rand(len(real), 1, 1, 1, device=real.device)
        between = (mix * real + (1 - mix) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(model.discriminator(between).sum(), between, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        d_loss = d_fake.mean() - d_real.mean() + 10 * penalty

    def generator_loss():
        score = model.discriminator(fake)
        if loss == "ns":
            return F.softplus(-score).mean()
        if loss == "lsgan":
            return 0.5 * (score - 1).pow(2).mean()
        return -score.mean()  # hinge and wgan-gp

    return d_loss, generator_loss


@dataclass
class ZooTrainResult:
    path: str
    design: Design
    final_losses: dict[str, float]
    seconds: float
    failures: list = field(default_factory=list)  # real files that could not be decoded (FailedImage)


def train_generator(
    real_dirs,
    out_dir: str | os.PathLike,
    design: Design,
    *,
    iters: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> ZooTrainResult:
    """Train one zoo generator on the real images under ``real_dirs``; writes ``out_dir/generator.pt``.

    ``batch_size`` is the number of real images per optimisation step.
    """
    import torch

    if iters < 1:
        raise UsageError(f"iters must be at least 1, got {iters}")
    path = Path(out_dir) / CHECKPOINT_NAME
    path.parent.parent.mkdir(parents=True, exist_ok=True)  # a zoo is a tree of model folders; the CLI prints where
    check_outputs([path], inputs=real_dirs, overwrite=overwrite)  # before the training, not after
    started = time.perf_counter()
    device, progress = settings.device, settings.progress
    pixels, failures = load_real_images(real_dirs, design.size, settings)
    real = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(seed)
    model = build_generator(design).to(device)
    real = real.to(device)
    lr = LEARNING_RATES[design.family]
    if design.family == "gan":
        betas = (0.0, 0.9) if design.loss == "wgan-gp" else (0.5, 0.999)
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = torch.Generator(device="cpu").manual_seed(seed)
    progress.start(f"Training {design.family} ({design.upsample}, {design.norm}, {design.loss})", iters)
    losses: dict[str, float] = {}
    model.train()
    for _ in range(iters):
        batch = real[torch.randint(0, len(real), (batch_size,), generator=sampler).to(device)]
        flip = torch.rand(len(batch), generator=sampler).to(device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        if design.family == "gan":
            d_loss, generator_loss = _gan_losses(model, batch, design.loss)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = generator_loss()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            losses = {"d": d_loss.item(), "g": g_loss.item()}
        else:
            loss, losses = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress.advance(1, **losses)

    model.cpu().eval()
    name = Path(out_dir).name
    metadata = {
        "format": ZOO_FORMAT,
        "format_version": FORMAT_VERSIONS[ZOO_FORMAT],
        **provenance(),
        "name": name,
        "design": asdict(design),
        "training": {
            "iters": iters,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "n_real": len(real),
            "real": [os.path.abspath(os.fspath(r)) for r in real_dirs],
            "final_losses": losses,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(path, model.state_dict(), metadata, overwrite=overwrite)
    return ZooTrainResult(os.fspath(path), design, losses, time.perf_counter() - started, failures)


def _checkpoint_path(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    return path if path.is_file() else path / CHECKPOINT_NAME


def _read(model_dir: str | os.PathLike) -> tuple[dict, dict]:
    path = _checkpoint_path(model_dir)
    if not path.is_file():
        raise UsageError(f"no zoo model at {model_dir} (expected {path})")
    return load_checkpoint_payload(path, ZOO_FORMAT)


def read_zoo_metadata(model_dir: str | os.PathLike) -> dict:
    """The JSON metadata of a zoo model (folder or its generator.pt), loaded safely."""
    return _read(model_dir)[1]


def load_generator(model_dir: str | os.PathLike):
    """(generator module in eval mode, metadata), from one safe read of the checkpoint."""
    state, metadata = _read(model_dir)
    model = build_generator(Design(**metadata["design"]))
    model.load_state_dict(state)
    return model.eval(), metadata


def sample_generator(
    model_dir: str | os.PathLike,
    n: int,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    batch_size: int = 100,
    settings: RunSettings = DEFAULT_SETTINGS,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``n`` PNG samples to ``out_dir``; the same seed gives the same images.

    Sample files already in ``out_dir`` are refused up front unless ``overwrite``; missing folders
    on the way to ``out_dir`` are created.
    """
    import torch
    from PIL import Image

    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    device, progress = settings.device, settings.progress
    model, metadata = load_generator(model_dir)
    model.to(device)
    names = [f"{metadata['name']}_{i:05d}.png" for i in range(n)]
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)  # a tree of sample folders, as zoo train makes
    out = results_folder(out_dir, names, inputs=[model_dir], overwrite=overwrite)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    written: list[Path] = []
    progress.start(f"Sampling {metadata['name']}", n)
    with torch.no_grad():
        while len(written) < n:
            count = min(batch_size, n - len(written))
            images = model.sample(count, generator, device)
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for array in pixels:
                path = out / names[len(written)]
                Image.fromarray(array).save(path)
                written.append(path)
            progress.advance(count)
    return written


def list_zoo(root: str | os.PathLike) -> list[dict]:
    """Metadata of every zoo model found below ``root`` (folders holding generator.pt), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"no zoo folder at {root}")
    return [read_zoo_metadata(path.parent) for path in sorted(root.rglob(CHECKPOINT_NAME))]
