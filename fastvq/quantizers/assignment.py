"""Assignment: which code each vector gets (today the nearest one, through the fused op), and its
inverse, the codes of given indices.

``nearest`` is one function so that other rules (stochastic sampling from a softmax over distances, Gumbel
assignment) can be added beside it with the same signature and chosen by a quantizer option.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.functional import vector_quantize


def nearest(
    z: Tensor, books: Tensor, commitment_weight: float, codebook_weight: float, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize every head of ``z`` to its nearest code, with the VQ-VAE losses.

    Args:
        z: (..., H, D) float, H heads of D features. books: (1, K, D) one codebook shared by all
            heads, or (H, K, D) one per head (same dtype and device as z).
        commitment_weight, codebook_weight: weights of the two loss terms (``vector_quantize``).
        backend: "auto" | "triton" | "torch".

    Returns:
        zq: (..., H, D) the codes, with the straight-through gradient to z (fused op).
        idx: (..., H) int64. loss: 0-d, the mean of the codebooks' losses (each sees as many
        elements, so this is the loss over all heads).

    Raises:
        ValueError: books has neither 1 nor H codebooks (and the op's own shape errors).
    """
    heads = z.shape[-2]
    if books.shape[0] == 1:  # all heads share codebook 0: one call over (..., H, D)
        zq, idx, loss = vector_quantize(z, books[0], commitment_weight, codebook_weight, backend)
        return zq, idx, loss
    if books.shape[0] != heads:
        raise ValueError(f"books must hold 1 or {heads} codebooks (one per head), got shape {tuple(books.shape)}")
    parts = [vector_quantize(z[..., h, :], books[h], commitment_weight, codebook_weight, backend) for h in range(heads)]
    zq = torch.stack([p[0] for p in parts], dim=-2)  # (..., H, D)
    idx = torch.stack([p[1] for p in parts], dim=-1)  # (..., H)
    return zq, idx, torch.stack([p[2] for p in parts]).mean()


def lookup(books: Tensor, idx: Tensor) -> Tensor:
    """The codes of given indices, per head: what ``nearest`` returns as zq, without gradients' care.

    Args:
        books: (1, K, D) shared or (H, K, D) per-head codebooks, as for ``nearest``.
        idx: (..., H) int64/int32 indices in [0, K).

    Returns:
        (..., H, D) in books' dtype.
    """
    if books.shape[0] == 1:
        return books[0][idx]
    head = torch.arange(books.shape[0], device=idx.device)
    return books[head, idx]


def peer_loss(loss: Tensor, commitment_weight: float, codebook_weight: float, one_term: bool) -> tuple[Tensor, Tensor]:
    """(loss, commitment): ``nearest``'s weighted loss as the peer reports it, and its unweighted term.

    Args:
        loss: 0-d, commitment_weight * mse(z, sg(e)) + codebook_weight * mse(sg(z), e) from ``nearest``.
        one_term: the peer's single term commitment_weight * mse(z, e): with equal weights on both
            gradients the value would count mse twice, so the codebook term's value is removed
            (detached) while its gradient to the codes stays.

    Returns:
        loss: 0-d, same gradients as the input. commitment: 0-d mse(z, e) (both terms are that mse),
        a detached zero when both weights are 0.
    """
    total = commitment_weight + codebook_weight
    commitment = loss / total if total > 0 else loss.detach() * 0
    if one_term and codebook_weight:
        loss = loss - (codebook_weight * commitment).detach()  # value cw * mse, gradients unchanged
    return loss, commitment
