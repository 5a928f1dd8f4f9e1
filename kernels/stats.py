"""Per-code assignment statistics: counts and sums of the rows assigned to each code.

What it computes, as fastvq.reference.code_stats: counts[k] = #{i : idx_i = k} and
sums[k] = sum_{i : idx_i = k} x_i, both fp32 (fp32 accumulation whatever x's dtype). These are
the sufficient statistics of EMA codebooks and k-means.

How. The rows are visited in sorted-index order and reduced by the deterministic segmented scan
of kernels/_segment.py (no atomics: bitwise reproducible, and no contention when a few codes take
most rows); the D-block-0 programs also count rows per code with the same pieces. Codes no row
picked keep the zeros the launcher allocates.

Limits: K < 2^31; counts are exact up to 2^24 rows per code (fp32, as the PyTorch path). Indices
outside [0, K) raise on CPU; on CUDA they are masked (they neither read nor write).

Verified under TRITON_INTERPRET=1 on CPU only, and compiled for sm_80/sm_90 with triton's ptxas
(kernels/_compile_check.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_devices, check_index, check_index_range, check_matrix
from ._segment import (
    finish_segments,
    segment_blocks,
    segment_count_store,
    segment_store,
    sort_index,
    sorted_chunk,
    use_seg_dot,
)


@triton.jit
def _code_stats_fwd_kernel(
    x_ptr, sidx_ptr, perm_ptr, sums_ptr, head_ptr, tail_ptr, cnt_ptr, head_cnt_ptr, tail_cnt_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_sk, stride_sd,
    SEG_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0).to(tl.int64)  # int64 before it multiplies a stride
    pid_d = tl.program_id(1)
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # [BLOCK_D]
    dmask = d < D
    pos, pmask, code, start, end, began = sorted_chunk(sidx_ptr, N, chunk, BLOCK_R)
    rows = tl.load(perm_ptr + pos, mask=pmask, other=0)  # [BLOCK_R] original row of each position
    m = (pmask & (code >= 0) & (code < K))[:, None] & dmask[None, :]  # out-of-range codes read nothing
    x = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd, mask=m, other=0.0)  # [BLOCK_R, BLOCK_D]
    segment_store(x.to(tl.float32), code, pmask, start, end, began, chunk, d, dmask, 1.0,
                  sums_ptr, head_ptr, tail_ptr, K, D, stride_sk, stride_sd, SEG_DOT, BLOCK_R)  # fmt: skip
    if pid_d == 0:
        segment_count_store(code, pmask, start, end, began, chunk, cnt_ptr, head_cnt_ptr, tail_cnt_ptr, K,
                            SEG_DOT, BLOCK_R)  # fmt: skip


def code_stats(x: Tensor, idx: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Count and sum the rows assigned to each code (``fastvq.reference.code_stats``).

    Args:
        x: (N, D) float32/float16/bfloat16, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        idx: (N,) int64 code indices in [0, num_codes), same device.
        num_codes: K >= 1.

    Returns:
        counts: (K,) float32 rows per code; sums: (K, D) float32 sums of those rows.

    Raises:
        TypeError: bad dtypes. ValueError: bad shapes, K < 1, device mismatch, indices outside
        [0, K) (checked on CPU). RuntimeError: CPU tensors without the interpreter.
    """
    check_matrix(x, "x")
    n, d = x.shape
    check_index(idx, "idx", n)
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    device = check_devices(x=x, idx=idx)
    check_index_range(idx, "idx", num_codes)
    counts = torch.zeros(num_codes, dtype=torch.float32, device=device)
    sums = torch.zeros(num_codes, d, dtype=torch.float32, device=device)
    if n == 0 or d == 0:
        return counts, sums

    block_r, block_d, num_warps = segment_blocks(d)
    num_chunks = triton.cdiv(n, block_r)
    sidx, perm = sort_index(idx)
    head = torch.empty(num_chunks, d, dtype=torch.float32, device=device)
    tail = torch.empty(num_chunks, d, dtype=torch.float32, device=device)
    head_cnt = torch.empty(num_chunks, dtype=torch.float32, device=device)
    tail_cnt = torch.empty(num_chunks, dtype=torch.float32, device=device)
    _code_stats_fwd_kernel[(num_chunks, triton.cdiv(d, block_d))](
        x, sidx, perm, sums, head, tail, counts, head_cnt, tail_cnt,
        n, num_codes, d, x.stride(0), x.stride(1), sums.stride(0), sums.stride(1),
        SEG_DOT=use_seg_dot(), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    finish_segments(sidx, head, tail, sums, block_r, block_d, counts=(head_cnt, tail_cnt, counts))
    return counts, sums
