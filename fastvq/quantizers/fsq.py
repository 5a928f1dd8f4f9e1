"""FSQ: Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``d = len(levels)`` features is squashed into a bounded interval and rounded to one of
``levels[i]`` values; the implicit codebook is the grid of all combinations, ``prod(levels)`` codes,
with no parameters, no codebook loss and no dead codes.

Bound (the paper's Appendix A.1), for a level count L, eps = 1e-3:

    half_l = (L - 1) (1 + eps) / 2,  offset = 0.5 if L is even else 0,  shift = atanh(offset / half_l)
    bounded = tanh(z + shift) half_l - offset          in (-L/2, L/2 - 1) for even L, |.| < L/2 for odd
    code = round(bounded) / (L // 2)                   in [-1, 1]   (round half up)

Odd L gives the symmetric integers {-(L-1)/2 .. (L-1)/2}; even L gives {-L/2 .. L/2 - 1} (one more
value below zero), which the offset makes reachable while ``shift`` keeps z = 0 on the code 0.
The paper's listing writes ``tan`` for the shift and ``(1 - eps)``; ``atanh`` is the exact inverse
(z = 0 maps to 0), and ``(1 + eps)`` keeps the shift finite for every L >= 3.

``preserve_symmetry=True`` uses the symmetric quantizer of Section 3.2 of arXiv:2411.19842
(L evenly spaced values from -1 to 1, no value at 0 for even L): the only mode in which L = 2 is
useful, since the default bound for L = 2 puts its shift at atanh(1 / 1.001) ~ 3.8, where tanh
is saturated and almost every input lands on one code.

Rounding has a straight-through gradient; everything else (tanh, the projections) is differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastvq.checks import check_float_tensor, compute_dtype, is_int, positive_int
from fastvq.quantizers.implicit import ImplicitCodebook
from fastvq.quantizers.layout import from_channel_last, projections, resolve_channel_last, to_channel_last
from fastvq.quantizers.output import QuantizerOutput

_EPS = 1e-3


class FSQ(ImplicitCodebook):
    """Finite Scalar Quantization.

    Args:
        levels: number of quantization levels per code dimension, each >= 3 (>= 2 with
            ``preserve_symmetry``); ``codebook_size = prod(levels)``.
        dim: feature size of the input. Default ``len(levels)``; any other value adds
            ``project_in`` (Linear dim -> len(levels)) and ``project_out`` (back).
        preserve_symmetry: L evenly spaced codes in [-1, 1] per dimension (see module docstring)
            instead of the paper's integer grid. Default False.
        channel_last: features on the last axis, (B, ..., dim). False: (B, dim, ...).
            Default: True, or False when ``accept_image_fmap``.
        accept_image_fmap: input is a (B, dim, H, W) feature map; indices are (B, H, W).

    Input ``z``: (B, ..., dim) float (fp16/bf16 are quantized in fp32 and returned in their dtype).
    Output: ``QuantizerOutput(quantized, indices, loss)``: quantized has z's shape and dtype,
    indices int64 in [0, codebook_size) with z's shape minus the feature axis, and loss a 0-d zero
    (float32, float64 for fp64 input): FSQ has no auxiliary loss, the field keeps the API uniform.

    Index of a code with per-dimension level indices k_i in [0, L_i): sum_i k_i prod_{j<i} L_j
    (dimension 0 varies fastest), as in vector-quantize-pytorch.

    Raises:
        ValueError: bad ``levels`` / ``dim`` or layout options (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        *,
        preserve_symmetry: bool = False,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise ValueError(f"levels must be a non-empty list of ints, got {levels!r}")
        min_level = 2 if preserve_symmetry else 3
        for level in levels:
            if not is_int(level) or level < 2:
                raise ValueError(f"levels must be ints >= 2, got {list(levels)!r}")
            if level < min_level:
                raise ValueError(
                    f"levels contains 2, got {list(levels)!r}: the default bound saturates tanh for 2 levels "
                    "(nearly every input gets one code); use preserve_symmetry=True or levels >= 3"
                )
        codebook_size = math.prod(levels)
        if codebook_size >= 2**63:
            raise ValueError(f"prod(levels) must fit an int64 index, got {codebook_size} for levels {list(levels)!r}")
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else positive_int(dim, "dim")

        self.levels = [int(level) for level in levels]
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.preserve_symmetry = bool(preserve_symmetry)
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)

        self.project_in, self.project_out = projections(dim, codebook_dim)

        # Integer buffers only (not saved: they follow from `levels`): .half() / .to(dtype) leave
        # them alone, and the float constants are derived from them in the compute dtype on use.
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("_basis", basis, persistent=False)

    def _grid(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(center, half_width), each (d,): a code is (k - center) / half_width for level index k."""
        lv = self._levels.to(dtype)
        if self.preserve_symmetry:
            return (lv - 1) / 2, (lv - 1) / 2
        half = torch.floor(lv / 2)
        return half, half

    # ------------------------------------------------------------------------------------------
    # the quantizer

    def _level_position(self, z: Tensor) -> Tensor:
        """Continuous position on the level axis, (..., d): rounding it gives the level index k."""
        lv = self._levels.to(z.dtype)
        if self.preserve_symmetry:
            return (lv - 1) * (torch.tanh(z) + 1) / 2
        half_l = (lv - 1) * (1 + _EPS) / 2
        offset = (self._levels % 2 == 0).to(z.dtype) / 2
        shift = torch.atanh(offset / half_l)
        bounded = torch.tanh(z + shift) * half_l - offset  # the paper's bound
        return bounded + torch.floor(lv / 2)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Quantize features already in the code space.

        Args:
            z: (..., len(levels)) float tensor (any float dtype; computed in fp32, fp64 for fp64).

        Returns:
            codes: (..., len(levels)) in the compute dtype, on the level grid, with a straight-through
                gradient for the rounding. level_indices: int64 (..., len(levels)), k_i in [0, L_i).
        """
        z = z.to(compute_dtype(z.dtype))
        position = self._level_position(z)
        # floor(x + 0.5): half-up rounding, the same rule in both modes; clamp guards the extreme
        # levels against rounding of tanh near +-1 (for the default bound only for huge L).
        k = torch.floor(position.detach() + 0.5).clamp_(min=0).minimum(self._levels.to(z.dtype) - 1)
        center, half_width = self._grid(z.dtype)
        # Straight-through: the value is exactly the grid point, the gradient that of `position`.
        codes = (k - center) / half_width + (position - position.detach()) / half_width
        return codes, k.long()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts. Returns QuantizerOutput."""
        check_float_tensor(z, "z", min_dim=2)
        in_dtype = z.dtype
        h = self.project_in(to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap))
        codes, k = self.quantize(h)  # (B, ..., d), (B, ..., d)
        indices = (k * self._basis).sum(dim=-1)  # (B, ...)
        out = self.project_out(codes.to(h.dtype)).to(in_dtype)
        loss = torch.zeros((), dtype=compute_dtype(in_dtype), device=z.device)
        return QuantizerOutput(from_channel_last(out, self.channel_last), indices, loss)

    # ------------------------------------------------------------------------------------------
    # codes <-> indices

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Index of each code.

        Args:
            codes: (..., len(levels)) float tensor of grid values (as ``quantize`` / ``indices_to_codes``
                return, before ``project_out``); off-grid values go to the nearest level.

        Returns:
            int64 tensor of shape ``codes.shape[:-1]``.

        Raises:
            TypeError: non-float codes. ValueError: last axis not len(levels).
        """
        check_float_tensor(codes, "codes")
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must be (..., {self.codebook_dim}), got shape {tuple(codes.shape)}")
        c = codes.to(compute_dtype(codes.dtype))
        center, half_width = self._grid(c.dtype)
        k = torch.round(c * half_width + center)
        k = k.clamp(min=0).minimum(self._levels.to(c.dtype) - 1).long()
        return (k * self._basis).sum(dim=-1)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Per-dimension level indices: int64 (*indices.shape, len(levels)), k_i in [0, L_i)."""
        self._check_indices(indices)
        return (indices.long().unsqueeze(-1) // self._basis) % self._levels

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Grid codes for indices, before ``project_out``.

        Args:
            indices: int64/int32 tensor, values in [0, codebook_size).
            dtype: float dtype of the result (default float32).

        Returns:
            (*indices.shape, len(levels)) in ``dtype``, values in [-1, 1].

        Raises:
            TypeError: non-integer indices. ValueError: indices out of range (checked on CPU only).
        """
        k = self.indices_to_level_indices(indices).to(dtype)
        center, half_width = self._grid(dtype)
        return (k - center) / half_width

    @property
    def _code_device(self) -> torch.device:
        return self._basis.device

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}, "
            f"preserve_symmetry={self.preserve_symmetry}, channel_last={self.channel_last}, "
            f"accept_image_fmap={self.accept_image_fmap}"
        )
