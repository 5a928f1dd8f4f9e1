"""The textbook VQ-VAE quantizer: the baseline fastvq is measured against (benchmarks, step time)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import metrics
from fastvq.quantizers.output import QuantizerOutput


class TextbookQuantizer(nn.Module):
    """VQ-VAE quantization as most tutorials write it. z: (B, dim, H, W) -> QuantizerOutput.

    Materialises the full (N, K) distance matrix with ``torch.cdist``; the loss is
    mse(e, sg(z)) + commitment_weight * mse(z, sg(e)), the output z + sg(e - z).
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.commitment_weight = dim, codebook_size, commitment_weight
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        self.project_in = nn.Identity()
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
        idx = torch.cdist(flat, self.embed).argmin(dim=1)  # (N,)
        e = self.embed[idx]  # (N, D)
        loss = F.mse_loss(e, flat.detach()) + self.commitment_weight * F.mse_loss(flat, e.detach())
        zq = flat + (e - flat).detach()
        if self.training:
            with torch.no_grad():
                counts = metrics.code_counts(idx, self.codebook_size)
                self.perplexity.copy_(metrics.perplexity(counts))
                self.codes_used_fraction.copy_(metrics.used_fraction(counts))
        return QuantizerOutput(zq.reshape(b, h, w, d).permute(0, 3, 1, 2), idx.reshape(b, h, w), loss)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (B, H, W) int64 -> (B, dim, H, W)."""
        return self.embed[indices].permute(0, 3, 1, 2)
