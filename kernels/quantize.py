"""Vector quantization with the VQ-VAE losses: fused forward and one-pass backward.

Forward (``vq_fwd``). The search kernel of kernels/search.py with WRITE_ZQ: after the running
argmin, the same program gathers each row's code, stores it to zq unchanged (zq == codebook[idx]
bitwise, in codebook.dtype) and writes sqerr = ||z - e||^2 in fp32 from the difference.

Backward (``vq_bwd``), as fastvq.reference.vq_bwd, with g = grad_loss read inside the kernel (no host
sync) and numel = N * D:
    grad_z        = grad_zq + commitment_weight * (g * 2 / numel) * (z - e)
    grad_codebook = scatter over idx of codebook_weight * (g * 2 / numel) * (e - z), fp32 sums.
One kernel reads each (z, e, grad_zq) row once and writes grad_z; with ``needs_grad_codebook``
it visits the rows in sorted-index order and also produces the codebook gradient by the
deterministic segmented reduction of kernels/_segment.py (why not atomics: see there), finished
by one small kernel for segments that cross chunk boundaries. Without it, rows are visited in
order and nothing is sorted.

Limits: K < 2^31; offsets are int64 throughout. Indices outside [0, K) raise on CPU; on CUDA
they are masked (no out-of-bounds access): such rows get grad_z = grad_zq and add nothing.

Verified under TRITON_INTERPRET=1 on CPU only, and compiled for sm_80/sm_90 with triton's ptxas
(kernels/_compile_check.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_devices, check_index, check_index_range, check_matrix, check_out
from ._segment import finish_segments, segment_blocks, segment_store, sort_index, sorted_chunk, use_seg_dot
from .search import check_search_inputs, search


@triton.jit
def _vq_bwd_kernel(
    grad_zq_ptr, grad_loss_ptr, z_ptr, c_ptr, sidx_ptr, perm_ptr, grad_z_ptr, grad_c_ptr, head_ptr, tail_ptr,
    N, K, D,
    stride_gn, stride_gd, stride_zn, stride_zd, stride_ck, stride_cd, stride_on, stride_od, stride_pk, stride_pd,
    two_over_numel, commitment_weight, codebook_weight,
    SCATTER: tl.constexpr, SEG_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # sidx_ptr: sorted idx when SCATTER (perm_ptr: the row of each sorted position), else idx itself.
    chunk = tl.program_id(0).to(tl.int64)  # int64 before it multiplies a stride
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # [BLOCK_D]
    dmask = d < D
    if SCATTER:
        pos, pmask, code, start, end, began = sorted_chunk(sidx_ptr, N, chunk, BLOCK_R)
        rows = tl.load(perm_ptr + pos, mask=pmask, other=0)  # [BLOCK_R] original row of each position
    else:
        rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R]
        pmask = rows < N
        code = tl.load(sidx_ptr + rows, mask=pmask, other=0)
    m = pmask[:, None] & dmask[None, :]  # [BLOCK_R, BLOCK_D]
    em = m & ((code >= 0) & (code < K))[:, None]  # out-of-range codes read nothing
    z = tl.load(z_ptr + rows[:, None] * stride_zn + d[None, :] * stride_zd, mask=em, other=0.0).to(tl.float32)
    e = tl.load(c_ptr + code[:, None] * stride_ck + d[None, :] * stride_cd, mask=em, other=0.0).to(tl.float32)
    diff = z - e  # [BLOCK_R, BLOCK_D] z - e in fp32
    # Same rounding order as fastvq.reference.vq_bwd: g = grad_loss * (2 / numel), then weight * g.
    g = tl.load(grad_loss_ptr).to(tl.float32) * two_over_numel
    gzq = tl.load(grad_zq_ptr + rows[:, None] * stride_gn + d[None, :] * stride_gd, mask=m, other=0.0)
    grad_z = gzq.to(tl.float32) + (commitment_weight * g) * diff
    tl.store(grad_z_ptr + rows[:, None] * stride_on + d[None, :] * stride_od,
             grad_z.to(grad_z_ptr.dtype.element_ty), mask=m)  # fmt: skip
    if SCATTER:
        segment_store(-diff, code, pmask, start, end, began, chunk, d, dmask, codebook_weight * g,
                      grad_c_ptr, head_ptr, tail_ptr, K, D, stride_pk, stride_pd, SEG_DOT, BLOCK_R)  # fmt: skip


def vq_fwd(
    z: Tensor,
    codebook: Tensor,
    *,
    precision: str | None = None,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize rows of ``z`` to their nearest (l2) codes (``fastvq.reference.vq_fwd``).

    Args:
        z: (N, D) float32/float16/bfloat16, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        codebook: (K, D) float32/float16/bfloat16 on the same device, K >= 1.
        precision: "ieee" | "tf32" | "tf32x3" for fp32 dots, None for search.DEFAULT_PRECISION.
        out: optional contiguous (zq, idx, sqerr) buffers: (N, D) codebook.dtype, (N,) int64, (N,) float32.

    Returns:
        zq: (N, D) in codebook.dtype, bitwise equal to codebook[idx].
        idx: (N,) int64 nearest-code indices (lowest index on exact ties).
        sqerr: (N,) float32, ||z_i - codebook[idx_i]||^2 from the difference.

    Raises:
        TypeError / ValueError / RuntimeError as ``fastvq.kernels.nearest_code``.
    """
    device = check_search_inputs(z, codebook, "z")
    n, d = z.shape
    if out is None:
        zq = torch.empty(n, d, dtype=codebook.dtype, device=device)
        idx = torch.empty(n, dtype=torch.int64, device=device)
        sqerr = torch.empty(n, dtype=torch.float32, device=device)
    else:
        zq = check_out(out[0], "out[0] (zq)", (n, d), codebook.dtype, device)
        idx = check_out(out[1], "out[1] (idx)", (n,), torch.int64, device)
        sqerr = check_out(out[2], "out[2] (sqerr)", (n,), torch.float32, device)
    search(z, codebook, "l2", precision, idx, sqerr, zq)
    return zq, idx, sqerr


def vq_bwd(
    grad_zq: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebook: Tensor,
    idx: Tensor,
    commitment_weight: float,
    codebook_weight: float,
    needs_grad_codebook: bool = True,
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of (zq, loss) from ``vq_fwd`` to z and to the codebook (``fastvq.reference.vq_bwd``).

    Args:
        grad_zq: (N, D) float32/float16/bfloat16 gradient of zq, any strides.
        grad_loss: 0-d float tensor, gradient of the scalar loss, read on the device.
        z: (N, D) and codebook: (K, D), the forward's inputs; idx: (N,) int64, its indices.
        commitment_weight, codebook_weight: the loss weights used in forward.
        needs_grad_codebook: False skips the sort and the scatter (grad_codebook is None).
        out: optional contiguous (N, D) buffer of z.dtype for grad_z.

    Returns:
        grad_z: (N, D) in z.dtype; grad_codebook: (K, D) in codebook.dtype (zeros for unused
        codes), or None.

    Raises:
        TypeError: non-tensor inputs or unsupported dtypes. ValueError: shape or device mismatch,
        indices outside [0, K) (checked on CPU). RuntimeError: CPU tensors without the interpreter.
    """
    check_matrix(z, "z")
    check_matrix(codebook, "codebook")
    check_matrix(grad_zq, "grad_zq")
    n, d = z.shape
    k = codebook.shape[0]
    if codebook.shape[1] != d or tuple(grad_zq.shape) != (n, d):
        raise ValueError(
            f"z (N, D), grad_zq (N, D) and codebook (K, D) must agree, got z {tuple(z.shape)}, "
            f"grad_zq {tuple(grad_zq.shape)}, codebook {tuple(codebook.shape)}"
        )
    if not isinstance(grad_loss, Tensor) or grad_loss.dim() != 0 or not grad_loss.is_floating_point():
        got = type(grad_loss).__name__
        if isinstance(grad_loss, Tensor):
            got = f"{grad_loss.dtype} of shape {tuple(grad_loss.shape)}"
        raise TypeError(f"grad_loss must be a 0-d float tensor, got {got}")
    check_index(idx, "idx", n)
    device = check_devices(z=z, codebook=codebook, grad_zq=grad_zq, grad_loss=grad_loss, idx=idx)
    check_index_range(idx, "idx", k)
    if out is None:
        grad_z = torch.empty(n, d, dtype=z.dtype, device=device)
    else:
        grad_z = check_out(out, "out (grad_z)", (n, d), z.dtype, device)
    grad_codebook = torch.zeros(k, d, dtype=codebook.dtype, device=device) if needs_grad_codebook else None
    if n == 0:
        return grad_z, grad_codebook

    block_r, block_d, num_warps = segment_blocks(d)
    num_chunks = triton.cdiv(n, block_r)
    if needs_grad_codebook:
        sidx, perm = sort_index(idx)
        head = torch.empty(num_chunks, d, dtype=torch.float32, device=device)
        tail = torch.empty(num_chunks, d, dtype=torch.float32, device=device)
        gc_arg, gc_strides = grad_codebook, grad_codebook.stride()
    else:
        sidx, perm, head, tail = idx, idx, grad_z, grad_z  # unused pointers when SCATTER is False
        gc_arg, gc_strides = grad_z, (0, 0)
    two_over_numel = 2.0 / max(n * d, 1)
    _vq_bwd_kernel[(num_chunks, triton.cdiv(d, block_d))](
        grad_zq, grad_loss, z, codebook, sidx, perm, grad_z, gc_arg, head, tail,
        n, k, d,
        grad_zq.stride(0), grad_zq.stride(1), z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        grad_z.stride(0), grad_z.stride(1), gc_strides[0], gc_strides[1],
        two_over_numel, float(commitment_weight), float(codebook_weight),
        SCATTER=needs_grad_codebook, SEG_DOT=use_seg_dot(), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    if needs_grad_codebook:
        finish_segments(
            sidx, head, tail, grad_codebook, block_r, block_d,
            grad_loss=grad_loss, scale_a=two_over_numel, scale_b=float(codebook_weight),
        )  # fmt: skip
    return grad_z, grad_codebook
