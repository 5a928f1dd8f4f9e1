"""Nearest-code search in PyTorch, chunked over rows so the N x K score matrix never exists.

Score. For the l2 metric the chosen code minimises ||x - c_k||^2 = ||x||^2 - 2 (x.c_k - 0.5||c_k||^2);
||x||^2 is constant per row, so each row takes argmin_k (0.5||c_k||^2 - x.c_k), one addmm per tile.
For cosine the codes and rows are l2-normalised first and the row takes argmax_k (x^.c^_k).

Returned distance. It is recomputed from the difference (x - c_idx), not read off the expanded
score: the expansion cancels catastrophically when x and c share a large offset, and the recomputed
value is also what the loss and the NaN check need.

Speed (CPU). One fixed (rows, K) fp32 tile is reused for every chunk: a fresh 2-8 MiB tensor per
chunk costs page faults, and a tile that stays in cache lets ``torch.min`` read it back cheaply.
``torch.min(dim=1)`` is used instead of ``argmin``: on CPU it is about twice as fast, and it also
returns the first index of the minimum.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# Budget for the score tile: 64 MiB, whatever N is (issue 2). On CPU a tile of ~512 rows is
# fastest (it stays in L2/L3), so rows are also capped by _CPU_TILE_ROWS there.
MAX_TILE_BYTES = 64 * 2**20
_CPU_TILE_ROWS = 512

_METRICS = ("l2", "cosine")


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 when any input is fp64 (gradcheck, references)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tile_rows(num_rows: int, num_codes: int, device: torch.device) -> int:
    """Rows per score tile: within MAX_TILE_BYTES of fp32 scores, at least one row."""
    rows = max(1, MAX_TILE_BYTES // (4 * max(num_codes, 1)))
    if device.type == "cpu":
        rows = min(rows, _CPU_TILE_ROWS)
    return max(1, min(rows, num_rows))


def _normalize(t: Tensor) -> Tensor:
    # Zero vectors stay zero (eps guards the division); their cosine to every code is 0, so
    # they tie everywhere and take code 0.
    return torch.nn.functional.normalize(t, dim=-1, eps=1e-12)


def nearest_code(x: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Index of, and distance to, the nearest code for every row of ``x``.

    Args:
        x: (N, D) float tensor (fp32, fp16 or bf16; computed in fp32. fp64 is computed in fp64).
        codebook: (K, D) float tensor, K >= 1, same device as ``x``.
        metric: "l2" (squared euclidean) or "cosine" (1 - cosine similarity).

    Returns:
        idx: (N,) int64, the lowest index among exactly tied codes.
        dist: (N,) float32 (float64 for fp64 inputs), ||x - c_idx||^2 for "l2", 1 - cos(x, c_idx) for "cosine".

    Raises:
        ValueError: unknown ``metric``. (Shape, dtype and device checks live in fastvq.functional.)
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    acc = accumulation_dtype(x, codebook)
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=acc, device=x.device)
    if x.shape[0] > 0:
        with _ieee_fp32_matmul(x.device):
            _search_tiles(x, codebook.to(acc), metric, idx, dist)
    return idx, dist


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    # Training scripts often set allow_tf32 / set_float32_matmul_precision("high"); cuBLAS would
    # then round fp32 products to tf32 and break the contract with u = 0. The switch is global,
    # so it is restored on exit. (CPU matmuls ignore it.)
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _search_tiles(x: Tensor, cb: Tensor, metric: str, idx: Tensor, dist: Tensor) -> None:
    """Fill idx and dist (N,) tile by tile; ``cb`` is the codebook in the accumulation dtype."""
    n, k = x.shape[0], cb.shape[0]
    if metric == "l2":
        half_sq_norm = 0.5 * (cb * cb).sum(dim=1)  # (K,)
    else:
        cb = _normalize(cb)
    cb_t = cb.t()  # (D, K), a view: addmm/mm take the transposed layout without a copy
    rows = tile_rows(n, k, x.device)
    tile = torch.empty(rows, k, dtype=cb.dtype, device=x.device)  # [rows, K], reused
    best = torch.empty(rows, dtype=cb.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xs = x[start:stop].to(cb.dtype)  # (n_chunk, D); upcasts one chunk at a time
        scores = tile[: stop - start]
        if metric == "l2":
            torch.addmm(half_sq_norm, xs, cb_t, beta=1.0, alpha=-1.0, out=scores)
            torch.min(scores, dim=1, out=(best[: stop - start], idx[start:stop]))
            diff = xs - cb.index_select(0, idx[start:stop])
            torch.sum(diff * diff, dim=1, out=dist[start:stop])
        else:
            xs = _normalize(xs)
            torch.mm(xs, cb_t, out=scores)
            torch.max(scores, dim=1, out=(best[: stop - start], idx[start:stop]))
            chosen = cb.index_select(0, idx[start:stop])
            dist[start:stop] = 1.0 - (xs * chosen).sum(dim=1)
