"""FSQ: Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

A drop-in for vector-quantize-pytorch's ``FSQ``: the same constructor keywords and defaults, the
same forward ``(quantized, indices)`` (here the NamedTuple ``FSQOutput``), shapes, dtypes, methods
and state_dict keys, and bitwise the same values for fp32 input.

Each of the ``d = len(levels)`` features is squashed into a bounded interval and rounded to one of
``levels[i]`` values; the implicit codebook is the grid of all combinations, ``prod(levels)`` codes,
with no parameters, no codebook loss and no dead codes.

Bound (the paper's Appendix A.1), for a level count L, eps = 1e-3:

    half_l = (L - 1) (1 + eps) / 2,  offset = 0.5 if L is even else 0,  shift = atanh(offset / half_l)
    bounded = tanh(z + shift) half_l - offset          in (-L/2, L/2 - 1) for even L, |.| < L/2 for odd
    code = round(bounded) / (L // 2)                   in [-1, 1]   (round half to even, as torch.round)

Odd L gives the symmetric integers {-(L-1)/2 .. (L-1)/2}; even L gives {-L/2 .. L/2 - 1} (one more
value below zero), which the offset makes reachable while ``shift`` keeps z = 0 on the code 0.
The paper's listing writes ``tan`` for the shift and ``(1 - eps)``; ``atanh`` is the exact inverse
(z = 0 maps to 0), and ``(1 + eps)`` keeps the shift finite for every L >= 3.

``preserve_symmetry=True`` uses the symmetric quantizer of Section 3.2 of arXiv:2411.19842,
code = 2 / (L - 1) floor((L - 1) (tanh(z) + 1) / 2 + 0.5) - 1 (L evenly spaced values from -1 to 1,
no value at 0 for even L): the only mode in which L = 2 is useful, since the default bound for
L = 2 puts its shift at atanh(1 / 1.001) ~ 3.8, where tanh is saturated. Only in that mode,
``noise_dropout = p > 0`` adds, in training, U(-0.5, 0.5) to each code (after the indices are
taken) and clamps to [-1, 1]: with probability p as the peer documents it, 0.5 as its draw computes
it (``scalar.noise_dropout``; kept for equal draws). ``bound_hard_clamp`` replaces tanh by
clamp(-1, 1) (and atanh by the identity), for inputs already soft-clamped into range.
``orthogonal_rotation`` rotates each codebook's features by a fixed random orthogonal matrix (a
saved buffer) before quantizing and back after (arXiv:2307.13304). The formulas are functions in
``fastvq/quantizers/scalar.py``; this module holds the options, buffers and layouts.

Rounding has a straight-through gradient; everything else (tanh, the projections) is differentiable.
Constants are built in fp32 (fp64 for fp64 input), as vector-quantize-pytorch does for fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, is_int, positive_int
from fastvq.quantizers import scalar
from fastvq.quantizers.implicit import ImplicitCodebook
from fastvq.quantizers.layout import from_channel_last, to_channel_last
from fastvq.quantizers.scalar import EPS as _EPS
from fastvq.quantizers.scalar import floor_ste, round_ste

__all__ = ["FSQ", "FSQOutput", "floor_ste", "round_ste"]

_INT32_MAX = 2**31 - 1


class FSQOutput(NamedTuple):
    """What ``FSQ`` returns; unpacks like vector-quantize-pytorch's ``(quantized, indices)``."""

    quantized: Tensor  # the input's shape and layout
    indices: Tensor | None  # int32; None when return_indices=False


def _check_levels(levels: object, preserve_symmetry: bool) -> list[int]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of ints, got {levels!r}")
    for level in levels:
        if not is_int(level) or level < 2:
            raise ValueError(f"levels must be ints >= 2, got {list(levels)!r}")
        if level == 2 and not preserve_symmetry:
            raise ValueError(
                f"levels contains 2, got {list(levels)!r}: the default bound saturates tanh for 2 levels "
                "(nearly every input gets one code); use preserve_symmetry=True or levels >= 3"
            )
    return [int(level) for level in levels]


def _check_options(
    levels: object,
    num_codebooks: int,
    keep_num_codebooks_dim: bool | None,
    return_indices: bool,
    preserve_symmetry: bool,
    noise_dropout: float,
) -> tuple[list[int], int, bool]:
    """``FSQ``'s checked (levels, num_codebooks, keep_num_codebooks_dim); ValueError naming the bad argument."""
    levels = _check_levels(levels, preserve_symmetry)
    num_codebooks = positive_int(num_codebooks, "num_codebooks")
    keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
    if num_codebooks > 1 and not keep_num_codebooks_dim:
        raise ValueError(f"keep_num_codebooks_dim=False needs num_codebooks == 1, got {num_codebooks}")
    if not 0.0 <= float(noise_dropout) <= 1.0:
        raise ValueError(f"noise_dropout must lie in [0, 1], got {noise_dropout!r}")
    if noise_dropout > 0 and not preserve_symmetry:
        raise ValueError(f"noise_dropout={noise_dropout!r} needs preserve_symmetry=True")
    if return_indices and math.prod(levels) > _INT32_MAX:
        raise ValueError(
            f"prod(levels) must fit an int32 index, got {math.prod(levels)} for levels {levels!r} "
            "(or pass return_indices=False)"
        )
    return levels, num_codebooks, keep_num_codebooks_dim


def _resolve_layout(channel_first: bool, channel_last: bool | None, accept_image_fmap: bool) -> str:
    """"first" (features on axis 1 always), "last" (last axis always) or "auto" (axis 1 for >= 4-D).

    Raises:
        ValueError: ``channel_last=True`` with ``channel_first`` or ``accept_image_fmap``.
    """
    if channel_last and (channel_first or accept_image_fmap):
        raise ValueError(
            "channel_last=True contradicts "
            + ("channel_first=True" if channel_first else "accept_image_fmap=True (a (B, dim, H, W) input)")
        )
    if channel_first or channel_last is False or accept_image_fmap:
        return "first"
    return "last" if channel_last else "auto"


def _projections(dim: int, inner: int, bias: bool) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out): Linear dim -> inner and back (with ``bias``), or two Identity if equal."""
    if dim == inner:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, inner, bias=bias), nn.Linear(inner, dim, bias=bias)


def _random_rotation(levels: list[int]) -> Tensor:
    """(d, d) float32 random orthogonal matrix from torch's global generator, as the peer draws it."""
    if len(set(levels)) != 1:
        # stacklevel 3: the user's FSQ(...) call, through __init__
        warnings.warn(
            f"orthogonal_rotation is not recommended for FSQ with asymmetric levels (levels={levels})", stacklevel=3
        )
    rotation = torch.empty(len(levels), len(levels))
    nn.init.orthogonal_(rotation)
    return rotation


class FSQ(ImplicitCodebook):
    """Finite Scalar Quantization, a drop-in for vector-quantize-pytorch's ``FSQ`` (module docstring).

    Args (the peer's, same defaults):
        levels: levels per code dimension, each >= 3 (>= 2 with ``preserve_symmetry``);
            ``codebook_size = prod(levels)``.
        dim: input feature size. Default ``len(levels) * num_codebooks``; any other value adds
            Linear ``project_in`` (dim -> len(levels) * num_codebooks) and ``project_out`` (back).
        num_codebooks: independent FSQ codebooks side by side on the feature axis. Default 1.
        keep_num_codebooks_dim: indices keep a trailing codebook axis. Default ``num_codebooks > 1``
            (False is only allowed with one codebook).
        scale: stored, unused (as in the peer).
        allowed_dtypes: dtypes quantized as they are; others are quantized in fp32 when
            ``force_quantization_f32``. Default (float32, float64).
        channel_first: features on axis 1 for every input rank. Default False: axis 1 for 4-D and
            higher input (images, video), the last axis for 2-D / 3-D input.
        projection_has_bias: the projections have a bias. Default True.
        return_indices: compute indices; False returns ``indices=None``. Default True.
        force_quantization_f32: quantize in fp32 (autocast off) whatever the input dtype. Default True.
        preserve_symmetry, noise_dropout, bound_hard_clamp, orthogonal_rotation: module docstring.
            Defaults False, 0.0, False, False.
    Keyword-only fastvq layout aliases:
        channel_last: True: features last for every rank (the peer cannot express this); False: the
            same as ``channel_first=True``. Default None (``channel_first`` decides).
        accept_image_fmap: input is a (B, dim, H, W) feature map (checked); implies channel-first.

    Input ``z``: (B, ..., dim) or (B, dim, ...) float (see ``channel_first``).
    Output: ``FSQOutput(quantized, indices)``: quantized in z's shape and layout, in the dtype of
    ``project_in(z)``; indices int32 in [0, codebook_size) of z's shape without the feature axis,
    plus a trailing (num_codebooks,) axis when ``keep_num_codebooks_dim``; None without
    ``return_indices``. Index of per-dimension level indices k_i in [0, L_i): sum_i k_i prod_{j<i} L_j.

    Raises:
        ValueError: bad arguments or contradictory layout options (in ``__init__``); input of the
        wrong shape.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        *,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
    ) -> None:
        super().__init__()
        levels, num_codebooks, keep_num_codebooks_dim = _check_options(
            levels, num_codebooks, keep_num_codebooks_dim, return_indices, preserve_symmetry, noise_dropout
        )
        self._layout = _resolve_layout(channel_first, channel_last, accept_image_fmap)
        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else positive_int(dim, "dim")
        self.codebook_size = math.prod(levels)
        self.scale = scale
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.return_indices = bool(return_indices)
        self.force_quantization_f32 = bool(force_quantization_f32)
        self.preserve_symmetry = bool(preserve_symmetry)
        self.noise_dropout = float(noise_dropout)
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.orthogonal_rotation = bool(orthogonal_rotation)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.channel_first = self._layout == "first"
        self.channel_last = not self.channel_first  # get_output_from_indices' layout for fastvq's wrappers

        self.has_projections = self.dim != self.effective_codebook_dim
        self.project_in, self.project_out = _projections(self.dim, self.effective_codebook_dim, projection_has_bias)

        # Integer buffers, not saved (they follow from `levels`), as the peer's; .to(dtype) leaves them.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", scalar.mixed_radix_basis(levels), persistent=False)

        if self.orthogonal_rotation:
            self.register_buffer("orthogonal_rot", _random_rotation(levels))  # saved, as the peer's

    # ------------------------------------------------------------------------------------------
    # the quantizer: the formulas live in fastvq/quantizers/scalar.py

    def bound(self, z: Tensor, eps: float = _EPS, hard_clamp: bool = False) -> Tensor:
        """The paper's bound + straight-through round of (..., len(levels)) ``z``: codes in [-1, 1]."""
        return scalar.bound_and_level(z, self._levels, eps, hard_clamp)[0]

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """The symmetric quantizer of arXiv:2411.19842 for (..., len(levels)) ``z``: codes in [-1, 1]."""
        return scalar.symmetric_bound_and_level(z, self._levels, hard_clamp)[0]

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, level indices as floats), (..., d) each, under this module's bound."""
        if self.preserve_symmetry:
            return scalar.symmetric_bound_and_level(z, self._levels, self.bound_hard_clamp)
        return scalar.bound_and_level(z, self._levels, hard_clamp=self.bound_hard_clamp)

    def quantize(self, z: Tensor) -> Tensor:
        """Codes of (..., len(levels)) ``z`` already in the code space, with straight-through rounding."""
        return self._quantize(z)[0]

    def maybe_apply_noise(self, codes: Tensor) -> Tensor:
        """In training with ``noise_dropout > 0``: ``scalar.noise_dropout`` (the peer's draw)."""
        if not self.training or self.noise_dropout == 0.0:
            return codes
        return scalar.noise_dropout(codes, self.noise_dropout)

    def _moves_channels(self, ndim: int) -> bool:
        return self._layout == "first" or (self._layout == "auto" and ndim >= 4)

    def _rotate_back(self, codes: Tensor) -> Tensor:
        """Undo ``orthogonal_rotation`` on (..., d) codes (the identity without it)."""
        return codes @ self.orthogonal_rot.to(codes.dtype).t() if self.orthogonal_rotation else codes

    def forward(self, z: Tensor) -> FSQOutput:
        """Quantize ``z``: (B, ..., dim), or (B, dim, ...) for 4-D+ input / ``channel_first``.

        Returns:
            FSQOutput(quantized (z's shape), indices int32 (z's shape without the feature axis
            [, num_codebooks]) or None). Raises ValueError for a wrong feature size or rank.
        """
        check_float_tensor(z, "z", min_dim=2)
        moves = self._moves_channels(z.dim())
        z = self.project_in(to_channel_last(z, self.dim, not moves, self.accept_image_fmap))  # (B, ..., c * d)
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (B, ..., c, d)
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot.to(z.dtype)

        force_f32 = self.force_quantization_f32
        context = torch.autocast(z.device.type, enabled=False) if force_f32 else nullcontext()
        with context:
            orig_dtype = z.dtype
            if force_f32 and orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes, level = self._quantize(z)  # (B, ..., c, d) each
            indices = None
            if self.return_indices:
                indices = scalar.level_indices_to_indices(level, self._basis)  # (B, ..., c)
                if not self.keep_num_codebooks_dim:
                    indices = indices.squeeze(-1)
            codes = self._rotate_back(self.maybe_apply_noise(codes))
            codes = codes.flatten(-2).to(orig_dtype)  # (B, ..., c * d)

        out = self.project_out(codes)
        return FSQOutput(from_channel_last(out, not moves), indices)

    # ------------------------------------------------------------------------------------------
    # codes <-> indices

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """int32 index of each code: (..., len(levels)) grid codes (before rotation and
        ``project_out``, as ``quantize`` returns) -> ``zhat.shape[:-1]``. Off-grid values go to the
        nearest level per dimension (the peer rounds the weighted sum instead; equal on the grid).

        Raises:
            TypeError: non-float codes. ValueError: last axis not len(levels).
        """
        check_float_tensor(zhat, "codes")
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must be (..., {self.codebook_dim}), got shape {tuple(zhat.shape)}")
        k = scalar.codes_to_level_indices(zhat, self._levels, self.preserve_symmetry)
        return scalar.level_indices_to_indices(k, self._basis)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Per-dimension level indices: int64 (*indices.shape, len(levels)), k_i in [0, L_i)."""
        self._check_indices(indices)
        return scalar.indices_to_level_indices(indices, self._levels, self._basis)

    def indices_to_implicit_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Grid codes for indices, before rotation and ``project_out`` (fastvq's former
        ``indices_to_codes``): (*indices.shape, len(levels)) in ``dtype``, values in [-1, 1].

        Raises:
            TypeError: non-integer indices. ValueError: indices out of range (checked on CPU only).
        """
        k = self.indices_to_level_indices(indices)
        return scalar.level_indices_to_codes(k, self._levels, self.preserve_symmetry, dtype)

    def _decode(self, indices: Tensor) -> Tensor:
        """(..., dim) output-space codes for forward's indices, channel-last."""
        weight = getattr(self.project_out, "weight", None)
        codes = self.indices_to_implicit_codes(indices, torch.float32 if weight is None else weight.dtype)
        codes = self._rotate_back(codes)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)  # (..., c, d) -> (..., c * d)
        return self.project_out(codes)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """The quantized output for forward's indices, as the peer computes it: rotated back,
        projected out, and channel-first when the indices are those of a 4-D+ input
        (``indices.dim() >= 3`` plus one with ``keep_num_codebooks_dim``) or ``channel_first``.
        """
        codes = self._decode(indices)
        ndim = indices.dim() + 1 - int(self.keep_num_codebooks_dim)  # the input's rank
        return from_channel_last(codes, not self._moves_channels(ndim))

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Output for indices in fastvq's wrapper contract: channel-first when built channel-first
        (``channel_first``, ``channel_last=False``, ``accept_image_fmap``), else channel-last
        (for any rank; ``indices_to_codes`` applies the peer's rank rule instead)."""
        return from_channel_last(self._decode(indices), self.channel_last)

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, dim): every code in output space (rotated back, projected out).

        Raises:
            ValueError: ``num_codebooks > 1`` (an output vector is then a tuple of codes).
        """
        if self.num_codebooks > 1:
            raise ValueError(f"codebook needs num_codebooks == 1, got {self.num_codebooks}; use implicit_codebook")
        return self.project_out(self._rotate_back(self.implicit_codebook))

    @property
    def _code_device(self) -> torch.device:
        return self._basis.device

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_size={self.codebook_size}, preserve_symmetry={self.preserve_symmetry}, "
            f"noise_dropout={self.noise_dropout}, channel_first={self.channel_first}, layout={self._layout!r}"
        )
