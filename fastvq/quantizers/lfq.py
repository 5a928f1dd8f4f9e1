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

Two ways to compute the entropies (the functions are in ``fastvq/quantizers/entropy.py``)
---------------------------------------------------------------------------------------
* Default (``exact_entropy=False``): the peer's numbers. The softmax over all 2^d codes, and
  H(p) = -sum p log(max(p, 1e-5)): the clamp biases the entropy (by up to 2^d e^-1 1e-5 nats) but it is
  what vector-quantize-pytorch trains with, so a changed import does not change training. Computed
  in row chunks of at most 64 MiB of probabilities (recomputed in backward), never all N x 2^d.
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
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import torch
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
from fastvq.quantizers.entropy import (
    batch_code_distribution,
    batch_entropy,
    clamped_entropy,
    clamped_softmax_entropies,
    distributed_mean,
    factorised_entropies,
    per_sample_entropy,
)
from fastvq.quantizers.gradients import straight_through

# The entropy functions moved to fastvq/quantizers/entropy.py; these names stay importable from here.
__all__ = [
    "LFQ", "CosineSimLinear", "LFQOutput", "LossBreakdown", "batch_code_distribution", "batch_entropy",
    "bit_weights", "clamped_entropy", "distributed_mean", "pack_bits", "per_sample_entropy", "unpack_bits",
]


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


class CosineSimLinear(nn.Module):
    """The peer's cosine-similarity projection: normalize(x) @ normalize(W, dim 0) * scale; W (dim_in, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


# ------------------------------------------------------------------------------------------------
# bits <-> indices: bit i of an index is feature i's sign, feature 0 the most significant


def bit_weights(codebook_dim: int) -> Tensor:
    """int64 (d,): 2^(d-1), ..., 2, 1, the weight of each feature's bit in an index (the peer's ``mask``)."""
    return 2 ** torch.arange(codebook_dim - 1, -1, -1)


def unpack_bits(indices: Tensor, weights: Tensor) -> Tensor:
    """bool (*indices.shape, d): the bits of integer ``indices`` (unchecked), for ``bit_weights(d)``."""
    return (indices.long().unsqueeze(-1) & weights) != 0


def pack_bits(bits: Tensor, weights: Tensor) -> Tensor:
    """int64 ``bits.shape[:-1]``: the indices of (..., d) bits (bool, or any tensor read as ``!= 0``)."""
    return ((bits != 0).long() * weights).sum(dim=-1)


# ------------------------------------------------------------------------------------------------
# construction


class _Sizes(NamedTuple):
    """LFQ's checked sizes, stored on the module under these names."""

    codebook_size: int
    codebook_dim: int
    num_codebooks: int
    dim: int
    has_projections: bool
    keep_num_codebooks_dim: bool


def _check_sizes(
    dim: int | None,
    codebook_size: int | None,
    num_codebooks: int,
    has_projections: bool | None,
    keep_num_codebooks_dim: bool | None,
) -> _Sizes:
    """Sizes from LFQ's keywords, with the peer's defaults; ValueError naming the bad argument."""
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
    return _Sizes(codebook_size, codebook_dim, num_codebooks, dim, has_projections, keep_num_codebooks_dim)


def _check_scales(
    codebook_scale: float,
    frac_per_sample_entropy: float,
    soft_clamp_input_value: float | None,
    max_exact_entropy_dim: int,
) -> float:
    """The checked ``codebook_scale``; ValueError for any of the four out of range."""
    if not (isinstance(frac_per_sample_entropy, (int, float)) and 0 < frac_per_sample_entropy <= 1):
        raise ValueError(f"frac_per_sample_entropy must lie in (0, 1], got {frac_per_sample_entropy!r}")
    codebook_scale = positive_float(codebook_scale, "codebook_scale")
    if soft_clamp_input_value is not None and not soft_clamp_input_value >= codebook_scale:
        raise ValueError(f"soft_clamp_input_value must be >= codebook_scale = {codebook_scale}, "
                         f"got {soft_clamp_input_value!r}")
    nonnegative_int(max_exact_entropy_dim, "max_exact_entropy_dim")
    return codebook_scale


def _projections(sizes: _Sizes, bias: bool, cosine_sim_scale: float | None) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out) between dim and num_codebooks * d: Linear (project_in a
    ``CosineSimLinear`` when ``cosine_sim_scale`` is given), or Identity without projections."""
    if not sizes.has_projections:
        return nn.Identity(), nn.Identity()
    inner = sizes.codebook_dim * sizes.num_codebooks
    if cosine_sim_scale is not None:
        project_in = CosineSimLinear(sizes.dim, inner, scale=cosine_sim_scale)
    else:
        project_in = nn.Linear(sizes.dim, inner, bias=bias)
    return project_in, nn.Linear(inner, sizes.dim, bias=bias)


def _sample_tokens(tokens: Tensor, frac: float) -> Tensor:
    """A random ``frac`` of the rows of ``tokens``, drawn as the peer draws them (torch's global CPU generator)."""
    num_tokens = tokens.shape[0]
    rand_mask = torch.randn(num_tokens).argsort(dim=-1) < int(num_tokens * frac)
    return tokens[rand_mask.to(tokens.device)]


def _to_rows(
    x: Tensor, mask: Tensor | None, dim: int, channel_first: bool | None
) -> tuple[Tensor, Tensor | None, torch.Size, bool]:
    """LFQ's input as rows: (x (b, n, dim), mask (b, n) bool or None, x's channel-last shape
    without the feature axis, whether the features were on axis 1).

    ``channel_first`` None: features on axis 1 for 4-D and larger input, else last.

    Raises:
        ValueError: the feature axis is not ``dim``, or ``mask`` does not hold one entry per token.
    """
    check_float_tensor(x, "x", min_dim=2)
    transpose = x.dim() >= 4 if channel_first is None else bool(channel_first)
    if x.shape[1 if transpose else -1] != dim:
        layout = "(B, dim, ...)" if transpose else "(B, ..., dim)"
        raise ValueError(f"x must be {layout} with dim = {dim}, got shape {tuple(x.shape)}")
    if transpose:
        x = x.movedim(1, -1)
    lead = x.shape[:-1]
    x = x.reshape(lead[0], -1, dim)  # (b, n, dim)
    if mask is not None:
        mask = mask.reshape(x.shape[0], -1).bool()
        if mask.shape[1] != x.shape[1]:
            raise ValueError(f"mask must hold one entry per token, {tuple(lead)}, got shape {tuple(mask.shape)}")
    return x, mask, lead, transpose


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
        sizes = _check_sizes(dim, codebook_size, num_codebooks, has_projections, keep_num_codebooks_dim)
        codebook_scale = _check_scales(codebook_scale, frac_per_sample_entropy, soft_clamp_input_value,
                                       max_exact_entropy_dim)
        vars(self).update(sizes._asdict())  # codebook_size, codebook_dim, ...: plain attributes
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

        cosine_scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
        self.project_in, self.project_out = _projections(
            sizes, projection_has_bias, cosine_scale if cosine_sim_project_in else None
        )
        if orthogonal_rotation:
            rot = torch.empty(sizes.codebook_dim, sizes.codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        # The peer's buffers: bit weights (persistent, most significant first), zero, every code.
        self.register_buffer("mask", bit_weights(sizes.codebook_dim))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        bits = unpack_bits(torch.arange(sizes.codebook_size), self.mask)
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
        averaged over the codebooks: the peer's clamped softmax, or the exact terms (entropy.py)."""
        if self.exact_entropy:
            logits = (4.0 * inv_temperature * self.code_magnitude()) * tokens  # per-bit log-odds
            return factorised_entropies(logits, self.batch_entropy_is_exact, distributed_mean)
        codebook = self.maybe_l2norm(self.codebook.to(tokens.dtype))
        return clamped_softmax_entropies(tokens, codebook, inv_temperature, distributed_mean)

    def _losses(
        self, x: Tensor, quantized: Tensor, mask: Tensor | None, inv_temperature: float
    ) -> tuple[Tensor, LossBreakdown]:
        """(unweighted entropy loss, its breakdown) of code-space x and its quantized codes
        (b, n, c, d), over the tokens ``mask`` (b, n) keeps; 0-d zeros in eval mode."""
        zero = self.zero.to(x.dtype)
        if not self.training:
            return zero, LossBreakdown(zero, zero, zero)
        tokens = x[mask] if mask is not None else x.flatten(0, 1)  # (N, c, d)
        if self.frac_per_sample_entropy < 1.0:
            tokens = _sample_tokens(tokens, self.frac_per_sample_entropy)
        per_sample_h, batch_h = self.entropy_terms(tokens, inv_temperature)
        entropy_aux_loss = per_sample_h - self.diversity_gamma * batch_h
        if self.experimental_softplus_entropy_loss:
            entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
        commit_loss = zero
        if self.commitment_loss_weight > 0:
            commit = F.mse_loss(x, quantized.detach(), reduction="none")
            commit_loss = (commit[mask] if mask is not None else commit).mean()
        return entropy_aux_loss, LossBreakdown(per_sample_h, batch_h, commit_loss)

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ) -> LFQOutput | tuple[LFQOutput, LossBreakdown]:
        """Quantize ``x``; see the class docstring for layouts and returns."""
        x, mask, lead, transpose = _to_rows(x, mask, self.dim, self.channel_first)  # x (b, n, dim)
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
            quantized = self.maybe_l2norm(torch.where(positive, s, -s))
            indices = pack_bits(positive, self.mask)  # (b, n, c) int64
            # straight-through: quantized's value (bitwise), the activation's gradient to x
            x = straight_through(self.activation(x), quantized) if self.training else quantized
            entropy_aux_loss, breakdown = self._losses(original_input, quantized, mask, inv_temperature)
            if force_f32:
                x = x.type(orig_dtype)

        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        out = self.project_out(x.flatten(-2)).reshape(*lead, self.dim)
        if transpose:
            out = out.movedim(-1, 1)
        indices = indices.reshape(*lead, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        loss = entropy_aux_loss * self.entropy_loss_weight + breakdown.commitment * self.commitment_loss_weight
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
        bits = unpack_bits(indices, self.mask).to(self.dtype)
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
        return unpack_bits(indices, self.mask)

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """int64 indices from (..., d) bits (bool, or any tensor read as ``!= 0``)."""
        if bits.shape[-1] != self.codebook_dim:
            raise ValueError(f"bits must be (..., {self.codebook_dim}), got shape {tuple(bits.shape)}")
        return pack_bits(bits, self.mask)

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
