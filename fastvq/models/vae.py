"""Variational autoencoder (Kingma & Welling 2014): a latent space you can sample from.

The encoder gives a mean and a log-variance per latent element, q(z|x) = N(mu, exp(logvar));
z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) (the reparameterisation trick: the noise is an
input, so gradients reach mu and logvar). The decoder's likelihood is Gaussian with a fixed
standard deviation sigma (``likelihood_std``, on the [-1, 1] pixel scale). Per image:

    nll  = sum (x - x^)^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)           (D = C H W)
    kl   = KL(q(z|x) || N(0, I)) = 1/2 sum (mu^2 + exp(logvar) - 1 - logvar)
    ELBO = -(nll + kl)  <=  log p(x)      (reported in nats per image, higher is better)

The optimised loss is (nll + beta * kl) / D without the constant: beta = 1 maximises the ELBO,
beta > 1 trades reconstruction for a smoother latent. Sampling: z ~ N(0, I) -> decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastvq.metrics import psnr
from fastvq.models.blocks import ConvNetConfig, Decoder, Encoder, downsample_factor
from fastvq.models.config import option


@dataclass
class VAEConfig(ConvNetConfig):
    latent_channels: int = option(4, "channels of the latent z")
    beta: float = option(1.0, "weight of the KL term (1: the ELBO)")
    likelihood_std: float = option(0.1, "sigma of the Gaussian decoder likelihood, on the [-1, 1] scale")

    PRESETS = {"tiny": {}, "base": {"ch": 128, "num_res_blocks": 2, "attn": True, "latent_channels": 8}}


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over all but the batch axis. (B, ...) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAE(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> q(z|x) over z (B, latent_channels, h, w) -> x^ (B, C, H, W)."""

    name = "vae"

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels)  # mean and log-variance
        self.decoder = Decoder(cfg, cfg.latent_channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (mu, logvar), each (B, latent_channels, h, w); logvar clamped to [-30, 20]."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (x^, mu, logvar), with z drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar

    def training_losses(self, x: Tensor, y: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """"loss" (per-pixel, for the optimizer), "recon" (MSE), "kl" and "elbo" (nats per image)."""
        x_hat, mu, logvar = self(x)
        d = x[0].numel()
        sq = (x_hat.float() - x).pow(2).flatten(1).sum(1)  # (B,)
        var = self.cfg.likelihood_std**2
        nll = sq / (2 * var) + 0.5 * d * math.log(2 * math.pi * var)  # (B,)
        kl = kl_to_standard_normal(mu, logvar)  # (B,)
        loss = (sq / (2 * var) + self.cfg.beta * kl).mean() / d
        recon = (sq / d).mean().detach()
        return {"loss": loss, "recon": recon, "kl": kl.mean().detach(), "elbo": -(nll + kl).mean().detach(),
                "psnr": psnr(recon)}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: x (B, C, H, W) -> x^ (B, C, H, W)."""
        return self.decoder(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, image_size: int, generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I) -> decoder: (n, C, image_size, image_size)."""
        side = image_size // downsample_factor(self.cfg)
        z = torch.randn(n, self.cfg.latent_channels, side, side, generator=generator)
        return self.decoder(z.to(self.decoder.conv_in.weight.device))

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": list(self.parameters())}
