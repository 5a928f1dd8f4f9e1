"""nearest_code: the custom op (with its fake implementation) and the public function."""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.checks import check_codebook, check_finite_rows, check_float_tensor
from fastvq.functional.dispatch import METRICS, implementation, resolve_backend
from fastvq.reference.search import accumulation_dtype


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(x: Tensor, codebook: Tensor, metric: str, backend: str) -> tuple[Tensor, Tensor]:
    idx, dist = implementation(backend).nearest_code(x, codebook, metric)
    check_finite_rows(dist, "x or codebook")
    return idx, dist


@_nearest_code_op.register_fake
def _(x: Tensor, codebook: Tensor, metric: str, backend: str) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=accumulation_dtype(x, codebook))


def nearest_code(x: Tensor, codebook: Tensor, metric: str = "l2", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Nearest codebook entry for every vector of ``x``.

    Args:
        x: (..., D) float tensor (fp32, fp16, bf16 or fp64); any strides.
        codebook: (K, D) float tensor on the same device, K >= 1.
        metric: "l2" (squared euclidean distance) or "cosine" (1 - cosine similarity).
        backend: "auto" | "triton" | "torch" (see module docstring).

    Returns:
        idx: int64, shape ``x.shape[:-1]``; exact ties go to the lowest index (torch.argmin).
        dist: float32, shape ``x.shape[:-1]``: the distance to the chosen code, computed from the
            difference, not from the expanded dot product (fp64 inputs are computed in fp64).
            Both outputs carry no gradient: use ``vector_quantize`` for a differentiable loss.

    Raises:
        TypeError: non-tensor or non-float inputs.
        ValueError: bad shapes (D mismatch, codebook not 2-D or empty), device mismatch, unknown
            metric/backend, or NaN/Inf reaching a distance (checked on CPU only).
        RuntimeError: backend="triton" where the kernels cannot run.
    """
    check_float_tensor(x, "x")
    check_codebook(codebook, x, "x")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    resolved = resolve_backend(backend, x, codebook)
    lead = x.shape[:-1]
    idx, dist = _nearest_code_op(x.reshape(-1, x.shape[-1]), codebook, metric, resolved)
    return idx.reshape(lead), dist.detach().to(torch.float32).reshape(lead)
