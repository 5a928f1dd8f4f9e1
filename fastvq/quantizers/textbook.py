"""The textbook VQ layers: the baselines fastvq is measured against (benchmarks, the VQ-VAE's
"textbook" quantizer). They are written as tutorials and taming-transformers write them, on
purpose: the full (N, K) distance matrix, its argmin, and the straight-through output
``z + (e - z).detach()``. Never use them for speed; they are what the speed-ups are speed-ups over.

The distance matrix comes the two ways those codes write it (``distance=``): "expanded",
taming's ||z||^2 + ||e||^2 - 2 z e^T (the rows baselines of `fastvq bench`), and "cdist",
``torch.cdist`` (the VQ-VAE's textbook quantizer). Both hold N x K floats; cdist fuses the
expansion into one GEMM and is the faster of the two on CPU, so each baseline keeps the one its
recorded results (benchmarks/results/) were measured with.

    TextbookVQ        rows (N, dim); codebook trained by gradient (VQ-VAE loss)
    TextbookEMAVQ     rows (N, dim); codebook as an EMA of its assigned vectors (Sonnet's
                      VectorQuantizerEMA as usually ported: a one-hot (N, K) matrix, sums one_hot^T z)
    TextbookQuantizer (B, dim, H, W) feature maps: TextbookVQ on the flattened positions, with the
                      code-usage telemetry fastvq.VectorQuantizer also keeps
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import metrics
from fastvq.quantizers.output import QuantizerOutput


def _expanded_nearest(z: Tensor, embed: Tensor) -> Tensor:
    """Nearest code of each row of z: (N, D), embed: (K, D) -> (N,) int64, as taming-transformers finds it."""
    d = (z * z).sum(1, keepdim=True) + (embed * embed).sum(1) - 2 * z @ embed.t()  # (N, K)
    return d.argmin(1)


def _cdist_nearest(z: Tensor, embed: Tensor) -> Tensor:
    """Nearest code of each row of z: (N, D), embed: (K, D) -> (N,) int64, as cdist tutorials find it."""
    return torch.cdist(z, embed).argmin(1)  # (N, K) distances, then (N,)


_NEAREST = {"expanded": _expanded_nearest, "cdist": _cdist_nearest}


class TextbookVQ(nn.Module):
    """z: (N, dim) -> QuantizerOutput(quantized (N, dim), indices (N,), loss).

    loss = mean((e - sg(z))^2) + commitment_weight * mean((z - sg(e))^2); the codebook ``embed``
    (K, dim) is a parameter learnt from the first term. ``distance``: "expanded" or "cdist" (module
    docstring).

    Raises:
        ValueError: an unknown ``distance``.
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25,
                 distance: str = "expanded") -> None:
        super().__init__()
        if distance not in _NEAREST:
            raise ValueError(f"distance must be one of {sorted(_NEAREST)}, got {distance!r}")
        self.dim, self.codebook_size, self.commitment_weight = dim, codebook_size, commitment_weight
        self.distance, self.nearest = distance, _NEAREST[distance]
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def forward(self, z: Tensor) -> QuantizerOutput:
        idx = self.nearest(z, self.embed)  # (N,)
        e = self.embed[idx]  # (N, D)
        loss = ((e - z.detach()) ** 2).mean() + self.commitment_weight * ((e.detach() - z) ** 2).mean()
        return QuantizerOutput(z + (e - z).detach(), idx, loss)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (...) int64 -> (..., dim)."""
        return self.embed[indices]


class TextbookEMAVQ(nn.Module):
    """z: (N, dim) -> QuantizerOutput; in training mode each call also moves the codebook.

    count (K,) and total (K, dim) are EMAs (``decay``) of the per-code counts and sums; the codebook
    is total / Laplace-smoothed count. loss = commitment_weight * mean((z - sg(e))^2) only.
    """

    def __init__(self, dim: int, codebook_size: int, *, decay: float = 0.99, eps: float = 1e-5,
                 commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("embed", torch.randn(codebook_size, dim))
        self.register_buffer("count", torch.ones(codebook_size))
        self.register_buffer("total", self.embed.clone())
        self.decay, self.eps, self.commitment_weight = decay, eps, commitment_weight

    def forward(self, z: Tensor) -> QuantizerOutput:
        idx = _expanded_nearest(z, self.embed)  # (N,)
        one_hot = F.one_hot(idx, self.embed.shape[0]).type(z.dtype)  # (N, K): the textbook way to sum per code
        e = self.embed[idx]
        if self.training:
            with torch.no_grad():
                self.count.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
                self.total.mul_(self.decay).add_(one_hot.t() @ z, alpha=1 - self.decay)
                n = self.count.sum()
                smoothed = (self.count + self.eps) / (n + self.embed.shape[0] * self.eps) * n
                self.embed.copy_(self.total / smoothed[:, None])
        loss = self.commitment_weight * ((e.detach() - z) ** 2).mean()
        return QuantizerOutput(z + (e - z).detach(), idx, loss)


class TextbookQuantizer(TextbookVQ):
    """TextbookVQ for feature maps: z (B, dim, H, W) -> QuantizerOutput((B, dim, H, W), (B, H, W), loss).

    Its distance defaults to "cdist" (module docstring). In training mode it records ``perplexity``
    and ``codes_used_fraction`` of the batch, as fastvq.VectorQuantizer does, so that a comparison
    of the two pays for the same bookkeeping.
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25,
                 distance: str = "cdist") -> None:
        super().__init__(dim, codebook_size, commitment_weight=commitment_weight, distance=distance)
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        out = super().forward(z.permute(0, 2, 3, 1).reshape(-1, d))  # (N, D), N = B H W
        if self.training:
            with torch.no_grad():
                counts = metrics.code_counts(out.indices, self.codebook_size)
                self.perplexity.copy_(metrics.perplexity(counts))
                self.codes_used_fraction.copy_(metrics.used_fraction(counts))
        quantized = out.quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(quantized, out.indices.reshape(b, h, w), out.loss)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (B, H, W) int64 -> (B, dim, H, W)."""
        return self.embed[indices].permute(0, 3, 1, 2)


__all__ = ["TextbookEMAVQ", "TextbookQuantizer", "TextbookVQ"]
