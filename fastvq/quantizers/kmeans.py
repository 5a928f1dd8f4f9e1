"""k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), built on fastvq's own ops.

Assignment uses ``nearest_code`` (no N x K matrix), the centroid update ``code_stats``. Random
seeding merges clusters that happen to get two seeds and leaves others without one; k-means++
picks each new seed with probability proportional to its squared distance to the seeds so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.functional import code_stats, nearest_code


def kmeans_plusplus(x: Tensor, num_codes: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds: (num_codes, D) rows of ``x`` (N, D); repeats rows only if N < num_codes.

    Raises:
        ValueError: ``x`` is not 2-D or has no rows.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be (N, D) with N >= 1, got shape {tuple(x.shape)}")
    x = x.float()
    n = x.shape[0]
    # Draws happen on x's device (a CPU generator for CPU data, a CUDA one for CUDA data):
    # no host round trip per seed.
    first = torch.randint(0, n, (1,), generator=generator, device=x.device)
    seeds = [x[first]]
    # Squared distance of every row to its nearest seed so far, updated one seed at a time: O(N K D).
    nearest_sq = ((x - seeds[0]) ** 2).sum(1)
    for _ in range(1, num_codes):
        total = nearest_sq.sum()
        # All rows already coincide with seeds (N < K or duplicates): fall back to uniform picks.
        probs = torch.where(total > 0, nearest_sq / total.clamp_min(1e-30), torch.full_like(nearest_sq, 1.0 / n))
        pick = torch.multinomial(probs, 1, generator=generator)
        seed = x[pick]
        seeds.append(seed)
        nearest_sq = torch.minimum(nearest_sq, ((x - seed) ** 2).sum(1))
    return torch.cat(seeds)


def kmeans(
    x: Tensor,
    num_codes: int,
    iters: int = 10,
    metric: str = "l2",
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from k-means++ seeds.

    Args:
        x: (N, D) float rows. num_codes: K. iters: Lloyd steps after seeding.
        metric: "l2", or "cosine" (spherical k-means: centroids re-normalised after each step).

    Returns:
        centroids: (K, D) float32; counts: (K,) float32 rows assigned in the last step.
        A cluster that loses all its rows keeps its previous centroid.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = x.detach().float()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    centroids = kmeans_plusplus(x, num_codes, generator)
    counts = torch.zeros(num_codes, device=x.device)
    for _ in range(iters):
        idx, _ = nearest_code(x, centroids, metric=metric, backend=backend)
        counts, sums = code_stats(x, idx, num_codes, backend=backend)
        updated = sums / counts.clamp_min(1.0)[:, None]
        if metric == "cosine":
            updated = torch.nn.functional.normalize(updated, dim=-1)
        centroids = torch.where(counts[:, None] > 0, updated, centroids)
    return centroids, counts
