"""Helpers shared by the kernel launchers: argument checks, size buckets, device limits.

Nothing here imports triton at module level: ``fastvq.kernels`` must import (as a stub) where
triton is missing, and it takes ``interpreter_active`` from here.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shared memory per block on the smallest GPU the configs target (sm_86/sm_89: 99 KiB opt-in);
# used when the device cannot be asked (the interpreter, or an old torch).
_FALLBACK_SHARED_BYTES = 99 * 1024


def interpreter_active() -> bool:
    """True when TRITON_INTERPRET=1 is set: Triton then runs kernels on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def size_bucket(n: int) -> int:
    """Autotune key for a size: its next power of two, so a new batch size does not re-tune."""
    return next_pow2(max(int(n), 1))


def max_shared_bytes(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` (bytes), for pruning autotune configs."""
    if device.type != "cuda":
        return _FALLBACK_SHARED_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", _FALLBACK_SHARED_BYTES))


def check_matrix(t: object, name: str, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> Tensor:
    """Raise TypeError/ValueError unless ``t`` is a 2-D tensor of one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def check_index(idx: object, name: str, n: int) -> Tensor:
    """Raise unless ``idx`` is an int64 tensor of shape (n,)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {idx.dtype}")
    if tuple(idx.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(idx.shape)}")
    return idx


def check_index_range(idx: Tensor, name: str, num_codes: int) -> None:
    """Raise ValueError for indices outside [0, num_codes), on CPU tensors only.

    On CUDA the check would cost a host synchronisation; there the kernels mask out-of-range
    indices instead (no out-of-bounds access; such rows contribute nothing).
    """
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"{name} must lie in [0, {num_codes}), got values in [{lo}, {hi}]")


def check_devices(**tensors: Tensor) -> torch.device:
    """Raise unless all tensors share one device on which the kernels can run; return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{first_name} is on {first.device} but {name} is on {t.device}")
    if first.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, got {first_name} on {first.device} "
            "(CPU tensors run only under TRITON_INTERPRET=1, set before triton is imported)"
        )
    return first.device


def check_out(out: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Raise unless a caller-provided output buffer is contiguous with the given shape and dtype."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {out.stride()}")
    return out
