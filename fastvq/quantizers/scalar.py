"""The formulas of finite scalar quantization (FSQ), as pure functions the ``FSQ`` module composes.

Every function takes the per-dimension level counts as an integer tensor ``levels`` of shape (d,)
(int32 or int64, as ``FSQ`` keeps them in a buffer) and works on the last axis of its input, so it
serves any number of leading axes (batch, tokens, codebooks). The expressions are those of
vector-quantize-pytorch's ``FSQ`` in its order of operations, so fp32 values agree bitwise; the
derivations are in ``fastvq/quantizers/fsq.py``'s module docstring.

Level index k_i in [0, L_i) numbers the L_i values of dimension i from the lowest; the index of a
code is sum_i k_i basis_i with ``basis = cumprod([1, L_0, ..., L_{d-2}])`` (``mixed_radix_basis``).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-3  # the paper's eps: keeps the shift of the default bound finite for every L >= 3


def round_ste(z: Tensor) -> Tensor:
    """round(z) in value (half to even), the identity gradient (straight-through)."""
    return z + (z.round() - z).detach()


def floor_ste(z: Tensor) -> Tensor:
    """floor(z) in value, the identity gradient (straight-through)."""
    return z + (z.floor() - z).detach()


def constants_dtype(z: Tensor) -> torch.dtype:
    """The dtype the constants are built in for input ``z``: fp32, or fp64 for fp64 input."""
    return torch.promote_types(z.dtype, torch.float32)


def mixed_radix_basis(levels: list[int]) -> Tensor:
    """int64 (d,): the weight of each dimension's level index in a code's index."""
    return torch.cumprod(torch.tensor([1] + levels[:-1]), 0)


def bound_and_level(z: Tensor, levels: Tensor, eps: float = EPS, hard_clamp: bool = False) -> tuple[Tensor, Tensor]:
    """The paper's bound and straight-through round (Appendix A.1 of arXiv:2309.15505).

    Args:
        z: (..., d) float, the pre-quantization features.
        levels: (d,) int, L_i >= 3 each (L = 2 is allowed but saturates tanh).
        eps: widens the bound so the shift atanh(offset / half_l) stays finite.
        hard_clamp: clamp(-1, 1) instead of tanh (and the identity instead of atanh).

    Returns:
        (codes, level indices): codes (..., d) in [-1, 1], in ``z``'s dtype promoted with the
        constants' (fp32 or fp64), with a straight-through gradient through the round; level
        indices (..., d) k_i in [0, L_i), as floats, detached.
    """
    lv = levels.to(constants_dtype(z))
    half_l = (lv - 1) * (1 + eps) / 2
    offset = (levels % 2 == 0).to(lv.dtype) * 0.5  # even L: one more value below zero
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)  # keeps z = 0 on the code 0
    squash = z + shift
    squash = squash.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(squash)
    rounded = round_ste(squash * half_l - offset)
    half_width = levels // 2
    return rounded / half_width, rounded.detach() + half_width


def symmetric_bound_and_level(z: Tensor, levels: Tensor, hard_clamp: bool = False) -> tuple[Tensor, Tensor]:
    """The symmetry-preserving quantizer of Section 3.2 of arXiv:2411.19842.

    code = 2 / (L - 1) floor((L - 1) (tanh(z) + 1) / 2 + 0.5) - 1: L evenly spaced values from -1
    to 1 (none at 0 for even L), the one bound under which L = 2 is useful.

    Args:
        z: (..., d) float. levels: (d,) int, L_i >= 2 each.
        hard_clamp: clamp(-1, 1) instead of tanh.

    Returns:
        (codes, level indices) as ``bound_and_level``: codes (..., d) in [-1, 1] with a
        straight-through gradient through the floor; level indices (..., d) as detached floats.
    """
    squash = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
    levels_minus_1 = levels - 1
    step = 2.0 / levels_minus_1.to(constants_dtype(z))
    bracket = floor_ste(levels_minus_1 * (squash + 1) / 2.0 + 0.5)
    return step * bracket - 1.0, bracket.detach()


def codes_to_level_indices(codes: Tensor, levels: Tensor, preserve_symmetry: bool) -> Tensor:
    """int64 (..., d) level indices of (..., d) float codes in [-1, 1].

    Off-grid values go to the nearest level per dimension and out-of-range ones to the end levels
    (the peer rounds the weighted index sum instead; the two agree on the grid).
    """
    c = codes.to(constants_dtype(codes))
    lv = levels.to(c.dtype)
    if preserve_symmetry:
        k = (c + 1) / (2.0 / (lv - 1))
    else:
        k = c * (levels // 2) + (levels // 2)
    return torch.round(k).clamp(min=0).minimum(lv - 1).long()


def level_indices_to_codes(k: Tensor, levels: Tensor, preserve_symmetry: bool, dtype: torch.dtype) -> Tensor:
    """(..., d) codes in [-1, 1] in ``dtype`` for (..., d) integer level indices k_i in [0, L_i)."""
    k = k.to(dtype)
    lv = levels.to(dtype)
    if preserve_symmetry:
        return k * (2.0 / (lv - 1)) - 1.0
    half_width = torch.div(lv, 2, rounding_mode="floor")
    return (k - half_width) / half_width


def indices_to_level_indices(indices: Tensor, levels: Tensor, basis: Tensor) -> Tensor:
    """int64 (*indices.shape, d) level indices of integer code ``indices`` (unchecked)."""
    return (indices.long().unsqueeze(-1) // basis) % levels


def level_indices_to_indices(k: Tensor, basis: Tensor) -> Tensor:
    """int32 ``k.shape[:-1]`` code indices of (..., d) level indices (integer or integral floats)."""
    return (k.long() * basis).sum(dim=-1).int()


def noise_dropout(codes: Tensor, p: float) -> Tensor:
    """``codes`` with U(-0.5, 0.5) added to a random half of the values, clamped to [-1, 1].

    vector-quantize-pytorch's expression, kept so the result equals the peer's under one seed: it
    draws the mask as ``full(p).bernoulli_()``, and ``Tensor.bernoulli_()`` takes its own default
    probability 0.5, not the tensor's values, so any ``p`` (0 included) selects each value with
    probability 0.5; callers skip the call for ``p = 0`` (as ``FSQ`` and the peer do). Draws from
    torch's default generator on ``codes``' device in the peer's order (bernoulli, then uniform).
    Returns a new tensor of ``codes``' shape and dtype; the gradient passes to ``codes`` where not clamped.
    """
    # Fresh contiguous tensors: the draws follow the logical order whatever codes' strides.
    like = dict(dtype=codes.dtype, device=codes.device)
    mask = torch.full(codes.shape, p, **like).bernoulli_().bool()
    offset = torch.rand(codes.shape, **like) - 0.5
    return torch.where(mask, codes + offset, codes).clamp(-1.0, 1.0)
