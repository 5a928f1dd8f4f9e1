"""fastvq.kernels.code_stats (kernels/stats.py, kernels/_segment.py) against fastvq.reference.code_stats
and an fp64 reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (conftest.py) at tiny, odd shapes.
Rows are reduced in sorted-index order in chunks of 64 positions, so N in {63, 64, 65, 200} and
skewed indices exercise segments that end at, cross, and span chunk boundaries.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import kernels, reference

triton = pytest.importorskip("triton")  # noqa: E402 (the kernels below need it; skipped without)
tl = triton.language
from fastvq.kernels import _segment  # noqa: E402

pytestmark = pytest.mark.skipif(
    not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.UNAVAILABLE_REASON}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (7, 5, 3), (63, 31, 16), (64, 2, 17), (65, 67, 40), (200, 3, 100), (130, 1, 5)]  # (N, K, D)


def _case(n, k, d, dtype, skew=False):
    x = (torch.randn(n, d) * 3).to(dtype).to(DEVICE)
    idx = torch.randint(0, k, (n,), device=DEVICE)
    if skew:
        idx[torch.rand(n, device=DEVICE) < 0.7] = k - 1
    return x, idx


def _reference_fp64(x, idx, k):
    ones = torch.ones_like(idx, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, idx, ones)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, idx, x.double())
    abs_sums = torch.zeros_like(sums).index_add_(0, idx, x.double().abs())
    return counts, sums, abs_sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_code_stats_matches_torch_and_fp64(shape, dtype):
    n, k, d = shape
    x, idx = _case(n, k, d, dtype, skew=n > 60)
    counts, sums = kernels.code_stats(x, idx, k)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert counts.shape == (k,) and sums.shape == (k, d)
    counts_t, sums_t = reference.code_stats(x, idx, k)
    assert torch.equal(counts, counts_t)  # integers: exact
    counts64, sums64, abs64 = _reference_fp64(x, idx, k)
    # fp32 sums of exactly representable values, in some order: error <= n_k * 2^-24 * sum |x|.
    bound = counts64[:, None].clamp_min(1) * 2.0**-24 * abs64
    assert ((sums.double() - sums64).abs() <= bound).all()
    assert ((sums_t.double() - sums64).abs() <= bound).all()
    empty = counts64 == 0
    assert (sums[empty] == 0).all() and (counts[empty] == 0).all()


@pytest.mark.parametrize("impl", ["dot", "scan"])
def test_code_stats_segment_implementations(impl, monkeypatch):
    # "scan" is the GPU formulation (tl.associative_scan), slow in the interpreter: tiny D.
    monkeypatch.setattr(_segment, "SCAN_IMPL", impl)
    x, idx = _case(150, 4, 3, torch.float32, skew=True)
    counts, sums = kernels.code_stats(x, idx, 4)
    counts_t, sums_t = reference.code_stats(x, idx, 4)
    assert torch.equal(counts, counts_t)
    torch.testing.assert_close(sums, sums_t, rtol=1e-6, atol=1e-5)


@triton.jit
def _combine_both_orders_kernel(v_ptr, f_ptr, out_ptr):
    i = tl.arange(0, 64)
    av, bv, cv = tl.load(v_ptr + i), tl.load(v_ptr + 64 + i), tl.load(v_ptr + 128 + i)
    af, bf, cf = tl.load(f_ptr + i), tl.load(f_ptr + 64 + i), tl.load(f_ptr + 128 + i)
    lv, lf = _segment._segsum_combine(*_segment._segsum_combine(av, af, bv, bf), cv, cf)
    rv, rf = _segment._segsum_combine(av, af, *_segment._segsum_combine(bv, bf, cv, cf))
    tl.store(out_ptr + i, lv)
    tl.store(out_ptr + 64 + i, rv)
    tl.store(out_ptr + 128 + i, lf.to(tl.float32))
    tl.store(out_ptr + 192 + i, rf.to(tl.float32))


def test_segmented_scan_combine_is_associative():
    # A GPU scan combines ranges in a tree; the interpreter folds left to right, where a combine
    # function that forgets the left range's flag would still pass. Check (a.b).c == a.(b.c)
    # for all eight flag patterns.
    v = torch.randint(-50, 50, (192,), device=DEVICE).float()  # integers: sums exact in any order
    f = torch.tensor([(i >> (j // 64)) & 1 for j in range(192) for i in [j % 8]], device=DEVICE, dtype=torch.int32)
    out = torch.empty(256, device=DEVICE)
    _combine_both_orders_kernel[(1,)](v, f, out)
    assert torch.equal(out[:64], out[64:128]) and torch.equal(out[128:192], out[192:])


def test_code_stats_deterministic_and_unused_codes():
    x, idx = _case(200, 50, 7, torch.float32, skew=True)
    c1, s1 = kernels.code_stats(x, idx, 60)  # codes 50..59 never used
    c2, s2 = kernels.code_stats(x, idx, 60)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert (c1[50:] == 0).all() and (s1[50:] == 0).all()


def test_code_stats_strided_x():
    x_big, idx = _case(90, 6, 20, torch.float16)
    x = x_big[:, ::2]
    counts, sums = kernels.code_stats(x, idx, 6)
    counts_c, sums_c = kernels.code_stats(x.contiguous(), idx, 6)
    assert torch.equal(counts, counts_c) and torch.equal(sums, sums_c)


def test_code_stats_empty_and_errors():
    no_idx = torch.empty(0, dtype=torch.int64, device=DEVICE)
    counts, sums = kernels.code_stats(torch.empty(0, 4, device=DEVICE), no_idx, 3)
    assert (counts == 0).all() and sums.shape == (3, 4) and (sums == 0).all()
    x, idx = _case(10, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="num_codes"):
        kernels.code_stats(x, idx, 0)
    with pytest.raises(TypeError, match="idx must be int64"):
        kernels.code_stats(x, idx.int(), 3)
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.code_stats(x.double(), idx, 3)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"idx must lie in \[0, 2\)"):
            kernels.code_stats(x, idx.clamp(max=2), 2)


def test_functional_backend_triton_equals_torch():
    x = torch.randn(3, 40, 5, device=DEVICE)
    idx = torch.randint(0, 9, (3, 40), device=DEVICE)
    counts, sums = fastvq.code_stats(x, idx, 9, backend="triton")
    counts_t, sums_t = fastvq.code_stats(x, idx, 9, backend="torch")
    assert torch.equal(counts, counts_t)
    torch.testing.assert_close(sums, sums_t, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas ships for Linux")
def test_stats_kernels_compile_for_gpu_targets():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "fastvq.kernels._compile_check", "--quick", "--arch", "90", "--only", "code_stats"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "sm_90" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_code_stats_at_scale(dtype):
    n, k, d = 262144 + 17, 1031, 64
    x, idx = _case(n, k, d, dtype, skew=True)
    counts, sums = kernels.code_stats(x, idx, k)
    counts_t, sums_t = reference.code_stats(x, idx, k)
    assert torch.equal(counts, counts_t)
    _, sums64, abs64 = _reference_fp64(x, idx, k)
    bound = counts[:, None].double().clamp_min(1) * 2.0**-24 * abs64
    assert ((sums.double() - sums64).abs() <= bound).all()
    assert torch.equal(sums, kernels.code_stats(x, idx, k)[1])  # deterministic
