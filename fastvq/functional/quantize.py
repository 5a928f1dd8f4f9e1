"""vector_quantize: forward op, backward op, and the autograd glue between them (custom ops)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastvq.checks import check_codebook, check_finite_rows, check_float_tensor, check_weight
from fastvq.functional.dispatch import implementation, resolve_backend
from fastvq.reference.search import accumulation_dtype


@torch.library.custom_op("fastvq::vector_quantize", mutates_args=())
def _vq_op(
    z: Tensor, codebook: Tensor, commitment_weight: float, codebook_weight: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    zq, idx, sqerr = implementation(backend).vq_fwd(z, codebook)
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
    grad_z, grad_codebook = implementation(backend).vq_bwd(
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
