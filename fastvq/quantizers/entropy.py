"""The entropy terms of LFQ's MAGVIT-v2 loss, as pure functions the ``LFQ`` module composes.

For tokens x_n and the 2^d codes c of {-a, +a}^d, the soft assignment p_n(c) = softmax_c(2 t x_n.c)
(t the inverse temperature) gives the two terms of ``entropy_aux_loss``: the mean per-sample
entropy mean_n H(p_n) and the batch entropy H(mean_n p_n). Two ways to compute them:

* ``clamped_softmax_entropies``: vector-quantize-pytorch's numbers (H(p) = -sum p log(max(p, 1e-5)))
  from the softmax over every code, in row chunks so that at most ``PEER_CHUNK_BYTES`` of
  probabilities exist at once, also under autograd (each chunk is recomputed in backward).
* per-bit logits l_ni = 4 t a x_ni: p_n is then a product over bits and ``per_sample_entropy`` is
  exact in O(N d); ``batch_entropy`` is exact through ``batch_code_distribution`` (one GEMM of the
  two half-bit distributions) or the factorised upper bound sum_i h(mean_n sigmoid(l_ni)).

``reduce`` arguments take a function applied to the batch distribution before its entropy, as
``distributed_mean`` (the cross-rank mean) in data-parallel training. All entropies are in nats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# The most bytes of (rows, codebooks, 2^d) probabilities the peer-compatible entropy holds at once.
PEER_CHUNK_BYTES = 64 * 2**20


def clamped_entropy(prob: Tensor) -> Tensor:
    """vector-quantize-pytorch's entropy over the last axis: -sum p log(max(p, 1e-5)), (...,) from (..., K)."""
    return (-prob * prob.clamp(min=1e-5).log()).sum(dim=-1)


def xlogx(p: Tensor) -> Tensor:
    """p log p elementwise, with 0 log 0 = 0."""
    # The clamp at the smallest normal number keeps the gradient finite at p = 0.
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def distributed_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over the ranks (differentiable, as the peer's), ``t`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / dist.get_world_size()


def _identity(t: Tensor) -> Tensor:
    return t


# ------------------------------------------------------------------------------------------------
# the peer's clamped softmax entropies, chunked over rows


def _softmax_chunk(tokens: Tensor, codebook: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """(per-row clamped entropies (n, c), probabilities summed over rows (c, K)) of one row chunk."""
    distance = -2 * torch.einsum("... i d, j d -> ... i j", tokens, codebook)  # (n, c, K), the peer's expression
    prob = (-distance * inv_temperature).softmax(dim=-1)
    # The row sum first, as the peer takes its mean first: autograd then adds prob's three gradients
    # (mean, and the product and clamp of the entropy) in the peer's order, so fp32 gradients agree bitwise.
    prob_sum = prob.sum(dim=0)
    return clamped_entropy(prob), prob_sum


def clamped_softmax_entropies(
    tokens: Tensor,
    codebook: Tensor,
    inv_temperature: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """vector-quantize-pytorch's (per-sample entropy, batch entropy), each averaged over codebooks.

    Args:
        tokens: (N, c, d) float, N >= 1: N tokens, c codebooks of d features each.
        codebook: (K, d) in ``tokens``' dtype: every code (K = 2^d for LFQ).
        inv_temperature: t in p_n = softmax(2 t x_n.c).
        reduce: applied to the (c, K) batch distribution before its entropy (e.g. ``distributed_mean``).
        chunk_rows: tokens per chunk; default: as many as fit ``PEER_CHUNK_BYTES`` of probabilities.

    Returns:
        (mean_n,c H(p_nc), mean_c H(reduce(mean_n p_nc))), 0-d each in ``tokens``' dtype, H the
        1e-5-clamped entropy. Chunking changes the values only by the rounding of the row sums; the
        gradients flow through every chunk, which is recomputed in backward (activation
        checkpointing) so training holds one chunk's softmax at a time as well.
    """
    num_tokens, num_codebooks = tokens.shape[0], tokens.shape[1]
    if chunk_rows is None:
        row_bytes = num_codebooks * codebook.shape[0] * tokens.element_size()
        chunk_rows = max(1, PEER_CHUNK_BYTES // row_bytes)
    if chunk_rows >= num_tokens:
        per_row, prob_sum = _softmax_chunk(tokens, codebook, inv_temperature)
    else:
        recompute = torch.is_grad_enabled() and (tokens.requires_grad or codebook.requires_grad)
        per_rows, prob_sum = [], 0
        for chunk in tokens.split(chunk_rows):
            if recompute:  # keep only the chunk's inputs for backward, not its (n, c, K) softmax
                chunk_h, chunk_sum = checkpoint(
                    _softmax_chunk, chunk, codebook, inv_temperature, use_reentrant=False, preserve_rng_state=False
                )
            else:
                chunk_h, chunk_sum = _softmax_chunk(chunk, codebook, inv_temperature)
            per_rows.append(chunk_h)
            prob_sum = prob_sum + chunk_sum  # a running sum: one (c, K) tensor alive, not one per chunk
        per_row = torch.cat(per_rows)  # (N, c): small, kept whole for one mean as the peer's
    avg_prob = (reduce or _identity)(prob_sum / num_tokens)  # (c, K)
    return per_row.mean(), clamped_entropy(avg_prob).mean()


# ------------------------------------------------------------------------------------------------
# fastvq's exact entropies, from per-bit logits


def per_sample_entropy(logits: Tensor) -> Tensor:
    """mean_n H(p_n) for factorised code distributions, exactly, from per-bit logits (N, d), in nats."""
    p = torch.sigmoid(logits)
    h = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))  # exact in the tails
    return h.sum(dim=-1).mean()


def _half_distribution(p_plus: Tensor, p_minus: Tensor) -> Tensor:
    """(N, 2^k) probabilities of all bit patterns of k independent bits, from (N, k) marginals."""
    dist_ = p_plus.new_ones(p_plus.shape[0], 1)
    for i in range(p_plus.shape[1]):
        # Bit i becomes the least significant so far: pattern 2j + 1 has bit i set (+), 2j not.
        dist_ = torch.stack((dist_ * p_minus[:, i : i + 1], dist_ * p_plus[:, i : i + 1]), dim=-1).flatten(1)
    return dist_


def batch_code_distribution(logits: Tensor) -> Tensor:
    """mean_n p_n over all 2^d codes, (2^d,) in index order, from per-bit logits (N, d), N >= 1.

    Memory O(N 2^ceil(d/2) + 2^d): the (N, 2^d) matrix is never formed.
    """
    d = logits.shape[-1]
    p_plus, p_minus = torch.sigmoid(logits), torch.sigmoid(-logits)
    a = d // 2
    dist_a = _half_distribution(p_plus[:, :a], p_minus[:, :a])  # (N, 2^a), bits 0..a-1
    dist_b = _half_distribution(p_plus[:, a:], p_minus[:, a:])  # (N, 2^(d-a)), bits a..d-1
    return (dist_a.t() @ dist_b).flatten() / logits.shape[0]


def batch_entropy(logits: Tensor, exact: bool, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """H(mean_n p_n) in nats from per-bit logits (N, d): exact over all 2^d codes, or (exact=False)
    the factorised upper bound sum_i h(mean_n sigmoid(l_ni)). ``reduce`` (e.g. a cross-rank mean) is
    applied to the batch distribution / marginals before the entropy."""
    reduce = reduce or _identity
    if exact:
        return -xlogx(reduce(batch_code_distribution(logits))).sum()
    q_plus = reduce(torch.sigmoid(logits).mean(dim=0))  # (d,)
    q_minus = reduce(torch.sigmoid(-logits).mean(dim=0))  # accurate where q_plus is close to 1
    return -(xlogx(q_plus) + xlogx(q_minus)).sum()


def factorised_entropies(
    logits: Tensor, exact_batch: bool, reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """fastvq's (per-sample entropy, batch entropy) from per-bit logits (N, c, d), 0-d each.

    The per-sample term is exact, averaged over tokens and codebooks; the batch term is
    ``batch_entropy`` per codebook (exact, or the factorised bound without ``exact_batch``),
    averaged over codebooks.
    """
    batch = torch.stack([batch_entropy(logits[:, c], exact_batch, reduce) for c in range(logits.shape[1])])
    return per_sample_entropy(logits.flatten(0, 1)), batch.mean()
