"""code_stats: per-code counts and sums (no gradient: EMA statistics and k-means)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.checks import check_float_tensor
from fastvq.functional.dispatch import implementation, resolve_backend


@torch.library.custom_op("fastvq::code_stats", mutates_args=())
def _code_stats_op(x: Tensor, idx: Tensor, num_codes: int, backend: str) -> tuple[Tensor, Tensor]:
    return implementation(backend).code_stats(x, idx, num_codes)


@_code_stats_op.register_fake
def _(x: Tensor, idx: Tensor, num_codes: int, backend: str) -> tuple[Tensor, Tensor]:
    return x.new_empty(num_codes, dtype=torch.float32), x.new_empty(num_codes, x.shape[1], dtype=torch.float32)


def code_stats(x: Tensor, idx: Tensor, num_codes: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-code counts and sums of the vectors assigned to each code (fp32 accumulation).

    Args:
        x: (..., D) float tensor. idx: int64 tensor of shape x.shape[:-1], values in [0, num_codes).
        num_codes: K >= 1.

    Returns:
        counts: (K,) float32; sums: (K, D) float32.

    Raises:
        TypeError: non-float x or non-int64 idx. ValueError: shape or device mismatch, K < 1.
    """
    check_float_tensor(x, "x")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if tuple(idx.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"idx shape {tuple(idx.shape)} must equal x.shape[:-1] = {tuple(x.shape[:-1])}")
    if idx.device != x.device:
        raise ValueError(f"x is on {x.device} but idx is on {idx.device}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    resolved = resolve_backend(backend, x)
    return _code_stats_op(x.reshape(-1, x.shape[-1]), idx.reshape(-1), num_codes, resolved)
