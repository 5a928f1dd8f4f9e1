"""Per-code assignment statistics: the sufficient statistics of EMA codebooks and k-means."""

from __future__ import annotations

import torch
from torch import Tensor


def code_stats(x: Tensor, idx: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Count and sum the rows assigned to each code.

    Args:
        x: (N, D) float tensor.
        idx: (N,) int64 code indices in [0, num_codes).
        num_codes: K.

    Returns:
        counts: (K,) float32, rows assigned to each code.
        sums: (K, D) float32, sum of the rows assigned to each code (fp32 accumulation).
    """
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    sums = torch.zeros(num_codes, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, idx, x.float())
    return counts, sums
