"""The numbers fastvq reports, computed in one place: code usage, perplexity, PSNR.

All of them return tensors (0-d, no host synchronisation) so that training forwards can refresh
telemetry buffers every step; callers convert to Python floats where they log.
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_counts(indices: Tensor, codebook_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """How often each code occurs in ``indices`` (any shape, int64 in [0, codebook_size)): (K,) ``dtype``."""
    counts = torch.zeros(codebook_size, dtype=dtype, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=dtype, device=indices.device))


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution given by per-code ``counts`` (..., K): (...) tensor.

    Ranges from 1 (one code used) to K (all codes equally used); empty counts give 1.
    """
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))


def used_fraction(counts: Tensor) -> Tensor:
    """Fraction of codes with a non-zero count, from per-code ``counts`` (..., K): (...) float tensor."""
    return (counts > 0).to(counts.dtype if counts.is_floating_point() else torch.float32).mean(-1)


def code_usage(indices: Tensor, codebook_size: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(fraction of codes used, perplexity) of a set of indices, as 0-d tensors of ``dtype``."""
    counts = code_counts(indices, codebook_size, dtype)
    return used_fraction(counts), perplexity(counts)


def psnr(mse_pm1: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1], from the MSE measured on the [-1, 1] scale."""
    return 10 * torch.log10(4.0 / mse_pm1.clamp_min(1e-10))
