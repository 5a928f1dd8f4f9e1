"""VQ-VAE (van den Oord et al. 2017): encoder -> nearest codebook vector -> decoder.

Loss, the paper's three terms:
    recon  = mean((x - x^)^2)                              trains encoder + decoder
    vq     = mean((sg(z) - e)^2) + beta mean((z - sg(e))^2)  codebook term + commitment term
    loss   = recon + vq
The quantizer (the config's ``quantizer`` field, fastvq.VectorQuantizer by default) computes
the vq terms and the straight-through gradient; this module adds reconstruction.

Keeping the codebook in use (a codebook that collapses onto a few codes cannot reconstruct):
    * the codebook starts as K random encoder outputs of the first training batch, so every code
      begins inside the data instead of at a standard-normal point nobody is near;
    * a code whose running (EMA) count per batch falls below ``dead_code_threshold`` is moved onto
      a random encoder output of the current batch (codebook "restart", as in Jukebox / SoundStream).
Both happen inside training-mode forwards, draw from torch's global RNG (saved by checkpoints) and
write the quantizer's ``embed`` in place. They stand aside for quantizers that do it themselves
(quantizer_kwargs ``kmeans_init``, ``threshold_ema_dead_code``, ``ema_update``) or have no learnt
codebook (FSQ, LFQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.models.blocks import ConvNetConfig, Decoder, Encoder, downsample_factor
from fastvq.models.config import option
from fastvq.models.quantizers import build_quantizer


@dataclass
class VQVAEConfig(ConvNetConfig):
    embed_dim: int = option(16, "latent channels, the size of a codebook vector")
    codebook_size: int = option(256, "number of codes K")
    quantizer: str = option("vq", "'vq' (fastvq.VectorQuantizer), 'fsq', 'lfq', or 'textbook' (cdist baseline)")
    quantizer_kwargs: dict = option({}, "extra keyword arguments for the quantizer, as JSON")
    commitment_weight: float = option(0.25, "beta, weight of the commitment term")
    init_codebook_from_data: bool = option(True, "start the codebook from encoder outputs of the first batch")
    dead_code_threshold: float = option(0.5, "restart codes whose EMA count per batch is below this (0: off)")
    dead_code_decay: float = option(0.95, "decay of the per-code EMA usage count")

    PRESETS = {
        "tiny": {},
        "base": {"ch": 128, "num_res_blocks": 2, "attn": True, "embed_dim": 64, "codebook_size": 1024},
    }


def usage_tensors(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(fraction of codes used, perplexity) of a batch of indices, as 0-d tensors (no host sync)."""
    counts = torch.zeros(codebook_size, device=indices.device)
    counts.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))
    p = counts / counts.sum().clamp_min(1)
    return (counts > 0).float().mean(), torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def usage_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Code usage of a set of indices (any shape): fraction of codes used and perplexity."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
    return {"codes_used_fraction": float((counts > 0).double().mean()), "perplexity": float(perplexity)}


class VQVAE(nn.Module):
    """Images (B, C, H, W) in [-1, 1] <-> code indices (B, H/f, W/f), f = 2^(len(ch_mult) - 1)."""

    name = "vqvae"

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, cfg.embed_dim)
        self.quantizer = build_quantizer(
            cfg.quantizer, cfg.embed_dim, cfg.codebook_size, cfg.commitment_weight, **cfg.quantizer_kwargs
        )
        self.decoder = Decoder(cfg, cfg.embed_dim)
        self.register_buffer("codebook_initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("code_usage", torch.zeros(cfg.codebook_size))
        self._initialized: bool | None = None

    @property
    def factor(self) -> int:
        return downsample_factor(self.cfg)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, D, h, w) -> (zq (B, D, h, w), indices (B, h, w), vq loss 0-d), in fp32."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.training:
                self._maintain_codebook(z)
            zq, idx, loss = self.quantizer(z)
            own_restarts = getattr(self.quantizer, "threshold_ema_dead_code", 0) > 0
            if self.training and self.cfg.dead_code_threshold > 0 and self._has_codebook and not own_restarts:
                self._restart_dead_codes(z, idx)
        return zq, idx, loss

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
            out["codes_used"], out["perplexity"] = usage_tensors(idx.detach(), self.cfg.codebook_size)
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
        return self.decode_indices(idx.to(self.code_usage.device))

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"loss": list(self.parameters())}

    # -- codebook care --------------------------------------------------------------------------

    @property
    def _has_codebook(self) -> bool:
        """A gradient-trained (K, D) codebook this model may write (EMA codebooks keep their own statistics)."""
        q = self.quantizer
        embed = getattr(q, "embed", None)
        plain = isinstance(embed, nn.Parameter) and embed.dim() == 2 and embed.shape[0] == self.cfg.codebook_size
        return plain and not getattr(q, "ema_update", False)

    def _flat(self, z: Tensor) -> Tensor:
        return self.quantizer.project_in(z.detach().movedim(1, -1).reshape(-1, z.shape[1]))  # (N, codebook_dim)

    def _load_from_state_dict(self, *args, **kwargs):
        self._initialized = None  # re-read the loaded buffer on the next training forward
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _maintain_codebook(self, z: Tensor) -> None:
        if self._initialized is None:  # a Python mirror of the buffer: one host read, not one per step
            self._initialized = bool(self.codebook_initialized)
        own_init = getattr(self.quantizer, "kmeans_init", False)  # the quantizer initialises itself
        if self._initialized or not self.cfg.init_codebook_from_data or not self._has_codebook or own_init:
            return
        flat = self._flat(z)
        k = self.cfg.codebook_size
        pick = torch.randperm(flat.shape[0], device=z.device)[:k] if flat.shape[0] >= k else (
            torch.randint(0, flat.shape[0], (k,), device=z.device))
        self.quantizer.embed.data.copy_(flat[pick])
        self.code_usage.fill_(flat.shape[0] / k)
        self.codebook_initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor, idx: Tensor) -> None:
        # branch-free (no host sync, no data-dependent shapes): every code draws a candidate, only
        # the dead ones take it
        k = self.cfg.codebook_size
        ones = torch.ones(idx.numel(), device=idx.device)
        counts = torch.zeros(k, device=idx.device).index_add_(0, idx.reshape(-1), ones)  # (K,) this batch
        decay = self.cfg.dead_code_decay
        self.code_usage.mul_(decay).add_(counts, alpha=1 - decay)
        dead = self.code_usage < self.cfg.dead_code_threshold  # (K,)
        flat = self._flat(z)
        candidates = flat[torch.randint(0, flat.shape[0], (k,), device=z.device)]  # (K, codebook_dim)
        embed = self.quantizer.embed.data
        embed.copy_(torch.where(dead[:, None], candidates.to(embed.dtype), embed))
        self.code_usage.copy_(torch.where(dead, self.code_usage.mean(), self.code_usage))


def psnr(mse_pm1: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1], from the MSE measured on the [-1, 1] scale."""
    return 10 * torch.log10(4.0 / mse_pm1.clamp_min(1e-10))


def build(cfg: dict[str, Any]) -> VQVAE:
    return VQVAE(VQVAEConfig.from_dict(cfg))
