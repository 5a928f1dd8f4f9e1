"""Vector quantization with the VQ-VAE losses in PyTorch: forward and its hand-written backward.

Loss (van den Oord et al. 2017, eq. 3, without the reconstruction term):
    loss = codebook_weight * mean((sg(z) - e)^2) + commitment_weight * mean((z - sg(e))^2)
Both means are over all N * D elements and share one value in forward, so
    loss = (codebook_weight + commitment_weight) * sum_i sqerr_i / (N * D).
Backward, with g = dloss_out and zq = e = codebook[idx]:
    dz        = dzq  + commitment_weight * 2 g (z - e) / (N D)     (straight-through + commitment)
    dcodebook = index_add over idx of codebook_weight * 2 g (e - z) / (N D)   (codebook term only)
The straight-through gradient goes to z alone; the codebook learns only through its loss term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.reference.search import accumulation_dtype, nearest_code


def vq_fwd(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize rows of ``z`` to their nearest (l2) codes.

    Args:
        z: (N, D) float tensor.
        codebook: (K, D) float tensor on the same device.

    Returns:
        zq: (N, D) in ``codebook.dtype``, bitwise equal to ``codebook[idx]``.
        idx: (N,) int64 nearest-code indices (lowest index on exact ties).
        sqerr: (N,) float32 (fp64 for fp64 inputs), ||z_i - codebook[idx_i]||^2 from the difference.
    """
    idx, sqerr = nearest_code(z, codebook, "l2")
    zq = codebook.index_select(0, idx)
    return zq, idx, sqerr


def vq_bwd(
    grad_zq: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebook: Tensor,
    idx: Tensor,
    commitment_weight: float,
    codebook_weight: float,
    needs_grad_codebook: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of (zq, loss) from ``vq_fwd`` to z and to the codebook.

    Args:
        grad_zq: (N, D) gradient of zq (any float dtype).
        grad_loss: 0-d float tensor, gradient of the scalar loss (a tensor, so no host sync).
        z, codebook, idx: the forward's inputs and its returned indices.
        commitment_weight, codebook_weight: the loss weights used in forward.
        needs_grad_codebook: skip the scatter when the codebook does not require grad.

    Returns:
        grad_z: (N, D) in ``z.dtype``; grad_codebook: (K, D) in ``codebook.dtype`` or None.
    """
    n, d = z.shape
    numel = max(n * d, 1)
    acc = accumulation_dtype(z, codebook)
    g = grad_loss.to(acc) * (2.0 / numel)
    diff = z.to(acc) - codebook.index_select(0, idx).to(acc)  # (N, D) z - e, fp32 (fp64 for fp64)
    grad_z = (grad_zq.to(acc) + (commitment_weight * g) * diff).to(z.dtype)
    grad_codebook = None
    if needs_grad_codebook:
        grad_codebook = torch.zeros(codebook.shape, dtype=acc, device=codebook.device)
        grad_codebook.index_add_(0, idx, diff, alpha=-1.0)  # sum over rows of (e - z)
        grad_codebook = (grad_codebook * (codebook_weight * g)).to(codebook.dtype)
    return grad_z, grad_codebook
