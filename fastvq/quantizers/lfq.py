"""LFQ: Lookup-Free Quantization (Yu et al. 2023, "Language Model Beats Diffusion", MAGVIT-v2), a
drop-in for vector-quantize-pytorch's ``LFQ`` (same keywords, defaults, returns and state_dict).

Each of the ``d = log2(codebook_size)`` code dimensions (per codebook) is quantized to its sign,
``+-codebook_scale``; the index is the bit pattern (bit i = 1 where feature i > 0; feature 0 is the
most significant bit). The implicit codebook is {-s, +s}^d. Training adds the MAGVIT-v2 entropy loss
and a commitment loss

    entropy_aux_loss = mean_n H(p_n) - diversity_gamma * H(mean_n p_n)
    loss = entropy_loss_weight * entropy_aux_loss + commitment_loss_weight * mean((x - sg(q))^2)

with p_n the soft assignment of token n over all 2^d codes, p_n(c) = softmax_c(2 inv_temperature x.c)
(= exp(-inv_temperature ||x - c||^2) normalised, as ||c|| is the same for every code). In eval mode the
loss is 0 and the output carries no straight-through gradient, as in the peer.

Two ways to compute the entropies
---------------------------------
* Default (``exact_entropy=False``): the peer's numbers. The dense (N, 2^d) softmax, and
  H(p) = -sum p log(max(p, 1e-5)): the clamp biases the entropy (by up to 2^d e^-1 1e-5 nats) but it is
  what vector-quantize-pytorch trains with, so a changed import does not change training.
* ``exact_entropy=True`` (recommended): p_n is a product over bits, p_n(c) = prod_i sigmoid(+-l_ni),
  l_ni = 4 inv_temperature a x_ni (a the code magnitude), so H(p_n) = sum_i h(sigmoid(l_ni)) exactly in
  O(N d). The batch term mean_n p_n is a mixture, not a product:
  - d <= max_exact_entropy_dim (default 12): exact. Split the bits into halves A, B, build the
    per-sample half-distributions P_A (N, 2^|A|), P_B (N, 2^|B|), and mean_n p_n = P_A^T P_B / N,
    one GEMM: memory O(N 2^(d/2) + 2^d), never the (N, 2^d) matrix.
  - d > max_exact_entropy_dim: the factorised bound sum_i h(mean_n sigmoid(l_ni)), O(N d), an UPPER
    bound on the batch entropy by subadditivity (it does not penalise correlated bits).
  No 1e-5 clamp: p log p with 0 log 0 = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import (
    check_float_tensor,
    check_indices,
    check_weight,
    is_int,
    nonnegative_int,
    positive_float,
    positive_int,
)
from fastvq.quantizers.gradients import straight_through


class LFQOutput(NamedTuple):
    """vector-quantize-pytorch's ``Return(quantized, indices, entropy_aux_loss)``; ``.loss`` aliases the third."""

    quantized: Tensor  # the input's shape and dtype
    indices: Tensor  # int64: the input's shape without the feature axis (+ trailing num_codebooks axis if kept)
    entropy_aux_loss: Tensor  # 0-d, weighted entropy + commitment loss (0 in eval mode)

    @property
    def loss(self) -> Tensor:
        return self.entropy_aux_loss


class LossBreakdown(NamedTuple):
    """vector-quantize-pytorch's unweighted loss terms (``return_loss_breakdown=True``)."""

    per_sample_entropy: Tensor  # 0-d, nats
    batch_entropy: Tensor  # 0-d, nats (exact_entropy=True, large d: the factorised upper bound)
    commitment: Tensor  # 0-d, mean((x - sg(q))^2); 0 when commitment_loss_weight is 0


# ------------------------------------------------------------------------------------------------
# entropies


def clamped_entropy(prob: Tensor) -> Tensor:
    """vector-quantize-pytorch's entropy over the last axis: -sum p log(max(p, 1e-5))."""
    return (-prob * prob.clamp(min=1e-5).log()).sum(dim=-1)


def _xlogx(p: Tensor) -> Tensor:
    # p log p with 0 log 0 = 0; the clamp at the smallest normal number keeps the gradient finite.
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


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
    reduce = reduce or (lambda t: t)
    if exact:
        return -_xlogx(reduce(batch_code_distribution(logits))).sum()
    q_plus = reduce(torch.sigmoid(logits).mean(dim=0))  # (d,)
    q_minus = reduce(torch.sigmoid(-logits).mean(dim=0))  # accurate where q_plus is close to 1
    return -(_xlogx(q_plus) + _xlogx(q_minus)).sum()


def distributed_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over the ranks (differentiable, as the peer's), ``t`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / dist.get_world_size()


class CosineSimLinear(nn.Module):
    """The peer's cosine-similarity projection: normalize(x) @ normalize(W, dim 0) * scale; W (dim_in, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


# ------------------------------------------------------------------------------------------------
# the module


class LFQ(nn.Module):
    """Lookup-Free Quantization, vector-quantize-pytorch's keywords and defaults (docs/quantizers.md).

    Args (all keyword-only, the peer's defaults):
        dim: input feature size. Default ``num_codebooks * log2(codebook_size)``.
        codebook_size: K per codebook, a power of two >= 2. Default ``2 ** dim``.
        entropy_loss_weight: 0.1. commitment_loss_weight: 0. (fastvq's old default was 0.25).
        diversity_gamma: weight of the batch entropy in the entropy loss. 1.
        straight_through_activation: module applied to x on the straight-through path. Identity.
        num_codebooks: codebooks per token, each on its own log2(K) features. 1.
        keep_num_codebooks_dim: trailing codebook axis on the indices. Default num_codebooks > 1.
        codebook_scale: s, codes are +-s. 1. frac_per_sample_entropy: fraction of tokens (drawn from
            torch's global CPU generator, as the peer) the entropies use, in (0, 1]. 1.
        has_projections: Linear project_in / project_out. Default dim != num_codebooks * log2(K).
        projection_has_bias: True. cosine_sim_project_in, cosine_sim_project_in_scale: project_in is
            a CosineSimLinear scaled by the scale (default codebook_scale). False, None.
        soft_clamp_input_value: x -> v tanh(x / v) after project_in; >= codebook_scale. None.
        channel_first: features on axis 1. Default (None): for inputs of 4 or more dims.
        experimental_softplus_entropy_loss, entropy_loss_offset: entropy loss -> softplus(loss + offset). False, 5.
        spherical: BSQ (Zhao et al. 2024): x and codes l2-normalised (times s) per codebook. False.
        force_quantization_f32: quantize in fp32 (autocast off). True.
        orthogonal_rotation: a fixed random orthogonal rotation (buffer) before quantization. False.
        exact_entropy: fastvq's exact entropies instead of the peer's clamped dense softmax (module
            docstring). False. max_exact_entropy_dim: with exact_entropy, the largest d with an exact
            batch term (above it: the factorised bound). 12.

    Forward: ``lfq(x, inv_temperature=100., return_loss_breakdown=False, mask=None)``; x (B, N, dim),
    (B, dim, ...) for 4-D+ (or per ``channel_first``), also (B, dim) and channel-last (B, ..., dim)
    with channel_first=False. ``mask``: bool (B, N) tokens that count in the losses. Returns
    ``LFQOutput(quantized, indices, entropy_aux_loss)``, and ``(LFQOutput, LossBreakdown)`` with
    return_loss_breakdown.

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        exact_entropy: bool = False,
        max_exact_entropy_dim: int = 12,
    ) -> None:
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size (or both), got neither")
        num_codebooks = positive_int(num_codebooks, "num_codebooks")
        if dim is not None:
            positive_int(dim, "dim")
        if codebook_size is None:
            if dim % num_codebooks:
                raise ValueError(f"dim must be a multiple of num_codebooks = {num_codebooks}, got {dim}")
            codebook_size = 2 ** (dim // num_codebooks)
        if not is_int(codebook_size) or codebook_size < 2:
            raise ValueError(f"codebook_size must be an int power of two >= 2, got {codebook_size!r}")
        if codebook_size & (codebook_size - 1):
            suggestion = 1 << codebook_size.bit_length()
            raise ValueError(f"codebook_size must be a power of two, got {codebook_size} (e.g. {suggestion})")
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > 62:
            raise ValueError(f"codebook_size must be at most 2**62 (int64 indices), got 2**{codebook_dim}")
        codebook_dims = codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else dim
        has_projections = dim != codebook_dims if has_projections is None else bool(has_projections)
        if not has_projections and dim != codebook_dims:
            raise ValueError(f"has_projections=False needs dim == num_codebooks * log2(codebook_size) = "
                             f"{codebook_dims}, got dim={dim}")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(f"keep_num_codebooks_dim=False needs num_codebooks=1, got {num_codebooks}")
        if not (isinstance(frac_per_sample_entropy, (int, float)) and 0 < frac_per_sample_entropy <= 1):
            raise ValueError(f"frac_per_sample_entropy must lie in (0, 1], got {frac_per_sample_entropy!r}")
        codebook_scale = positive_float(codebook_scale, "codebook_scale")
        if soft_clamp_input_value is not None and not soft_clamp_input_value >= codebook_scale:
            raise ValueError(f"soft_clamp_input_value must be >= codebook_scale = {codebook_scale}, "
                             f"got {soft_clamp_input_value!r}")
        nonnegative_int(max_exact_entropy_dim, "max_exact_entropy_dim")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.dim = dim
        self.has_projections = has_projections
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.entropy_loss_weight = check_weight(entropy_loss_weight, "entropy_loss_weight")
        self.commitment_loss_weight = check_weight(commitment_loss_weight, "commitment_loss_weight")
        self.diversity_gamma = check_weight(diversity_gamma, "diversity_gamma")
        self.codebook_scale = codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = spherical
        self.force_quantization_f32 = force_quantization_f32
        self.orthogonal_rotation = orthogonal_rotation
        self.exact_entropy = bool(exact_entropy)
        self.max_exact_entropy_dim = max_exact_entropy_dim
        self.activation = nn.Identity() if straight_through_activation is None else straight_through_activation

        if cosine_sim_project_in:
            scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            project_in = partial(CosineSimLinear, scale=scale)
        else:
            project_in = partial(nn.Linear, bias=projection_has_bias)
        self.project_in = project_in(dim, codebook_dims) if has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias) if has_projections else nn.Identity()

        if orthogonal_rotation:
            rot = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        # The peer's buffers: bit weights (persistent, most significant first), zero, every code.
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        bits = (torch.arange(codebook_size)[..., None] & self.mask) != 0
        self.register_buffer("codebook", self.bits_to_codes(bits.float()).float(), persistent=False)
        self.last_loss_breakdown: LossBreakdown | None = None

    # ---- parts ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    @property
    def batch_entropy_is_exact(self) -> bool:
        """With exact_entropy: whether the batch term is exact (log2 K <= max_exact_entropy_dim)."""
        return self.codebook_dim <= self.max_exact_entropy_dim

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Codes +-codebook_scale from bits (float 0 / 1, or bool), before l2norm / rotation / project_out."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def maybe_l2norm(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def code_magnitude(self) -> float:
        """|c_i| of every code coordinate as the entropy sees it: s, or s / sqrt(d) when spherical."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    def entropy_terms(self, tokens: Tensor, inv_temperature: float = 100.0) -> tuple[Tensor, Tensor]:
        """(per-sample entropy, batch entropy) of code-space tokens (N, num_codebooks, d), 0-d each,
        averaged over the codebooks: the peer's clamped dense softmax, or the exact terms."""
        if self.exact_entropy:
            logits = (4.0 * inv_temperature * self.code_magnitude()) * tokens  # per-bit log-odds
            exact = self.batch_entropy_is_exact
            batch = torch.stack([batch_entropy(logits[:, c], exact, distributed_mean) for c in range(tokens.shape[1])])
            return per_sample_entropy(logits.reshape(-1, self.codebook_dim)), batch.mean()
        codebook = self.codebook.to(tokens.dtype)
        codebook = self.maybe_l2norm(codebook)
        distance = -2 * torch.einsum("... i d, j d -> ... i j", tokens, codebook)  # (N, c, K)
        prob = (-distance * inv_temperature).softmax(dim=-1)
        avg_prob = distributed_mean(prob.mean(dim=0))  # (c, K)
        return clamped_entropy(prob).mean(), clamped_entropy(avg_prob).mean()

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ) -> LFQOutput | tuple[LFQOutput, LossBreakdown]:
        """Quantize ``x``; see the class docstring for layouts and returns."""
        check_float_tensor(x, "x", min_dim=2)
        transpose = x.dim() >= 4 if self.channel_first is None else bool(self.channel_first)
        if x.shape[1 if transpose else -1] != self.dim:
            layout = "(B, dim, ...)" if transpose else "(B, ..., dim)"
            raise ValueError(f"x must be {layout} with dim = {self.dim}, got shape {tuple(x.shape)}")
        if transpose:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]
        x = x.reshape(lead[0], -1, self.dim)  # (b, n, dim)
        if mask is not None:
            mask = mask.reshape(x.shape[0], -1).bool()
            if mask.shape[1] != x.shape[1]:
                raise ValueError(f"mask must hold one entry per token, {tuple(lead)}, got shape {tuple(mask.shape)}")

        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            v = self.soft_clamp_input_value
            x = (x / v).tanh() * v
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (b, n, c, d)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self.maybe_l2norm(x)

        force_f32 = self.force_quantization_f32
        context = partial(torch.autocast, "cuda", enabled=False) if force_f32 else nullcontext
        with context():
            orig_dtype = x.dtype
            if force_f32:
                x = x.float()
            original_input = x
            positive = x > 0
            s = x.new_tensor(self.codebook_scale)
            quantized = torch.where(positive, s, -s)
            indices = (positive.long() * self.mask).sum(dim=-1)  # (b, n, c) int64
            quantized = self.maybe_l2norm(quantized)
            # straight-through: quantized's value (bitwise), the activation's gradient to x
            x = straight_through(self.activation(x), quantized) if self.training else quantized

            zero = self.zero.to(x.dtype)
            per_sample_h = batch_h = entropy_aux_loss = commit_loss = zero
            if self.training:
                tokens = original_input[mask] if mask is not None else original_input.flatten(0, 1)  # (N, c, d)
                if self.frac_per_sample_entropy < 1.0:
                    num_tokens = tokens.shape[0]
                    num_sampled = int(num_tokens * self.frac_per_sample_entropy)
                    rand_mask = torch.randn(num_tokens).argsort(dim=-1) < num_sampled  # the peer's draw
                    tokens = tokens[rand_mask.to(tokens.device)]
                per_sample_h, batch_h = self.entropy_terms(tokens, inv_temperature)
                entropy_aux_loss = per_sample_h - self.diversity_gamma * batch_h
                if self.experimental_softplus_entropy_loss:
                    entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
                if self.commitment_loss_weight > 0:
                    commit = F.mse_loss(original_input, quantized.detach(), reduction="none")
                    commit_loss = (commit[mask] if mask is not None else commit).mean()
            if force_f32:
                x = x.type(orig_dtype)

        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        out = self.project_out(x.flatten(-2))  # (b, n, dim)
        out = out.reshape(*lead, self.dim)
        if transpose:
            out = out.movedim(-1, 1)
        indices = indices.reshape(*lead, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        breakdown = LossBreakdown(per_sample_h, batch_h, commit_loss)
        self.last_loss_breakdown = LossBreakdown(*(t.detach() for t in breakdown))
        ret = LFQOutput(out, indices, loss)
        return (ret, breakdown) if return_loss_breakdown else ret

    # ---- indices, bits and codes ---------------------------------------------------------------

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """The peer's decoder: codes for ``indices`` as forward returns them, projected out (by
        default), channel-first when ``channel_first`` or (default) indices of 3+ dims besides the
        codebook axis. Raises TypeError / ValueError (CPU) for non-integer or out-of-range indices."""
        return self._decode(indices, project_out, auto_layout=True)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """fastvq's decoder for composed quantizers: ``indices_to_codes(indices)``, except that the
        layout follows ``channel_first`` only (None: channel-last, whatever the indices' rank), as
        ResidualStack / GroupedQuantizer stages and the VQ-VAE registry (channel_first=True) need."""
        return self._decode(indices, True, auto_layout=False)

    def _decode(self, indices: Tensor, project_out: bool, auto_layout: bool) -> Tensor:
        check_indices(indices, self.codebook_size)
        is_img_or_video = auto_layout and indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img_or_video if self.channel_first is None else bool(self.channel_first)
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        bits = ((indices[..., None].long() & self.mask) != 0).to(self.dtype)
        codes = self.maybe_l2norm(self.bits_to_codes(bits))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if transpose else codes

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """bool (*indices.shape, d): bit i of each index, feature 0 most significant."""
        check_indices(indices, self.codebook_size)
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

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"entropy_loss_weight={self.entropy_loss_weight}, commitment_loss_weight={self.commitment_loss_weight}, "
            f"diversity_gamma={self.diversity_gamma}, codebook_scale={self.codebook_scale}, "
            f"spherical={self.spherical}, exact_entropy={self.exact_entropy}, channel_first={self.channel_first}"
        )
