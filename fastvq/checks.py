"""Argument checks shared by the functional API and the modules: clear errors, early."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(t: object, name: str, min_dim: int = 1) -> Tensor:
    """Raise TypeError/ValueError unless ``t`` is a floating tensor of rank >= ``min_dim``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16 or float64), got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_codebook(codebook: object, x: Tensor, x_name: str = "x") -> Tensor:
    """Raise unless ``codebook`` is a non-empty (K, D) float tensor matching ``x``'s D and device."""
    check_float_tensor(codebook, "codebook")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook is empty: shape {tuple(codebook.shape)} has K = 0 codes")
    if codebook.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{x_name}'s last dimension must equal the codebook dimension D = {codebook.shape[1]}; "
            f"got {x_name} shape {tuple(x.shape)} and codebook shape {tuple(codebook.shape)}"
        )
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook dimension D must be >= 1, got shape {tuple(codebook.shape)}")
    if codebook.device != x.device:
        raise ValueError(f"{x_name} is on {x.device} but codebook is on {codebook.device}; move them to one device")
    return codebook


def is_int(value: object) -> bool:
    """True for a Python int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(value: object, name: str, low: int) -> int:
    """``value`` if it is an int >= ``low``.

    Raises:
        ValueError: "{name} must be an int >= {low}, got {value!r}" (bools and floats included).
    """
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (a size, a count of codes, heads or stages).

    Raises:
        ValueError: "{name} must be a positive int, got {value!r}" (bools and floats included).
    """
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def nonnegative_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 0 (an iteration count, a start index).

    Raises:
        ValueError: "{name} must be an int >= 0, got {value!r}" (bools and floats included).
    """
    return int_at_least(value, name, 0)


def check_weight(value: object, name: str) -> float:
    """A finite, non-negative loss weight as a Python float."""
    if not (is_int(value) or isinstance(value, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def positive_float(value: object, name: str) -> float:
    """``value`` as a Python float if it is a finite int or float > 0 (a scale, a temperature).

    Raises:
        ValueError: "{name} must be a finite float > 0, got {value!r}" (bools included).
    """
    if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_finite_rows(per_row: Tensor, what: str) -> None:
    """Raise ValueError if a per-row result is NaN/Inf (a non-finite input reached it).

    Checked only on CPU tensors: there it costs one pass over N values; on CUDA it would force
    a host synchronisation on every call, so it is skipped.
    """
    if per_row.device.type != "cpu" or per_row.numel() == 0:
        return
    finite = torch.isfinite(per_row)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"non-finite values (NaN or Inf) in {what}: row {row} of the flattened input "
            f"(or the code it was matched to) gives distance {per_row[row].item()}"
        )


def check_indices(indices: object, num_codes: int, name: str = "indices", low: int = 0) -> Tensor:
    """Raise unless ``indices`` is an int64/int32 tensor with values in [low, num_codes).

    The range is checked on CPU tensors only: on CUDA it would be a host synchronisation.
    """
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        got = getattr(indices, "dtype", type(indices).__name__)
        raise TypeError(f"{name} must be an int64/int32 tensor, got {got}")
    if indices.device.type == "cpu" and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < low or hi >= num_codes:
            raise ValueError(f"{name} must lie in [{low}, {num_codes}), got values in [{lo}, {hi}]")
    return indices


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 data, fp64 for fp64: the precision elementwise maths runs in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
