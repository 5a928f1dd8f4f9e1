"""Codebook state updated in training forwards: EMA of usage and sums, dead-code revival.

Formulas: the VQ-VAE paper's appendix (van den Oord et al. 2017) as in Sonnet's
VectorQuantizerEMA. With n_k the rows assigned to code k in the batch and s_k their sum,
    N_k <- decay N_k + (1 - decay) n_k,        m_k <- decay m_k + (1 - decay) s_k,
    e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)
so that a code that is never used does not divide by zero. Everything here is tensor code with no
host synchronisation (no .item(), no Python branch on values): it compiles and never stalls a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.distributed import all_reduce_sum_, broadcast_


def ema_inplace_(average: Tensor, new: Tensor, decay: float) -> None:
    """average <- decay * average + (1 - decay) * new, in place."""
    average.mul_(decay).add_(new, alpha=1.0 - decay)


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """Counts with Laplace smoothing along the last axis; same total as ``counts``."""
    total = counts.sum(dim=-1, keepdim=True)
    return (counts + eps) / (total + counts.shape[-1] * eps) * total


def synced_batch_stats(*stats: Tensor) -> None:
    """Sum per-code statistics (counts (K,), sums (K, D)) over ranks in place; no-op in one process."""
    all_reduce_sum_(*stats)


def revive_dead_codes_(
    codebook: Tensor, ema_count: Tensor, ema_sum: Tensor | None, batch: Tensor, threshold: float
) -> Tensor:
    """Replace codes whose EMA count is below ``threshold`` by random rows of ``batch``.

    Args:
        codebook: (K, D) updated in place. ema_count: (K,) updated in place (revived codes restart
            at ``threshold``). ema_sum: (K, D) or None, kept consistent with the new codes.
        batch: (N, D) rows of the current batch (N >= 1).

    Returns:
        dead: (K,) bool, the codes that were replaced. Candidates are drawn on rank 0 and
        broadcast, so every rank replaces the same codes with the same vectors.
    """
    num_codes = codebook.shape[0]
    dead = ema_count < threshold  # (K,)
    if batch.shape[0] > 0:  # a static shape: no host sync
        pick = torch.randint(0, batch.shape[0], (num_codes,), device=batch.device)
        candidates = batch[pick].to(codebook.dtype).contiguous()  # (K, D)
    else:  # an empty batch on this rank: rank 0's broadcast decides (or nothing changes)
        candidates = codebook.clone()
    candidates = broadcast_(candidates)
    codebook.copy_(torch.where(dead[:, None], candidates, codebook))
    ema_count.copy_(torch.where(dead, torch.full_like(ema_count, threshold), ema_count))
    if ema_sum is not None:
        ema_sum.copy_(torch.where(dead[:, None], candidates.float() * threshold, ema_sum))
    return dead
