"""Assignment: which code each vector gets, and its inverse, the codes of given indices.

Two rules. ``nearest``: the nearest code through the fused op (no N x K distance matrix, losses and
straight-through gradient in the same pass). ``sampled``: vector-quantize-pytorch's stochastic
sampling, a Gumbel-max draw from softmax(logits / temperature) over the peer's logits (minus the
euclidean distance, or the cosine similarity), computed in row chunks by ``fastvq.quantizers.sampling``
so that its memory stays bounded too; its losses come from ``code_losses``, the same terms the fused
op computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvq.functional import vector_quantize
from fastvq.quantizers import sampling


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


def sampled(
    z: Tensor,
    books: Tensor,
    temperature: float,
    *,
    stochastic: bool,
    straight_through: bool,
    use_cosine_sim: bool,
    topk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Codes drawn for every head of ``z`` by vector-quantize-pytorch's ``gumbel_sample``.

    Args:
        z: (..., H, D) float. books: (1, K, D) shared or (H, K, D) per head, as for ``nearest``.
        temperature: >= 0; 0 (or ``stochastic=False``) takes the best code by the peer's logits.
        stochastic: add Gumbel noise (a draw from softmax(logits / temperature)).
        straight_through: the codes' gradient is that of softmax(logits / temperature) @ books (the
            peer's Gumbel straight-through); otherwise the codes are plain rows of ``books``.
        use_cosine_sim: logits are cosine similarities (z and books already unit vectors).
        topk: the ``topk`` best (noisy) codes per vector instead of one (no straight-through).

    Returns:
        e: (..., H, D) the codes (gradient to ``books`` where it requires grad), or (..., H, k, D) with
        topk. idx: (..., H) int64, or (..., H, k).
    """
    heads, dim = z.shape[-2], z.shape[-1]
    shared = books.shape[0] == 1
    parts = [z.reshape(-1, dim)] if shared else [z[..., h, :].reshape(-1, dim) for h in range(heads)]
    codes, indices = [], []
    for book, rows in zip(books, parts, strict=True):  # one book when shared: one call over every head
        idx = sampling.sample_codes(
            rows.detach(), book.detach(), temperature, stochastic=stochastic, use_cosine_sim=use_cosine_sim, topk=topk
        )
        if straight_through and topk is None and temperature > 0:
            e = sampling.gumbel_straight_through(rows, book, idx, temperature, use_cosine_sim)
        else:
            e = F.embedding(idx, book)
        codes.append(e)
        indices.append(idx)
    tail = () if topk is None else (topk,)
    if shared:
        return codes[0].reshape(*z.shape[:-1], *tail, dim), indices[0].reshape(*z.shape[:-1], *tail)
    lead = z.shape[:-2]
    e = torch.stack([c.reshape(*lead, *tail, dim) for c in codes], dim=len(lead))
    return e, torch.stack([i.reshape(*lead, *tail) for i in indices], dim=len(lead))


def code_losses(z: Tensor, e: Tensor, commitment_weight: float, codebook_weight: float) -> Tensor:
    """The fused op's two VQ-VAE terms for given codes: cw mse(z, sg(e)) + cbw mse(sg(z), e), 0-d.

    Args:
        z: (..., D) float. e: (..., D) its codes (gradient to the codebook through e, if any).
    """
    z32, e32 = z.float(), e.float()
    loss = commitment_weight * F.mse_loss(z32, e32.detach()) if commitment_weight else z32.new_zeros(())
    if codebook_weight:
        loss = loss + codebook_weight * F.mse_loss(z32.detach(), e32)
    return loss
