"""Nearest-code search: a GEMM with a running-argmin epilogue, never writing the N x K scores.

What it computes. For every row x_i of x (N, D) the index of the nearest code of codebook (K, D)
and the distance to it, as ``fastvq.reference.nearest_code``:
    l2:     argmin_k ||x_i - c_k||^2 = argmin_k (0.5 ||c_k||^2 - x_i.c_k)       (||x||^2 drops out)
    cosine: argmax_k x_i.c_k / ||c_k||  = argmin_k (0 - x_i.c_k * inv||c_k||)    (||x|| > 0 drops out)
A small kernel first writes per-code fp32 terms a_k (0.5||c_k||^2, or 0) and b_k (1/||c_k||), so
the hot loop scores a [BLOCK_N, BLOCK_K] tile as ``a - acc`` (or ``a - acc * b``): one op per score.

Tiling. One program owns BLOCK_N rows and scans all K in BLOCK_K tiles; per tile it accumulates
``acc = x_tile @ c_tile^T`` over D in BLOCK_D chunks (fp32 accumulator). D is padded to a power of
two >= 16 and masked (tl.dot needs an inner dimension >= 16), so D = 1 or 3 work; when D fits one
chunk the x tile is loaded once and stays in registers for the whole K scan. Small fp32 problems
("ieee", D <= MAX_FMA_D) skip tl.dot: D rank-1 FMA updates per tile, instead of a CUDA-core dot
that would spend 16 multiply-adds per score on a D padded to 16.

Running argmin, ties. Each program keeps a 2-D running minimum ``best_val[BLOCK_N, BLOCK_K]`` and
the tile number ``best_tile`` it came from: lane j sees codes j, j + BLOCK_K, j + 2 BLOCK_K, ...
and replaces its minimum only on a strict ``<``, so within a lane the earliest (lowest) index wins.
After the scan, one cross-lane reduction takes the minimum value and, among the lanes that hold
exactly that value, the lowest code index. Exactly tied (duplicated) codes therefore resolve to
the lowest index, like torch.argmin, with no atomics and the same answer on every run.

Small D, huge K (N 65536, D 8, K 65536). There the GEMM is tiny and the per-score epilogue is the
floor, so it is kept to four CUDA-core ops per score: the subtract (or FMA) that forms the score,
one compare, two selects; no cross-thread shuffle or reduction inside the K loop (the one
cross-lane reduction per program is amortised over all K), and the per-code terms are loaded as
one [BLOCK_K] vector per tile. 16-bit inputs take the padded D on tensor cores for free; fp32
inputs take the FMA path above (8 FMAs per score rather than 16).

Autotuning. BLOCK_N x BLOCK_K tiles, warps and pipeline stages for Ampere/Hopper, keyed on
power-of-two buckets of N and K, on D, the metric and the precision (the dtypes are part of every
autotune key); configs that overflow the device's shared memory or the register estimate are
pruned before timing. The kernel only writes its outputs (no accumulation across launches), so
the autotuner's repeated runs need no reset_to_zero. The interpreter gets one large config.

Precision. The dot runs on the stored dtypes: fp16/bf16 operands on tensor cores (products are
exact in fp32, accumulation in fp32); fp32 operands with ``input_precision`` chosen on purpose:
"ieee" by default (the contract with u = 0); "tf32" or "tf32x3" on request (``precision=`` or the
module's ``DEFAULT_PRECISION``). Those then re-rank the best TOPK lane winners of every row by the
fp32 distance from the difference (l2) or the fp32 cosine score, lowest index on exact ties. The
re-rank never picks a worse code than the plain tf32 argmin (that winner is always a candidate),
so the contract with u = 2^-11 always holds, and it fixes most near-ties across lanes; two close
codes in the same lane (indices congruent mod BLOCK_K) are not both re-ranked, so u = 0 quality
is typical rather than guaranteed. Mixed input dtypes are upcast to fp32 before the dot.

Returned distance. Recomputed from the chosen code, as the PyTorch path does: ||x - c_idx||^2 in
fp32 from the difference for l2 (no cancellation with a large common offset), 1 - x.c /
(max(||x||, eps) max(||c||, eps)) for cosine. ``vq_fwd`` (kernels/quantize.py) runs the same
kernel with WRITE_ZQ, which also copies the chosen codebook rows to zq (bitwise, no conversion).

Non-finite inputs. A code whose a_k is NaN/Inf (NaN/Inf in the code, or a norm that overflows
fp32) is chosen for every row, as torch.min picks the first NaN score, so the returned distance
is non-finite and fastvq's finite check reports it; a NaN/Inf row of x has a non-finite distance
whatever it is matched to. The index is then not guaranteed to equal torch's.

Limits. K < 2^31 (indices are int32 inside the kernel, int64 outside); N, D and all strides may
exceed 2^31 elements (offsets are int64: program ids and aranges are cast before they multiply
strides). One program per BLOCK_N rows, so very small N with huge K uses few SMs (no split-K).

Verified under TRITON_INTERPRET=1 on CPU only, and compiled for sm_80/sm_90 with triton's ptxas
(kernels/_compile_check.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    check_devices,
    check_matrix,
    check_out,
    interpreter_active,
    max_shared_bytes,
    next_pow2,
    size_bucket,
)

METRICS = ("l2", "cosine")
PRECISIONS = ("ieee", "tf32", "tf32x3")
# Used when a launcher gets precision=None; "ieee" is the contract with u = 0. Set it to "tf32" to
# trade exactness of fp32 searches for tensor-core speed (fp16/bf16 inputs are unaffected).
DEFAULT_PRECISION = "ieee"
# Lane winners re-ranked per row in "tf32"/"tf32x3" mode.
RERANK_TOPK = 4
# D chunk of the dot (16-bit / fp32 operands): the x tile stays resident for D up to the chunk.
MAX_BLOCK_D = 64
MAX_BLOCK_D_FP32 = 32
# fp32 "ieee" searches with D up to this skip tl.dot: exact-D FMAs instead of a dot padded to 16.
MAX_FMA_D = 12
_INT32_MAX = tl.constexpr(2**31 - 1)


# ---------------------------------------------------------------------------------------------
# Autotune configs


def _search_configs() -> list[triton.Config]:
    if interpreter_active():
        # One config, large blocks: the interpreter runs a program as numpy ops, so big tiles are
        # 30-50x faster than small ones, and multi-config autotuning is slow or crashes there.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages): Ampere/Hopper, fp32 or 16-bit operands
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 8, 3),
        (64, 32, 4, 2),
        (32, 64, 4, 3),
        (32, 128, 4, 3),
        (16, 64, 4, 2),
    ]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns) for bn, bk, nw, ns in shapes]


def _prune_search_configs(configs, named_args, **kwargs):
    """Drop configs that overflow shared memory or registers, or waste a tile on tiny N / K.

    The register estimate (32-bit registers per thread) counts acc, best_val and best_tile, three
    [BLOCK_N, BLOCK_K] tiles, plus, for "ieee" fp32 dots (FMA from registers, no tensor cores),
    the operand tiles, and doubles for the small-D FMA path; 112 leaves room for addresses and
    the epilogue. It matches where kernels/_compile_check.py sees ptxas spill on sm_80/sm_90.
    """
    x = named_args["x_ptr"]
    block_d = kwargs["BLOCK_D"]
    fp32_ops = kwargs["DOT_FP32"] or x.dtype == torch.float32
    elt = 4 if fp32_ops else x.element_size()
    smem_limit = max_shared_bytes(x.device)
    n_cap = max(16, next_pow2(named_args["N"]))
    k_cap = max(16, next_pow2(named_args["K"]))
    kept = []
    for cfg in configs:
        bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        threads = 32 * cfg.num_warps
        smem = cfg.num_stages * (bn + bk) * block_d * elt + bn * bk * 4  # pipelined operands + epilogue
        regs = 3 * bn * bk // threads
        if kwargs["FMA_D"]:  # the unrolled rank-1 updates keep D x-columns and c-rows live
            regs *= 2
        elif fp32_ops and kwargs["INPUT_PRECISION"] == "ieee":
            regs += (bn * block_d if kwargs["HOIST_X"] else (bn + bk) * block_d) // threads
        if smem <= smem_limit and regs <= 112 and bn <= n_cap and bk <= k_cap:
            kept.append(cfg)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _code_norms_kernel(
    c_ptr, a_ptr, b_ptr,
    K, D,
    stride_ck, stride_cd,
    COSINE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """a_k = 0.5 ||c_k||^2 (l2) or 0 / NaN for a non-finite code (cosine); b_k = 1 / max(||c_k||, eps)."""
    pid = tl.program_id(0).to(tl.int64)
    codes = pid * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)  # [BLOCK_K]
    kmask = codes < K
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        ptrs = c_ptr + codes[:, None] * stride_ck + d[None, :] * stride_cd
        c = tl.load(ptrs, mask=kmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
        sq += tl.sum(c * c, axis=1)
    if COSINE:
        # a = NaN flags a non-finite code (the search then picks it, see the module docstring).
        tl.store(a_ptr + codes, tl.where(sq < float("inf"), 0.0, float("nan")), mask=kmask)
        tl.store(b_ptr + codes, tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-12)), mask=kmask)
    else:
        tl.store(a_ptr + codes, 0.5 * sq, mask=kmask)


@triton.jit
def _dot_chunk(x_ptr, c_ptr, rows, cols, rmask, kmask, d, D, stride_xn, stride_xd, stride_ck, stride_cd, acc,
               DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """acc += x[rows, d] @ codebook[cols, d]^T for one BLOCK_D slice d (int64 offsets) of D."""
    dmask = d < D
    x_ptrs = x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd
    xt = tl.load(x_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    c_ptrs = c_ptr + cols.to(tl.int64)[None, :] * stride_ck + d[:, None] * stride_cd
    ct = tl.load(c_ptrs, mask=dmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_D, BLOCK_K]
    if DOT_FP32:
        xt = xt.to(tl.float32)
        ct = ct.to(tl.float32)
    return tl.dot(xt, ct, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _row_distance(x_ptr, c_ptr, rows, idx, rmask, D, stride_xn, stride_xd, stride_ck, stride_cd,
                  zq_ptr, stride_qn, stride_qd,
                  COSINE: tl.constexpr, WRITE_ZQ: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """fp32 distance of every row to its code idx (from the difference), optionally copying the code to zq."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    idx64 = idx.to(tl.int64)
    sq = tl.zeros(rows.shape, dtype=tl.float32)  # [BLOCK_N] sum (x - e)^2, or x.e for cosine
    xx = tl.zeros(rows.shape, dtype=tl.float32)
    ee = tl.zeros(rows.shape, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        m = rmask[:, None] & (d < D)[None, :]
        e_ptrs = c_ptr + idx64[:, None] * stride_ck + d[None, :] * stride_cd
        e = tl.load(e_ptrs, mask=m, other=0.0)  # [BLOCK_N, BLOCK_D]
        if WRITE_ZQ:
            # Stored exactly as loaded (codebook dtype in, codebook dtype out): zq == codebook[idx] bitwise.
            tl.store(zq_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd, e, mask=m)
        xv = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        ef = e.to(tl.float32)
        if COSINE:
            sq += tl.sum(xv * ef, axis=1)
            xx += tl.sum(xv * xv, axis=1)
            ee += tl.sum(ef * ef, axis=1)
        else:
            diff = xv - ef
            sq += tl.sum(diff * diff, axis=1)
    if COSINE:
        den = tl.maximum(tl.sqrt_rn(xx), 1e-12) * tl.maximum(tl.sqrt_rn(ee), 1e-12)
        sq = 1.0 - tl.div_rn(sq, den)
    return sq


@triton.jit
def _search_fwd_kernel(
    x_ptr, c_ptr, a_ptr, b_ptr, idx_ptr, dist_ptr, zq_ptr,
    N, K, D, N_BUCKET, K_BUCKET,
    stride_xn, stride_xd, stride_ck, stride_cd, stride_qn, stride_qd,
    COSINE: tl.constexpr, WRITE_ZQ: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    RERANK: tl.constexpr, TOPK: tl.constexpr, HOIST_X: tl.constexpr, FMA_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # N_BUCKET, K_BUCKET: autotune keys only (powers of two of N and K). FMA_D > 0: D itself, for
    # the exact-D outer-product path of small fp32 problems (no padding of D to 16).
    pid = tl.program_id(0).to(tl.int64)  # int64 before it multiplies a stride
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    rmask = rows < N
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K] int32: code indices fit int32
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    # [BLOCK_D, BLOCK_K] codebook tile pointers, advanced by BLOCK_K codes per tile (HOIST_X path)
    c_ptrs = c_ptr + offs_k.to(tl.int64)[None, :] * stride_ck + offs_d[:, None] * stride_cd

    if HOIST_X and FMA_D == 0:  # D <= BLOCK_D: one x tile serves every K tile
        x_ptrs = x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd  # [BLOCK_N, BLOCK_D]
        x_tile = tl.load(x_ptrs, mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            x_tile = x_tile.to(tl.float32)

    best_val = tl.full([BLOCK_N, BLOCK_K], float("inf"), dtype=tl.float32)  # per-lane running minimum
    best_tile = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)  # K tile the minimum came from
    bad_lane = tl.full([BLOCK_K], _INT32_MAX, dtype=tl.int32)  # lowest non-finite code per lane
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        cols = kt * BLOCK_K + offs_k  # [BLOCK_K]
        kmask = cols < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if FMA_D > 0:
            # Small D in fp32: D rank-1 updates on CUDA cores (D FMAs per score, where a dot
            # padded to 16 would spend 16); x columns are re-read from L1, 1/BLOCK_K of the work.
            for dd in tl.static_range(FMA_D):
                xd = tl.load(x_ptr + rows * stride_xn + dd * stride_xd, mask=rmask, other=0.0)  # [BLOCK_N]
                cd = tl.load(c_ptr + cols.to(tl.int64) * stride_ck + dd * stride_cd, mask=kmask, other=0.0)  # [BLOCK_K]
                acc += xd.to(tl.float32)[:, None] * cd.to(tl.float32)[None, :]
        elif HOIST_X:
            ct = tl.load(c_ptrs, mask=(offs_d < D)[:, None] & kmask[None, :], other=0.0)  # [BLOCK_D, BLOCK_K]
            if DOT_FP32:
                ct = ct.to(tl.float32)
            acc = tl.dot(x_tile, ct, acc, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                acc = _dot_chunk(x_ptr, c_ptr, rows, cols, rmask, kmask, d0 + offs_d, D, stride_xn, stride_xd,
                                 stride_ck, stride_cd, acc, DOT_FP32, INPUT_PRECISION)  # fmt: skip
        # Padded codes get a = +inf (and b = 0): their score is +inf and never wins a strict <.
        a = tl.load(a_ptr + cols, mask=kmask, other=float("inf"))  # [BLOCK_K]
        if COSINE:
            b = tl.load(b_ptr + cols, mask=kmask, other=0.0)
            score = a[None, :] - acc * b[None, :]  # [BLOCK_N, BLOCK_K]
        else:
            score = a[None, :] - acc  # [BLOCK_N, BLOCK_K]
        upd = score < best_val  # strict: an equal score later in the lane keeps the lower index
        best_val = tl.where(upd, score, best_val)
        best_tile = tl.where(upd, kt, best_tile)
        bad = kmask & ((a != a) | (a == float("inf")))  # [BLOCK_K], a per-tile cost, not per score
        bad_lane = tl.minimum(bad_lane, tl.where(bad, cols, _INT32_MAX))
        if HOIST_X and FMA_D == 0:
            c_ptrs += BLOCK_K * stride_ck

    lane_idx = best_tile * BLOCK_K + offs_k[None, :]  # [BLOCK_N, BLOCK_K] code index of each lane's minimum
    if RERANK:
        # Re-rank the TOPK best lane winners by fp32 scores recomputed from the stored values.
        cand_val = best_val
        best_d = tl.zeros([BLOCK_N], dtype=tl.float32)
        idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        for t in tl.static_range(TOPK):
            m = tl.min(cand_val, axis=1)  # [BLOCK_N]
            ci = tl.min(tl.where(cand_val == m[:, None], lane_idx, _INT32_MAX), axis=1)  # lowest index at m
            cand_val = tl.where(lane_idx == ci[:, None], float("inf"), cand_val)
            valid = m < float("inf")
            ci = tl.where(valid, ci, 0)
            # fp32 distance from the stored values: ||x - c||^2 from the difference, or 1 - cos.
            dcand = _row_distance(x_ptr, c_ptr, rows, ci, rmask, D, stride_xn, stride_xd, stride_ck, stride_cd,
                                  zq_ptr, stride_qn, stride_qd, COSINE, False, BLOCK_D)  # fmt: skip
            if t == 0:  # the tf32 argmin itself: the re-rank can only improve on it
                best_d = dcand
                idx = ci
            else:
                take = valid & ((dcand < best_d) | ((dcand == best_d) & (ci < idx)))
                best_d = tl.where(take, dcand, best_d)
                idx = tl.where(take, ci, idx)
    else:
        min_val = tl.min(best_val, axis=1)  # [BLOCK_N]
        # Lowest code index among the lanes holding exactly the minimum (lane 0 / code 0 when all
        # scores are +inf or NaN, so a padded lane's index never escapes).
        idx = tl.min(tl.where(best_val == min_val[:, None], lane_idx, _INT32_MAX), axis=1)  # [BLOCK_N]
    first_bad = tl.min(bad_lane, axis=0)
    idx = tl.where(first_bad < K, first_bad, idx)

    dist = _row_distance(x_ptr, c_ptr, rows, idx, rmask, D, stride_xn, stride_xd, stride_ck, stride_cd,
                         zq_ptr, stride_qn, stride_qd, COSINE, WRITE_ZQ, BLOCK_D)  # fmt: skip
    tl.store(idx_ptr + rows, idx.to(tl.int64), mask=rmask)
    tl.store(dist_ptr + rows, dist, mask=rmask)


_search_fwd_tuned = triton.autotune(
    configs=_search_configs(),
    key=["N_BUCKET", "K_BUCKET", "D", "COSINE", "WRITE_ZQ", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_search_configs},
)(_search_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers


def block_d_for(d: int, elt_bytes: int) -> int:
    """D chunk of the dot: a power of two >= 16 (tl.dot's minimum inner size), at most
    MAX_BLOCK_D for 16-bit operands and MAX_BLOCK_D_FP32 for fp32 ones (an "ieee" fp32 dot runs
    on CUDA cores from registers, where wider chunks spill)."""
    cap = MAX_BLOCK_D_FP32 if elt_bytes == 4 else MAX_BLOCK_D
    return min(max(16, next_pow2(d)), cap)


def _resolve_precision(precision: str | None) -> str:
    p = DEFAULT_PRECISION if precision is None else precision
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None), got {p!r}")
    return p


def code_terms(codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Per-code fp32 score terms (a, b) of the search: (0.5||c||^2, unused) or (0, 1/||c||)."""
    k, d = codebook.shape
    a = torch.empty(k, dtype=torch.float32, device=codebook.device)
    b = torch.empty(k, dtype=torch.float32, device=codebook.device) if metric == "cosine" else a
    block_k = 64 if interpreter_active() else 128
    block_d = min(max(16, next_pow2(d)), 64)
    _code_norms_kernel[(triton.cdiv(k, block_k),)](
        codebook, a, b, k, d, codebook.stride(0), codebook.stride(1),
        COSINE=metric == "cosine", BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return a, b


def search(
    x: Tensor, codebook: Tensor, metric: str, precision: str | None, idx: Tensor, dist: Tensor, zq: Tensor | None
) -> None:
    """Launch the search on checked inputs, writing idx, dist (and zq when given) in place."""
    n, d = x.shape
    k = codebook.shape[0]
    if n == 0:
        return
    precision = _resolve_precision(precision)
    a, b = code_terms(codebook, metric)
    # The interpreter's tl.dot reads bf16 bits as integers, so there bf16 is upcast (bf16 products
    # are exact in fp32: same result). Mixed dtypes are upcast because tl.dot needs one dtype.
    dot_fp32 = x.dtype != codebook.dtype or (interpreter_active() and x.dtype == torch.bfloat16)
    fp32_operands = x.dtype != codebook.dtype or x.dtype == torch.float32  # as on a GPU
    rerank = fp32_operands and precision != "ieee"
    block_d = block_d_for(d, 4 if dot_fp32 else x.element_size())
    write_zq = zq is not None
    zq_arg = zq if write_zq else idx  # never written when WRITE_ZQ is False
    stride_qn, stride_qd = zq.stride() if write_zq else (0, 0)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _search_fwd_tuned[grid](
        x, codebook, a, b, idx, dist, zq_arg,
        n, k, d, size_bucket(n), size_bucket(k),
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), stride_qn, stride_qd,
        COSINE=metric == "cosine", WRITE_ZQ=write_zq, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision if fp32_operands else "ieee",
        RERANK=rerank, TOPK=RERANK_TOPK, HOIST_X=d <= block_d, BLOCK_D=block_d,
        FMA_D=d if fp32_operands and precision == "ieee" and d <= MAX_FMA_D else 0,
    )  # fmt: skip


def check_search_inputs(x: Tensor, codebook: Tensor, x_name: str = "x") -> torch.device:
    """Shapes, dtypes and device of a search's inputs; returns the device."""
    check_matrix(x, x_name)
    check_matrix(codebook, "codebook")
    if codebook.shape[0] < 1:
        raise ValueError(f"codebook must have at least one code, got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != x.shape[1] or x.shape[1] < 1:
        raise ValueError(
            f"{x_name} and codebook must share D >= 1, got {x_name} {tuple(x.shape)} "
            f"and codebook {tuple(codebook.shape)}"
        )
    return check_devices(**{x_name: x, "codebook": codebook})


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    metric: str = "l2",
    *,
    precision: str | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Index of, and distance to, the nearest code of every row of ``x`` (``fastvq.reference.nearest_code``).

    Args:
        x: (N, D) float32/float16/bfloat16, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        codebook: (K, D) float32/float16/bfloat16 on the same device, K >= 1, any strides.
        metric: "l2" (squared euclidean) or "cosine" (1 - cosine similarity).
        precision: "ieee" | "tf32" | "tf32x3" for fp32 dots, None for ``DEFAULT_PRECISION``.
        out: optional (idx, dist) buffers to write into: (N,) int64 and (N,) float32, contiguous.

    Returns:
        idx: (N,) int64, lowest index among exactly tied codes.
        dist: (N,) float32, ||x - c_idx||^2 from the difference ("l2") or 1 - cos(x, c_idx).

    Raises:
        TypeError: non-tensor inputs or unsupported dtypes (fp64 goes to the PyTorch path).
        ValueError: bad shapes, device mismatch, unknown metric or precision, bad ``out``.
        RuntimeError: CPU tensors without TRITON_INTERPRET=1.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    device = check_search_inputs(x, codebook)
    n = x.shape[0]
    if out is None:
        idx = torch.empty(n, dtype=torch.int64, device=device)
        dist = torch.empty(n, dtype=torch.float32, device=device)
    else:
        idx = check_out(out[0], "out[0] (idx)", (n,), torch.int64, device)
        dist = check_out(out[1], "out[1] (dist)", (n,), torch.float32, device)
    search(x, codebook, metric, precision, idx, dist, None)
    return idx, dist
