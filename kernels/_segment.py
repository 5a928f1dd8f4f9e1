"""Deterministic scatter-add over sorted indices: the codebook gradient and the code statistics.

What it computes. out[k] = scale * sum_{i : idx_i = k} v_i for rows v_i (N, D), fp32 accumulation,
where the caller's kernel computes v_i (kernels/quantize.py: e - z; kernels/stats.py: x).

Why sorting and not atomics. Atomics contend on popular codes (a collapsing codebook sends most
rows to a few codes, serialising their additions in L2) and add in a different order on every
run. Here idx is sorted once (torch.sort, stable) and the sorted rows are cut into chunks of
BLOCK_R consecutive positions. Each chunk program reduces its rows with a segmented scan along
the rows (tl.associative_scan, reset at every segment start) and writes:
    - a segment that starts and ends inside the chunk: its final value, straight into out[k];
    - the piece of a segment that started in an earlier chunk: into head[chunk];
    - the piece of a segment that continues into the next chunk: into tail[chunk].
A second, tiny kernel (``_segment_finish_kernel``) lets the chunk where a crossing segment starts
add the heads of the following chunks to its tail and write out[k]. Every output row is written by
exactly one program in a fixed order: the result is bitwise reproducible, with no atomics and no
reset_to_zero. The cost of the worst case (all N rows on one code) is N / BLOCK_R head reads by
one program in the second kernel, instead of N serialised atomics. Codes no row picked keep the
zeros the launcher allocated (torch.zeros).

Indices outside [0, K) (rejected by the launchers on CPU; not checked on CUDA, which would cost a
host sync) are masked: they read nothing and write nothing.

Blocks. BLOCK_R = 64 sorted rows by BLOCK_D <= 64 columns per program, 4 warps; not autotuned:
the kernels are memory-bound, and BLOCK_R fixes the size of the head/tail buffers the launcher
allocates and the chunking the second kernel walks, so it cannot change per launch.

Under the interpreter the segmented scan is computed as a 0/1 matrix product (``SEG_DOT``; the
interpreter's tl.associative_scan calls its combine function once per element, ~100x slower);
tests also run the scan formulation, at tiny sizes, and check the combine function's
associativity, which a sequential interpreter scan cannot reveal.

Verified under TRITON_INTERPRET=1 on CPU only, and compiled for sm_80/sm_90 with triton's ptxas
(kernels/_compile_check.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreter_active, next_pow2

# How chunk programs compute segmented sums: None picks "dot" under the interpreter and "scan"
# on a GPU; tests set "scan" to run the GPU formulation through the interpreter at tiny sizes.
SCAN_IMPL: str | None = None


def use_seg_dot() -> bool:
    """The SEG_DOT meta-parameter of the chunk kernels (see ``segmented_cumsum``)."""
    impl = SCAN_IMPL if SCAN_IMPL is not None else ("dot" if interpreter_active() else "scan")
    if impl not in ("dot", "scan"):
        raise ValueError(f"SCAN_IMPL must be 'dot', 'scan' or None, got {impl!r}")
    return impl == "dot"


def segment_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for the chunk kernels of a D-wide scatter."""
    if interpreter_active():  # wider D blocks: fewer programs, each a few numpy calls
        return 64, max(16, min(next_pow2(d), 128)), 4
    block_d = max(16, min(next_pow2(d), 64))
    return 64, block_d, 4


@triton.jit
def _segsum_combine(v1, f1, v2, f2):
    # (v, f): sum since the latest segment start, and "a segment starts in this range".
    return tl.where(f2 != 0, v2, v1 + v2), f1 | f2


@triton.jit
def segmented_cumsum(v, flags, SEG_DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Inclusive prefix sums of v along axis 0, restarting where flags [BLOCK_R] is 1.

    v: [BLOCK_R] or [BLOCK_R, BLOCK_D] fp32. SEG_DOT=False: tl.associative_scan (the GPU path:
    log2(BLOCK_R) steps). SEG_DOT=True: the same sums as (same-piece, lower-triangular 0/1 matrix)
    @ v, exact in fp32; the interpreter runs it as one numpy matmul, where its scan would call
    the combine function once per element (~100x slower).
    """
    if SEG_DOT:
        j = tl.arange(0, BLOCK_R)
        piece = tl.cumsum(flags, axis=0)  # [BLOCK_R] piece number of every row
        same = (piece[:, None] == piece[None, :]) & (j[None, :] <= j[:, None])  # [BLOCK_R(out), BLOCK_R(in)]
        if len(v.shape) == 1:
            sums = tl.sum(tl.where(same, v[None, :], 0.0), axis=1)
        else:
            sums = tl.dot(same.to(tl.float32), v, input_precision="ieee")
    else:
        if len(v.shape) == 1:
            sums, _ = tl.associative_scan((v, flags), 0, _segsum_combine)
        else:
            sums, _ = tl.associative_scan((v, tl.broadcast_to(flags[:, None], v.shape)), 0, _segsum_combine)
    return sums


@triton.jit
def sorted_chunk(sidx_ptr, N, chunk, BLOCK_R: tl.constexpr):
    """Positions, codes and segment flags of one chunk of the sorted index list.

    Returns pos [BLOCK_R] int64, pmask, code [BLOCK_R] int64, start (a segment begins at pos),
    end (a segment ends at pos), and began (the piece holding pos began at a segment start in this
    chunk, rather than continuing one from an earlier chunk).
    """
    j = tl.arange(0, BLOCK_R)
    pos = chunk * BLOCK_R + j.to(tl.int64)  # [BLOCK_R]
    pmask = pos < N
    code = tl.load(sidx_ptr + pos, mask=pmask, other=0)
    prev = tl.load(sidx_ptr + pos - 1, mask=pmask & (pos > 0), other=0)
    nxt = tl.load(sidx_ptr + pos + 1, mask=(pos + 1) < N, other=0)
    start = pmask & ((pos == 0) | (code != prev))
    end = pmask & (((pos + 1) >= N) | (code != nxt))
    began = tl.cumsum(start.to(tl.int32), axis=0) > 0
    return pos, pmask, code, start, end, began


@triton.jit
def segment_store(
    v, code, pmask, start, end, began, chunk, d, dmask, scale,
    out_ptr, head_ptr, tail_ptr,
    K, D, stride_ok, stride_od,
    SEG_DOT: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Segmented sums of v [BLOCK_R, BLOCK_D] (rows in sorted order) -> out / head / tail."""
    j = tl.arange(0, BLOCK_R)
    flags = (start | (j == 0)).to(tl.int32)  # a piece begins at a segment start or the chunk start
    sums = segmented_cumsum(v, flags, SEG_DOT, BLOCK_R)  # [BLOCK_R, BLOCK_D]
    piece_end = pmask & (end | (j == BLOCK_R - 1))
    valid = (code >= 0) & (code < K)
    done = piece_end & began & end & valid  # whole segment inside the chunk: final value
    o_ptrs = out_ptr + code[:, None] * stride_ok + d[None, :] * stride_od
    tl.store(o_ptrs, (sums * scale).to(out_ptr.dtype.element_ty), mask=done[:, None] & dmask[None, :])
    # At most one row of each kind per chunk; every row points at the chunk's buffer row.
    buf = chunk * D + d[None, :] + 0 * j[:, None]  # [BLOCK_R, BLOCK_D]
    head = piece_end & (began == 0)
    tl.store(head_ptr + buf, sums, mask=head[:, None] & dmask[None, :])
    tail = piece_end & began & (end == 0)
    tl.store(tail_ptr + buf, sums, mask=tail[:, None] & dmask[None, :])


@triton.jit
def segment_count_store(
    code, pmask, start, end, began, chunk,
    cnt_ptr, head_cnt_ptr, tail_cnt_ptr, K,
    SEG_DOT: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Rows per code, with the same pieces as ``segment_store`` (fp32 counts)."""
    j = tl.arange(0, BLOCK_R)
    flags = (start | (j == 0)).to(tl.int32)
    counts = segmented_cumsum(pmask.to(tl.float32), flags, SEG_DOT, BLOCK_R)  # [BLOCK_R]
    piece_end = pmask & (end | (j == BLOCK_R - 1))
    valid = (code >= 0) & (code < K)
    tl.store(cnt_ptr + code, counts, mask=piece_end & began & end & valid)
    buf = chunk + 0 * j
    tl.store(head_cnt_ptr + buf, counts, mask=piece_end & (began == 0))
    tl.store(tail_cnt_ptr + buf, counts, mask=piece_end & began & (end == 0))


@triton.jit
def _segment_finish_kernel(
    sidx_ptr, head_ptr, tail_ptr, out_ptr, grad_loss_ptr, head_cnt_ptr, tail_cnt_ptr, cnt_ptr,
    N, K, D,
    stride_ok, stride_od,
    scale_a, scale_b,
    HAS_GRAD_LOSS: tl.constexpr, HAS_COUNTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Complete the segments that cross chunk boundaries: tail[p] + head[p+1] + ... -> out[k]."""
    chunk = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    first = chunk * BLOCK_R
    last = tl.minimum(first + BLOCK_R, N) - 1
    code = tl.load(sidx_ptr + last)
    has_next = (last + 1) < N
    nxt = tl.load(sidx_ptr + last + 1, mask=has_next, other=0)
    before = tl.load(sidx_ptr + first - 1, mask=first > 0, other=0)
    # This chunk wrote tail[chunk] iff its last segment continues and began inside the chunk.
    owns = has_next & (nxt == code) & ((first == 0) | (before != code))
    if owns:
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = d < D
        acc = tl.load(tail_ptr + chunk * D + d, mask=dmask, other=0.0)  # [BLOCK_D]
        cnt = 0.0
        if HAS_COUNTS:
            cnt = tl.load(tail_cnt_ptr + chunk)
        q = chunk + 1
        go = owns
        while go:
            acc += tl.load(head_ptr + q * D + d, mask=dmask, other=0.0)
            if HAS_COUNTS:
                cnt += tl.load(head_cnt_ptr + q)
            # The segment goes on past chunk q only if it fills q and continues after it.
            q_last = tl.minimum(q * BLOCK_R + BLOCK_R, N) - 1
            q_more = (q_last + 1) < N
            go = q_more & (tl.load(sidx_ptr + q_last) == code)
            go = go & (tl.load(sidx_ptr + q_last + 1, mask=q_more, other=0) == code)
            q += 1
        # The code as a block: the interpreter mis-types (block mask) & (scalar mask).
        code_d = code + tl.zeros([BLOCK_D], dtype=tl.int64)
        scale = scale_b
        if HAS_GRAD_LOSS:  # the same rounding order as fastvq.reference.vq_bwd: w * (g * (2 / numel))
            scale = scale_b * (tl.load(grad_loss_ptr).to(tl.float32) * scale_a)
        tl.store(out_ptr + code * stride_ok + d * stride_od, (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=dmask & (code_d >= 0) & (code_d < K))  # fmt: skip
        if HAS_COUNTS:
            if pid_d == 0:
                tl.store(cnt_ptr + code, cnt, mask=(code >= 0) & (code < K))


def sort_index(idx: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted idx, the row of each sorted position), stable so equal codes keep row order."""
    sidx, perm = torch.sort(idx, stable=True)
    return sidx, perm


def finish_segments(
    sidx: Tensor,
    head: Tensor,
    tail: Tensor,
    out: Tensor,
    block_r: int,
    block_d: int,
    grad_loss: Tensor | None = None,
    scale_a: float = 1.0,
    scale_b: float = 1.0,
    counts: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Launch the second pass over the chunks (see the module docstring)."""
    n = sidx.shape[0]
    k, d = out.shape
    num_chunks = triton.cdiv(n, block_r)
    head_cnt, tail_cnt, cnt = counts if counts is not None else (head, head, head)
    _segment_finish_kernel[(num_chunks, triton.cdiv(d, block_d))](
        sidx, head, tail, out, grad_loss if grad_loss is not None else head, head_cnt, tail_cnt, cnt,
        n, k, d, out.stride(0), out.stride(1), scale_a, scale_b,
        HAS_GRAD_LOSS=grad_loss is not None, HAS_COUNTS=counts is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=1,
    )  # fmt: skip
