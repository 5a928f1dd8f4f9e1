"""LFQ: Lookup-Free Quantization (Yu et al. 2023, "Language Model Beats Diffusion", MAGVIT-v2).

Each of the ``d = log2(codebook_size)`` code dimensions is quantized to its sign, ``+-codebook_scale``;
the index is the bit pattern (bit i = 1 where feature i > 0; feature 0 is the most significant bit,
as in vector-quantize-pytorch). The implicit codebook is {-s, +s}^d, so no search and no codebook
parameters. Training adds a commitment loss and the MAGVIT-v2 entropy loss

    entropy_loss = mean_n H(p_n) - diversity_gamma * H(mean_n p_n)

with p_n the soft assignment of sample n over all 2^d codes, p_n(c) proportional to
exp(-inv_temperature ||x_n - c||^2) (as vector-quantize-pytorch: the softmax of 2 inv_temperature x.c).

How the entropy is computed without the (N, 2^d) matrix
-------------------------------------------------------
Since ||x - c||^2 = sum_i (x_i - c_i)^2, p_n is a product over bits:
p_n(c) = prod_i p_ni(c_i) with p_ni(+s) = sigmoid(l_ni), l_ni = 4 inv_temperature s x_ni.

* Per-sample term: the entropy of a product distribution is the sum of its factors' entropies,
  H(p_n) = sum_i h(sigmoid(l_ni)), h the binary entropy. Exact, O(N d), for every d.
* Batch term: mean_n p_n is a MIXTURE of product distributions, not itself a product, so its
  exact entropy needs all 2^d probabilities. Two paths, chosen by ``max_exact_entropy_dim``:
  - exact (d <= max_exact_entropy_dim, default 12): split the bits into halves A, B; build the
    per-sample half-distributions P_A (N, 2^|A|), P_B (N, 2^|B|) by repeated doubling, and the
    batch distribution is one matrix product, mean_n p_n = P_A^T P_B / N, (2^|A|, 2^|B|).
    Memory O(N 2^(d/2) + 2^d) and time O(N 2^d) in a GEMM, never the (N, 2^d) matrix.
  - factorised bound (d > max_exact_entropy_dim): sum_i h(q_i), q_i = mean_n sigmoid(l_ni) the
    batch-mean marginal of bit i. O(N d). By subadditivity of entropy this is an UPPER bound on the
    true batch entropy, equal to it only when the bits of the mixture are independent: maximising
    it balances every bit but does not penalise correlated bits (e.g. two always-equal bits), so it
    is a weaker diversity signal than the exact term. It is what makes d = 18 (MAGVIT-v2's 2^18
    codes) or more affordable; the exact term would need 2^d probabilities per batch.

Entropies are in nats; ``entropy_loss_weight`` and ``commitment_loss_weight`` weight the terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvq.checks import (
    check_float_tensor,
    check_weight,
    compute_dtype,
    is_int,
    nonnegative_int,
    positive_float,
    positive_int,
)
from fastvq.quantizers.gradients import straight_through
from fastvq.quantizers.implicit import ImplicitCodebook
from fastvq.quantizers.layout import from_channel_last, projections, resolve_channel_last, to_channel_last
from fastvq.quantizers.output import QuantizerOutput


class LossBreakdown(NamedTuple):
    """Unweighted loss terms of the last LFQ forward (detached, for logging)."""

    per_sample_entropy: Tensor  # 0-d, nats
    batch_entropy: Tensor  # 0-d, nats: exact, or the factorised upper bound for large d
    commitment: Tensor  # 0-d, mean((x - sg(q))^2)


def _xlogx(p: Tensor) -> Tensor:
    # p log p with 0 log 0 = 0; the clamp at the smallest normal number keeps the gradient finite
    # at p = 0 without biasing the value (unlike a clamp at 1e-5, which adds up over 2^d codes).
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def per_sample_entropy(logits: Tensor) -> Tensor:
    """mean_n H(p_n) for factorised code distributions, exactly, from per-bit logits.

    Args:
        logits: (N, d) float, l_ni = log p_ni(+) - log p_ni(-).

    Returns:
        0-d tensor in logits' dtype: mean over rows of sum_i h(sigmoid(l_ni)), in nats.
    """
    p = torch.sigmoid(logits)
    # h = -(p log p + (1 - p) log(1 - p)) with the logs from logsigmoid: exact in the tails.
    h = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))
    return h.sum(dim=-1).mean()


def _half_distribution(p_plus: Tensor, p_minus: Tensor) -> Tensor:
    """(N, 2^k) probabilities of all bit patterns of k independent bits, from (N, k) marginals."""
    dist = p_plus.new_ones(p_plus.shape[0], 1)
    for i in range(p_plus.shape[1]):
        # Bit i becomes the least significant so far: pattern 2j + 1 has bit i set (+), 2j not.
        dist = torch.stack((dist * p_minus[:, i : i + 1], dist * p_plus[:, i : i + 1]), dim=-1).flatten(1)
    return dist


def batch_code_distribution(logits: Tensor) -> Tensor:
    """mean_n p_n over all 2^d codes, (2^d,), in index order, without an (N, 2^d) intermediate.

    Args:
        logits: (N, d) float per-bit logits, N >= 1.

    Returns:
        (2^d,) tensor in logits' dtype summing to 1; entry j is the probability of the code whose
        bits (feature 0 most significant) spell j. Memory O(N 2^ceil(d/2) + 2^d).
    """
    d = logits.shape[-1]
    p_plus, p_minus = torch.sigmoid(logits), torch.sigmoid(-logits)
    a = d // 2
    dist_a = _half_distribution(p_plus[:, :a], p_minus[:, :a])  # (N, 2^a), bits 0..a-1
    dist_b = _half_distribution(p_plus[:, a:], p_minus[:, a:])  # (N, 2^(d-a)), bits a..d-1
    return (dist_a.t() @ dist_b).flatten() / logits.shape[0]  # (2^a, 2^(d-a)) -> index a-bits-high


def batch_entropy(logits: Tensor, exact: bool) -> Tensor:
    """Entropy of the batch-mean code distribution H(mean_n p_n), in nats.

    Args:
        logits: (N, d) float per-bit logits.
        exact: True: the exact entropy over all 2^d codes (``batch_code_distribution``).
            False: the factorised upper bound sum_i h(mean_n sigmoid(l_ni)) (see module docstring).

    Returns:
        0-d tensor in logits' dtype.
    """
    if exact:
        return -_xlogx(batch_code_distribution(logits)).sum()
    q_plus = torch.sigmoid(logits).mean(dim=0)  # (d,)
    q_minus = torch.sigmoid(-logits).mean(dim=0)  # accurate where q_plus is close to 1
    return -(_xlogx(q_plus) + _xlogx(q_minus)).sum()


class LFQ(ImplicitCodebook):
    """Lookup-Free Quantization with the MAGVIT-v2 entropy loss.

    Args:
        dim: feature size of the input. Default ``log2(codebook_size)``; any other value adds
            ``project_in`` (Linear dim -> log2(codebook_size)) and ``project_out`` (back).
        codebook_size: K, a power of two >= 2. Default ``2 ** dim``. One of dim / codebook_size is needed.
        entropy_loss_weight: weight of the entropy loss. Default 0.1 (0 skips its computation).
        commitment_loss_weight: weight of mean((x - sg(q))^2). Default 0.25.
        diversity_gamma: weight of the batch entropy inside the entropy loss. Default 1.
        codebook_scale: s, the codes are +-s per dimension. Default 1.
        inv_temperature: sharpness of the soft assignment p_n(c) ~ exp(-inv_temperature ||x - c||^2)
            used by the entropy loss. Default 100 (vector-quantize-pytorch's forward default). A plain
            attribute: set it between steps to anneal.
        max_exact_entropy_dim: largest log2(codebook_size) for which the batch entropy is computed
            exactly (O(N 2^d) time, O(N 2^(d/2) + 2^d) memory); above it the factorised upper bound is
            used (O(N d)). Default 12. See the module docstring for why the bound is needed.
        channel_last: features on the last axis, (B, ..., dim). False: (B, dim, ...).
            Default: True, or False when ``accept_image_fmap``.
        accept_image_fmap: input is a (B, dim, H, W) feature map; indices are (B, H, W).

    Input ``z``: (B, ..., dim) float (fp16/bf16 are quantized in fp32 and returned in their dtype).
    Output: ``QuantizerOutput(quantized, indices, loss)``: quantized has z's shape and dtype
    (+-s exactly before ``project_out``; straight-through gradient), indices int64 in [0, K) with
    z's shape minus the feature axis, loss 0-d float32 (float64 for fp64 input):
    entropy_loss_weight * (per_sample - diversity_gamma * batch) + commitment_loss_weight * commitment,
    in training and in eval mode alike. ``last_loss_breakdown`` holds the unweighted terms.

    Raises:
        ValueError: bad sizes, weights or layout options (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        *,
        codebook_scale: float = 1.0,
        inv_temperature: float = 100.0,
        max_exact_entropy_dim: int = 12,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
    ) -> None:
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size (or both), got neither")
        if dim is not None:
            positive_int(dim, "dim")
        if codebook_size is None:
            codebook_size = 2**dim
        if not is_int(codebook_size) or codebook_size < 2:
            raise ValueError(f"codebook_size must be an int power of two >= 2, got {codebook_size!r}")
        if codebook_size & (codebook_size - 1):
            suggestion = 1 << codebook_size.bit_length()
            raise ValueError(f"codebook_size must be a power of two, got {codebook_size} (e.g. {suggestion})")
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > 62:
            raise ValueError(f"codebook_size must be at most 2**62 (int64 indices), got 2**{codebook_dim}")
        nonnegative_int(max_exact_entropy_dim, "max_exact_entropy_dim")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.dim = codebook_dim if dim is None else dim
        self.entropy_loss_weight = check_weight(entropy_loss_weight, "entropy_loss_weight")
        self.commitment_loss_weight = check_weight(commitment_loss_weight, "commitment_loss_weight")
        self.diversity_gamma = check_weight(diversity_gamma, "diversity_gamma")
        self.codebook_scale = positive_float(codebook_scale, "codebook_scale")
        self.inv_temperature = positive_float(inv_temperature, "inv_temperature")
        self.max_exact_entropy_dim = max_exact_entropy_dim
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)

        self.project_in, self.project_out = projections(self.dim, codebook_dim)
        # Bit weights, most significant first; int64, so .half() / .to(dtype) leave them alone.
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.int64), persistent=False)
        self.last_loss_breakdown: LossBreakdown | None = None

    @property
    def exact_entropy(self) -> bool:
        """Whether the batch entropy is exact (log2(codebook_size) <= max_exact_entropy_dim)."""
        return self.codebook_dim <= self.max_exact_entropy_dim

    def bit_logits(self, x: Tensor) -> Tensor:
        """Per-bit logits l = 4 inv_temperature s x of the soft assignment; x: (..., d) -> (..., d)."""
        # -(x - s)^2 + (x + s)^2 = 4 s x: the log-odds of +s against -s under exp(-inv_t ||x - c||^2).
        return (4.0 * self.inv_temperature * self.codebook_scale) * x

    def entropy_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample entropy, batch entropy) of code-space features x: (..., d) float, 0-d each.

        The batch term is exact when ``exact_entropy``, else the factorised upper bound.
        """
        logits = self.bit_logits(x.reshape(-1, self.codebook_dim))
        return per_sample_entropy(logits), batch_entropy(logits, exact=self.exact_entropy)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts and the loss. Returns QuantizerOutput."""
        check_float_tensor(z, "z", min_dim=2)
        in_dtype = z.dtype
        h = self.project_in(to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap))
        x = h.to(compute_dtype(h.dtype))  # (B, ..., d)
        positive = x > 0
        s = self.codebook_scale
        q = torch.where(positive, x.new_tensor(s), x.new_tensor(-s))
        indices = (positive.long() * self.mask).sum(dim=-1)  # (B, ...)
        quantized = straight_through(x, q)  # q bitwise in value, the identity gradient to x

        commitment = torch.mean((x - q) ** 2) if x.numel() else x.new_zeros(())
        zero = x.new_zeros(())
        if self.entropy_loss_weight > 0 and x.numel():
            sample_h, batch_h = self.entropy_terms(x)
        else:
            sample_h = batch_h = zero
        loss = (
            self.entropy_loss_weight * (sample_h - self.diversity_gamma * batch_h)
            + self.commitment_loss_weight * commitment
        )
        self.last_loss_breakdown = LossBreakdown(sample_h.detach(), batch_h.detach(), commitment.detach())
        out = self.project_out(quantized.to(h.dtype)).to(in_dtype)
        return QuantizerOutput(from_channel_last(out, self.channel_last), indices, loss)

    # ------------------------------------------------------------------------------------------
    # bits, codes and indices

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """bool (*indices.shape, d): bit i of each index, feature 0 most significant.

        Raises:
            TypeError: non-integer indices. ValueError: indices out of [0, codebook_size) (CPU only).
        """
        self._check_indices(indices)
        return (indices.long().unsqueeze(-1) & self.mask) != 0

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """int64 indices from (..., d) bits (bool, or any tensor read as ``!= 0``)."""
        if bits.shape[-1] != self.codebook_dim:
            raise ValueError(f"bits must be (..., {self.codebook_dim}), got shape {tuple(bits.shape)}")
        return ((bits != 0).long() * self.mask).sum(dim=-1)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """int64 indices of (..., d) codes: bit i = (code_i > 0). Codes are taken before project_out."""
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must be (..., {self.codebook_dim}), got shape {tuple(codes.shape)}")
        return self.bits_to_indices(codes > 0)

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(*indices.shape, d) codes +-codebook_scale in ``dtype``, before project_out."""
        bits = self.indices_to_bits(indices)
        s = torch.tensor(self.codebook_scale, dtype=dtype, device=bits.device)
        return torch.where(bits, s, -s)

    @property
    def _code_device(self) -> torch.device:
        return self.mask.device

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, entropy_loss_weight={self.entropy_loss_weight}, "
            f"commitment_loss_weight={self.commitment_loss_weight}, diversity_gamma={self.diversity_gamma}, "
            f"codebook_scale={self.codebook_scale}, inv_temperature={self.inv_temperature}, "
            f"exact_entropy={self.exact_entropy}, channel_last={self.channel_last}"
        )
