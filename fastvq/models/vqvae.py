"""VQ-VAE (van den Oord et al. 2017): encoder -> nearest codebook vector -> decoder.

Loss, the paper's three terms:
    recon  = mean((x - x^)^2)                              trains encoder + decoder
    vq     = mean((sg(z) - e)^2) + beta mean((z - sg(e))^2)  codebook term + commitment term
    loss   = recon + vq
The quantizer (the config's ``quantizer`` field, fastvq.VectorQuantizer by default) computes
the vq terms and the straight-through gradient; this module adds reconstruction.

Keeping the codebook in use (a codebook that collapses onto a few codes cannot reconstruct) is
the quantizer's own job: for the default ``quantizer="vq"`` the config's fields turn on
fastvq.VectorQuantizer's ``kmeans_init`` (codes start as k-means++/Lloyd centroids of the first
training batch's encoder outputs, so every code begins inside the data) and
``threshold_ema_dead_code`` with ``decay`` (a code whose usage EMA falls below the threshold is
moved onto an encoder output of the current batch, as in Jukebox / SoundStream), all without a
host synchronisation. ``quantizer_kwargs`` override them; the other quantizers (FSQ, LFQ, the
textbook baseline) get no codebook care.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.metrics import code_usage, psnr
from fastvq.models.blocks import ConvNetConfig, Decoder, Encoder, downsample_factor
from fastvq.models.config import option
from fastvq.models.quantizer_registry import build_quantizer


@dataclass
class VQVAEConfig(ConvNetConfig):
    embed_dim: int = option(16, "latent channels, the size of a codebook vector")
    codebook_size: int = option(256, "number of codes K")
    quantizer: str = option("vq", "'vq' (fastvq.VectorQuantizer), 'fsq', 'lfq', or 'textbook' (cdist baseline)")
    quantizer_kwargs: dict = option({}, "extra keyword arguments for the quantizer, as JSON")
    commitment_weight: float = option(0.25, "beta, weight of the commitment term")
    init_codebook_from_data: bool = option(True, "quantizer 'vq': k-means init of the codebook on the first batch")
    dead_code_threshold: float = option(0.5, "quantizer 'vq': revive codes whose usage EMA is below this (0: off)")
    dead_code_decay: float = option(0.95, "quantizer 'vq': decay of the per-code usage EMA")

    PRESETS = {
        "tiny": {},
        "base": {"ch": 128, "num_res_blocks": 2, "attn": True, "embed_dim": 64, "codebook_size": 1024},
    }


def usage_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Code usage of a set of indices (any shape): fraction of codes used and perplexity, as floats."""
    used, ppl = code_usage(indices, codebook_size, torch.float64)
    return {"codes_used_fraction": float(used), "perplexity": float(ppl)}


class VQVAE(nn.Module):
    """Images (B, C, H, W) in [-1, 1] <-> code indices (B, H/f, W/f), f = 2^(len(ch_mult) - 1)."""

    name = "vqvae"

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, cfg.embed_dim)
        kwargs = dict(cfg.quantizer_kwargs)
        if cfg.quantizer == "vq":  # codebook care is VectorQuantizer's own (see the module docstring)
            care = {
                "kmeans_init": cfg.init_codebook_from_data,
                "threshold_ema_dead_code": cfg.dead_code_threshold,
                "decay": cfg.dead_code_decay,
            }
            kwargs = care | kwargs
        self.quantizer = build_quantizer(
            cfg.quantizer, cfg.embed_dim, cfg.codebook_size, cfg.commitment_weight, **kwargs
        )
        self.decoder = Decoder(cfg, cfg.embed_dim)

    @property
    def factor(self) -> int:
        return downsample_factor(self.cfg)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, D, h, w) -> (zq (B, D, h, w), indices (B, h, w), vq loss 0-d), in fp32."""
        with torch.autocast(z.device.type, enabled=False):
            return self.quantizer(z.float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, C, H, W) -> (x^ (B, C, H, W), indices (B, h, w), vq loss)."""
        zq, idx, vq_loss = self.quantize(self.encoder(x))
        return self.decoder(zq), idx, vq_loss

    def training_losses(self, x: Tensor, y: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """One batch's losses: "loss" (what is optimised), "recon", "vq", "psnr" (dB, detached)."""
        x_hat, idx, vq_loss = self(x)
        recon = F.mse_loss(x_hat.float(), x)
        out = {"loss": recon + vq_loss, "recon": recon.detach(), "vq": vq_loss.detach(), "psnr": psnr(recon.detach())}
        if self.training:  # the batch's code usage (fastvq.VectorQuantizer's codes_used_fraction / perplexity)
            out["codes_used"], out["perplexity"] = code_usage(idx.detach(), self.cfg.codebook_size)
        return out

    @torch.no_grad()
    def validation_step(self, x: Tensor, y: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One pass for validation: (losses "loss", "recon", "vq"; reconstruction x^; indices (B, h, w))."""
        x_hat, idx, vq_loss = self(x)
        recon = F.mse_loss(x_hat.float(), x)
        return {"loss": recon + vq_loss, "recon": recon, "vq": vq_loss}, x_hat, idx

    # -- codes in, images out ------------------------------------------------------------------

    @torch.no_grad()
    def encode_indices(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> int64 code indices (B, H/f, W/f)."""
        return self.quantize(self.encoder(x))[1]

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """int64 indices (B, h, w) -> images (B, C, h f, w f) in about [-1, 1]."""
        return self.decoder(self.quantizer.get_output_from_indices(indices).float())

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> its reconstruction, same shape."""
        return self.decoder(self.quantize(self.encoder(x))[0])

    @torch.no_grad()
    def sample(self, n: int, image_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode uniformly random codes: (n, C, image_size, image_size). Only a prior makes real samples."""
        side = image_size // self.factor
        idx = torch.randint(0, self.cfg.codebook_size, (n, side, side), generator=generator)
        return self.decode_indices(idx.to(next(self.parameters()).device))

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": list(self.parameters())}


def build(cfg: dict[str, Any]) -> VQVAE:
    return VQVAE(VQVAEConfig.from_dict(cfg))
