"""Small generative models for the reference zoo, each with its design choices as constructor arguments.

- GAN: DCGAN-style generator and discriminator (Radford et al., 2016) with a choice of upsampling
  (transposed conv, nearest or bilinear + conv, pixel shuffle) and normalisation (batch, group, none).
- VAE: convolutional encoder + the same decoder family (Kingma & Welling, 2014).
- Flow: RealNVP-style affine couplings on a 2×2 squeeze (Dinh et al., 2017).
- Diffusion: a small U-Net predicting noise (Ho et al., 2020), sampled with DDIM (Song et al., 2021).

Images are (N, 3, S, S) in [-1, 1]. S is a power of two ≥ 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLINGS = ("tconv", "nearest", "bilinear", "pixelshuffle")
NORMS = ("batch", "group", "none")


def cpu_noise(shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """Gaussian noise drawn on the CPU, so one seed gives the same samples on any device."""
    return torch.randn(*shape, generator=generator).to(device)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; choose one of: {', '.join(NORMS)}")


def upsample_block(kind: str, in_ch: int, out_ch: int) -> nn.Module:
    """Double the resolution the way ``kind`` says; these are the traces the paper's clustering finds."""
    if kind == "tconv":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
    if kind in ("nearest", "bilinear"):
        return nn.Sequential(nn.Upsample(scale_factor=2, mode=kind), nn.Conv2d(in_ch, out_ch, 3, padding=1))
    if kind == "pixelshuffle":
        return nn.Sequential(nn.Conv2d(in_ch, out_ch * 4, 3, padding=1), nn.PixelShuffle(2))
    raise ValueError(f"unknown upsampling {kind!r}; choose one of: {', '.join(UPSAMPLINGS)}")


def _levels(size: int) -> int:
    if size < 16 or size & (size - 1):
        raise ValueError(f"zoo generators need a power-of-two size ≥ 16, got {size}")
    return int(math.log2(size)) - 2  # from 4×4 up to size×size


class ConvDecoder(nn.Module):
    """latent (N, z) → image (N, 3, S, S): 4×4 seed, then one upsampling block per doubling."""

    def __init__(self, latent_dim: int, size: int, width: int, upsample: str, norm: str) -> None:
        super().__init__()
        levels = _levels(size)
        channels = [max(width, width * 2 ** (levels - 1 - i)) for i in range(levels)] + [width]
        self.seed_channels = channels[0]
        self.project = nn.Linear(latent_dim, channels[0] * 16)
        blocks: list[nn.Module] = [norm_layer(norm, channels[0]), nn.ReLU(inplace=True)]
        for i in range(levels):
            blocks += [
                upsample_block(upsample, channels[i], channels[i + 1]),
                norm_layer(norm, channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
        blocks += [nn.Conv2d(channels[-1], 3, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), self.seed_channels, 4, 4))


class ConvEncoder(nn.Module):
    """image (N, 3, S, S) → features (N, F): stride-2 convolutions down to 4×4."""

    def __init__(self, size: int, width: int, norm: str, out_features: int) -> None:
        super().__init__()
        levels = _levels(size)
        layers: list[nn.Module] = []
        channels = 3
        for i in range(levels):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 4, stride=2, padding=1),
                norm_layer(norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers += [nn.Flatten(), nn.Linear(channels * 16, out_features)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GAN(nn.Module):
    """Generator + discriminator; the discriminator has no normalisation (safe for WGAN-GP)."""

    def __init__(
        self, size: int = 32, latent_dim: int = 64, width: int = 32, upsample: str = "tconv", norm: str = "batch"
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.generator = ConvDecoder(latent_dim, size, width, upsample, norm)
        self.discriminator = ConvEncoder(size, width, "none", 1)

    def sample(self, n: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
        return self.generator(cpu_noise((n, self.latent_dim), generator, device))


class VAE(nn.Module):
    def __init__(
        self, size: int = 32, latent_dim: int = 64, width: int = 32, upsample: str = "tconv", norm: str = "batch"
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(size, width, norm, 2 * latent_dim)
        self.decoder = ConvDecoder(latent_dim, size, width, upsample, norm)

    def loss(self, x: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.mse_loss(self.decoder(z), x, reduction="sum") / len(x)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(x)
        return recon + beta * kl, {"recon": recon.item(), "kl": kl.item()}

    def sample(self, n: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
        return self.decoder(cpu_noise((n, self.latent_dim), generator, device))


class AffineCoupling(nn.Module):
    """y_b = x_b · exp(s(x_a)) + t(x_a) on half the channels; ``flip`` swaps which half conditions."""

    def __init__(self, channels: int, hidden: int, flip: bool) -> None:
        super().__init__()
        self.flip = flip
        half = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(half, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * half, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=1)
        return (b, a) if self.flip else (a, b)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat((b, a) if self.flip else (a, b), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._split(x)
        log_s, t = self.net(a).chunk(2, dim=1)
        log_s = torch.tanh(log_s)
        return self._join(a, b * log_s.exp() + t), log_s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = self._split(y)
        log_s, t = self.net(a).chunk(2, dim=1)
        return self._join(a, (b - t) * torch.exp(-torch.tanh(log_s)))


class Flow(nn.Module):
    """RealNVP-style flow: squeeze 2×2 (3 → 12 channels), alternating affine couplings, unsqueeze."""

    def __init__(self, size: int = 32, width: int = 64, couplings: int = 6, temperature: float = 0.7) -> None:
        super().__init__()
        _levels(size)
        self.size, self.temperature = size, temperature
        self.couplings = nn.ModuleList(AffineCoupling(12, width, flip=i % 2 == 1) for i in range(couplings))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative log-likelihood in bits per dimension (with uniform dequantisation)."""
        x = x + torch.rand_like(x) * (2.0 / 256)
        z, log_det = F.pixel_unshuffle(x, 2), torch.zeros(len(x), device=x.device)
        for coupling in self.couplings:
            z, ld = coupling(z)
            log_det = log_det + ld
        dims = z[0].numel()
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)
        nll = -(log_pz + log_det) / dims / math.log(2) + math.log2(128)
        return nll.mean(), {"bpd": nll.mean().item()}

    def sample(self, n: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
        z = cpu_noise((n, 12, self.size // 2, self.size // 2), generator, device) * self.temperature
        for coupling in reversed(self.couplings):
            z = coupling.inverse(z)
        return F.pixel_shuffle(z, 2).clamp(-1, 1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, norm: str) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm_layer(norm, in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm_layer(norm, out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class UNet(nn.Module):
    """Two-level U-Net with skip connections, predicting the noise ε of x_t."""

    def __init__(self, width: int = 32, upsample: str = "nearest", norm: str = "group") -> None:
        super().__init__()
        self.time_dim = width * 4
        self.time_mlp = nn.Sequential(
            nn.Linear(width, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim)
        )
        self.width = width
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = ResBlock(width, width, self.time_dim, norm)
        self.down2 = ResBlock(width, 2 * width, self.time_dim, norm)
        self.middle = ResBlock(2 * width, 2 * width, self.time_dim, norm)
        self.up2 = upsample_block(upsample, 2 * width, 2 * width)
        self.dec2 = ResBlock(4 * width, width, self.time_dim, norm)
        self.up1 = upsample_block(upsample, width, width)
        self.dec1 = ResBlock(2 * width, width, self.time_dim, norm)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.width))
        h0 = self.down1(self.stem(x), temb)  # S
        h1 = self.down2(F.avg_pool2d(h0, 2), temb)  # S/2
        h = self.middle(F.avg_pool2d(h1, 2), temb)  # S/4
        h = self.dec2(torch.cat([self.up2(h), h1], dim=1), temb)
        h = self.dec1(torch.cat([self.up1(h), h0], dim=1), temb)
        return self.out(F.silu(h))


class Diffusion(nn.Module):
    """DDPM training (linear β schedule, ε-prediction), deterministic DDIM sampling in few steps."""

    def __init__(
        self,
        size: int = 32,
        width: int = 32,
        upsample: str = "nearest",
        norm: str = "group",
        timesteps: int = 1000,
        sample_steps: int = 20,
    ) -> None:
        super().__init__()
        _levels(size)
        self.size, self.timesteps, self.sample_steps = size, timesteps, sample_steps
        self.net = UNet(width, upsample, norm)
        betas = torch.linspace(1e-4, 0.02, timesteps)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, dim=0), persistent=False)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        t = torch.randint(0, self.timesteps, (len(x),), device=x.device)
        noise = torch.randn_like(x)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.net(a.sqrt() * x + (1 - a).sqrt() * noise, t), noise)
        return loss, {"mse": loss.item()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
        x = cpu_noise((n, 3, self.size, self.size), generator, device)
        steps = torch.linspace(self.timesteps - 1, 0, self.sample_steps).long()
        for i, t in enumerate(steps):
            a = self.alpha_bar[t]
            a_prev = self.alpha_bar[steps[i + 1]] if i + 1 < len(steps) else torch.ones((), device=x.device)
            eps = self.net(x, t.repeat(n).to(x.device))
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1, 1)
