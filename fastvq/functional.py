"""fastvq's functional API: autograd, backend dispatch, and torch.library custom ops.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it without a graph break, and with its
autograd registered through ``register_autograd``. The backend is resolved here, in Python,
from the inputs' device and dtype (static under tracing) and passed to the op as a string:

    "torch"  -> fastvq.ops, the PyTorch path (any device).
    "triton" -> fastvq.kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
    "auto"   -> "triton" for CUDA tensors of fp32/fp16/bf16 when the kernels import, else "torch".
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastvq import kernels, ops
from fastvq._checks import check_codebook, check_finite_rows, check_float_tensor, check_weight
from fastvq.ops.search import accumulation_dtype

BACKENDS = ("auto", "triton", "torch")
METRICS = ("l2", "cosine")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """Turn "auto" | "triton" | "torch" into the backend that will run ("triton" or "torch").

    Raises:
        ValueError: unknown backend name.
        RuntimeError: "triton" asked for where it cannot run (no triton, CPU tensors without
            TRITON_INTERPRET=1, or fp64 inputs, which the kernels do not take).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in _KERNEL_DTYPES for t in tensors)
    if backend == "auto":
        return "triton" if (kernels.AVAILABLE and on_cuda and kernel_dtypes) else "torch"
    if not kernels.AVAILABLE:
        raise RuntimeError(f"backend='triton' is unavailable: {kernels.UNAVAILABLE_REASON}")
    if not kernel_dtypes:
        raise RuntimeError(
            f"backend='triton' takes float32/float16/bfloat16 inputs, got {[str(t.dtype) for t in tensors]}"
        )
    if not on_cuda and not kernels.interpreter_active():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; CPU tensors run the kernels only through the "
            "Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    return "triton"


def _impl(backend: str) -> ModuleType:
    return kernels if backend == "triton" else ops


# ---------------------------------------------------------------------------------------------
# nearest_code


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(x: Tensor, codebook: Tensor, metric: str, backend: str) -> tuple[Tensor, Tensor]:
    idx, dist = _impl(backend).nearest_code(x, codebook, metric)
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


# ---------------------------------------------------------------------------------------------
# vector_quantize: forward op, backward op, and the autograd glue between them


@torch.library.custom_op("fastvq::vector_quantize", mutates_args=())
def _vq_op(
    z: Tensor, codebook: Tensor, commitment_weight: float, codebook_weight: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    zq, idx, sqerr = _impl(backend).vq_fwd(z, codebook)
    check_finite_rows(sqerr, "z or codebook")
    loss = sqerr.sum() * ((commitment_weight + codebook_weight) / max(z.numel(), 1))
    return zq, idx, loss


@_vq_op.register_fake
def _(z: Tensor, codebook: Tensor, commitment_weight: float, codebook_weight: float, backend: str):
    n = z.shape[0]
    zq = codebook.new_empty(n, codebook.shape[1])
    return zq, z.new_empty(n, dtype=torch.int64), z.new_empty((), dtype=accumulation_dtype(z, codebook))


@torch.library.custom_op("fastvq::vector_quantize_backward", mutates_args=())
def _vq_backward_op(
    grad_zq: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebook: Tensor,
    idx: Tensor,
    commitment_weight: float,
    codebook_weight: float,
    needs_grad_codebook: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    grad_z, grad_codebook = _impl(backend).vq_bwd(
        grad_zq, grad_loss, z, codebook, idx, commitment_weight, codebook_weight, needs_grad_codebook
    )
    if grad_codebook is None:  # custom ops return tensors: an empty one stands for "no gradient"
        grad_codebook = codebook.new_empty(0)
    return grad_z, grad_codebook


@_vq_backward_op.register_fake
def _(grad_zq, grad_loss, z, codebook, idx, commitment_weight, codebook_weight, needs_grad_codebook, backend):
    grad_codebook = torch.empty_like(codebook) if needs_grad_codebook else codebook.new_empty(0)
    return torch.empty_like(z), grad_codebook


def _vq_setup_context(ctx, inputs, output) -> None:
    z, codebook, commitment_weight, codebook_weight, backend = inputs
    _, idx, _ = output
    ctx.save_for_backward(z, codebook, idx)
    ctx.weights = (commitment_weight, codebook_weight)
    ctx.backend = backend


def _vq_backward(ctx, grad_zq, grad_idx, grad_loss):
    z, codebook, idx = ctx.saved_tensors
    if grad_zq is None:
        grad_zq = torch.zeros(z.shape, dtype=codebook.dtype, device=z.device)
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=z.device)
    needs_grad_codebook = ctx.needs_input_grad[1]
    grad_z, grad_codebook = _vq_backward_op(
        grad_zq, grad_loss, z, codebook, idx, *ctx.weights, needs_grad_codebook, ctx.backend
    )
    return grad_z, (grad_codebook if needs_grad_codebook else None), None, None, None


_vq_op.register_autograd(_vq_backward, setup_context=_vq_setup_context)


def vector_quantize(
    z: Tensor,
    codebook: Tensor,
    commitment_weight: float = 0.25,
    codebook_weight: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``z`` to its nearest codes, with the VQ-VAE codebook and commitment losses.

    Forward: ``zq == codebook[idx]`` bitwise, and
        loss = codebook_weight * mean((sg(z) - e)^2) + commitment_weight * mean((z - sg(e))^2)
    (the means run over all elements of z; e = zq). Backward: zq's gradient reaches z unchanged
    (straight-through); the commitment term adds to z's gradient and the codebook term is the
    codebook's only gradient, scattered onto the chosen rows (no one-hot matrix).

    Args:
        z: (..., D) float tensor.
        codebook: (K, D) float tensor on z's device (a Parameter to train it by gradient).
        commitment_weight: beta of the VQ-VAE paper, >= 0.
        codebook_weight: weight of the codebook term, >= 0 (0 for EMA-updated codebooks).
        backend: "auto" | "triton" | "torch".

    Returns:
        zq: z.shape, in codebook.dtype. idx: int64, z.shape[:-1].
        loss: 0-d float32 (float64 for fp64 inputs).

    Raises:
        TypeError / ValueError / RuntimeError as ``nearest_code``; ValueError for negative or
        non-finite weights.
    """
    check_float_tensor(z, "z")
    check_codebook(codebook, z, "z")
    commitment_weight = check_weight(commitment_weight, "commitment_weight")
    codebook_weight = check_weight(codebook_weight, "codebook_weight")
    resolved = resolve_backend(backend, z, codebook)
    d = z.shape[-1]
    zq, idx, loss = _vq_op(z.reshape(-1, d), codebook, commitment_weight, codebook_weight, resolved)
    return zq.reshape(z.shape), idx.reshape(z.shape[:-1]), loss


# ---------------------------------------------------------------------------------------------
# code_stats (no gradient: EMA statistics and k-means)


@torch.library.custom_op("fastvq::code_stats", mutates_args=())
def _code_stats_op(x: Tensor, idx: Tensor, num_codes: int, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).code_stats(x, idx, num_codes)


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
