"""VQ-GAN (Esser et al. 2021): a VQ-VAE trained with a PatchGAN discriminator as well.

Generator (encoder, quantizer, decoder) loss, from ``disc_start`` on:
    nll  = mean((x - x^)^2) [+ perceptual_weight * LPIPS(x, x^) when local VGG weights are given]
    loss = nll + vq + lambda * disc_weight * (-mean D(x^))      lambda: the adaptive weight
Discriminator loss (its own optimizer, "disc_loss"): hinge, 0.5 (relu(1 - D(x)) + relu(1 + D(x^))).
Before ``disc_start`` the model is a plain VQ-VAE and the discriminator rests: the reconstruction
settles first, and the GAN then sharpens it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.metrics import psnr
from fastvq.models.config import option
from fastvq.models.discriminator import PatchDiscriminator
from fastvq.models.losses import PerceptualLoss, adaptive_weight, hinge_d_loss, hinge_g_loss
from fastvq.models.vqvae import VQVAE, VQVAEConfig


@dataclass
class VQGANConfig(VQVAEConfig):
    disc_start: int = option(300, "step from which the discriminator trains and the GAN loss is on")
    disc_weight: float = option(0.1, "weight of the adversarial term (times the adaptive weight)")
    disc_ndf: int = option(32, "discriminator base channels")
    disc_layers: int = option(2, "discriminator stride-2 layers (patch size grows with it)")
    perceptual_weights: str = option("", "local safetensors of VGG16 features for a perceptual loss ('' = off)")
    perceptual_weight: float = option(1.0, "weight of the perceptual loss (only with perceptual_weights)")

    PRESETS = {
        "tiny": {},
        "base": {"ch": 128, "num_res_blocks": 2, "attn": True, "embed_dim": 64, "codebook_size": 1024,
                 "disc_start": 5000, "disc_weight": 0.8, "disc_ndf": 64, "disc_layers": 3},
    }


class VQGAN(VQVAE):
    """A VQVAE plus ``discriminator``; ``training_losses`` adds "disc_loss" for the second optimizer."""

    name = "vqgan"

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__(cfg)
        self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_ndf, cfg.disc_layers)
        perceptual = PerceptualLoss(cfg.perceptual_weights) if cfg.perceptual_weights else None
        object.__setattr__(self, "perceptual", perceptual)  # frozen, loaded from its own file: not in our weights

    def _apply(self, fn, recurse=True):  # keep the unregistered perceptual net on the model's device
        if self.perceptual is not None:
            self.perceptual._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def training_losses(self, x: Tensor, y: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """"loss" (generator), "disc_loss" (discriminator), and detached terms for the logs."""
        x_hat, _, vq_loss = self(x)
        x_hat = x_hat.float()
        recon = F.mse_loss(x_hat, x)
        nll = recon
        out = {"recon": recon.detach(), "vq": vq_loss.detach(), "psnr": psnr(recon.detach())}
        if self.perceptual is not None:
            p = self.perceptual(x_hat, x)
            nll = nll + self.cfg.perceptual_weight * p
            out["perceptual"] = p.detach()
        zero = x.new_zeros(())
        if step >= self.cfg.disc_start:
            g_loss = hinge_g_loss(self.discriminator(x_hat))
            if torch.is_grad_enabled() and x_hat.requires_grad:
                weight = adaptive_weight(nll, g_loss, self.decoder.last_layer) * self.cfg.disc_weight
            else:  # validation: no gradients to compare
                weight = zero + self.cfg.disc_weight
            loss = nll + vq_loss + weight * g_loss
            disc_loss = hinge_d_loss(self.discriminator(x), self.discriminator(x_hat.detach()))
            out.update(g_loss=g_loss.detach(), disc_weight=weight.detach())
        else:
            loss, disc_loss = nll + vq_loss, zero
        out.update(loss=loss, disc_loss=disc_loss)
        return out

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        disc = {id(p) for p in self.discriminator.parameters()}
        return {"loss": [p for p in self.parameters() if id(p) not in disc],
                "disc_loss": list(self.discriminator.parameters())}
