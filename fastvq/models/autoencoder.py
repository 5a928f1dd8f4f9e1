"""Autoencoder: the first stop of the journey. Encoder -> small continuous latent -> decoder.

Trained on reconstruction alone, loss = mean((x - x^)^2). It compresses (a 32x32x3 image to an
8x8x4 latent with the tiny preset) but cannot make new images: nothing says what a "typical"
latent looks like, which is the gap the VAE fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.metrics import psnr
from fastvq.models.blocks import ConvNetConfig, Decoder, Encoder
from fastvq.models.config import option


@dataclass
class AEConfig(ConvNetConfig):
    latent_channels: int = option(4, "channels of the latent (its size is the image's / 2^(len(ch_mult) - 1))")

    PRESETS = {"tiny": {}, "base": {"ch": 128, "num_res_blocks": 2, "attn": True, "latent_channels": 8}}


class AutoEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> z (B, latent_channels, h, w) -> x^ (B, C, H, W)."""

    name = "ae"

    def __init__(self, cfg: AEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.decoder = Decoder(cfg, cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> reconstruction (B, C, H, W)."""
        return self.decoder(self.encoder(x))

    def training_losses(self, x: Tensor, y: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """"loss" = "recon" = mean squared error; "psnr" in dB (detached)."""
        recon = F.mse_loss(self(x).float(), x)
        return {"loss": recon, "recon": recon.detach(), "psnr": psnr(recon.detach())}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": list(self.parameters())}
