"""fastvq.kernels.nearest_code (kernels/search.py) against fastvq.reference and the fp64 oracle.

Without CUDA the kernels run under TRITON_INTERPRET=1 (conftest.py) at tiny, odd shapes:
K = 131 spans three K tiles of the interpreter's BLOCK_K = 64 and D = 100 several D chunks, so
the cross-tile argmin and the D loop run here too. The interpreter computes tf32 dots exactly and
has no races: the tests marked gpu are the real test of those.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import kernels, reference
from fastvq.testing import assert_contract, distances_fp64

pytestmark = pytest.mark.skipif(
    not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.UNAVAILABLE_REASON}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METRICS = ["l2", "cosine"]
# (N, K, D): one row / code / dim; odd sizes; D = 16 (exactly one dot chunk); K over several tiles;
# D over several chunks; K = 1.
SHAPES = [(1, 1, 1), (7, 5, 3), (33, 31, 16), (100, 67, 17), (40, 131, 40), (9, 70, 100), (13, 1, 5)]


def _data(n, k, d, dtype, offset=0.0):
    x = (torch.randn(n, d) + offset).to(dtype).to(DEVICE)
    codebook = (torch.randn(k, d) + offset).to(dtype).to(DEVICE)
    return x, codebook


def _poisoned_out(n):
    """Output buffers filled with values no correct result has: an unwritten element shows."""
    idx = torch.full((n,), -1, dtype=torch.int64, device=DEVICE)
    dist = torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)
    return idx, dist


def _check_dist(dist, idx, x, codebook, metric):
    """dist against the fp64 distance of the chosen code, within fp32's error for its formula."""
    ref = distances_fp64(x, codebook, metric).gather(1, idx.cpu()[:, None]).squeeze(1)
    d = x.shape[1]
    if metric == "l2":  # from the difference: relative error <= (D + 2) 2^-24, no cancellation
        tol = (d + 2) * 2.0**-24 * ref + 1e-30
    else:  # 1 - cos from fp32 sums of products: absolute error
        tol = torch.full_like(ref, 4 * (d + 5) * 2.0**-24)
    err = (dist.cpu().double() - ref).abs()
    assert (err <= tol).all(), f"dist off by {err.max().item():.3g} (tol {tol[err.argmax()].item():.3g})"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_and_oracle(shape, dtype, metric):
    n, k, d = shape
    x, codebook = _data(n, k, d, dtype)
    idx, dist = kernels.nearest_code(x, codebook, metric, out=_poisoned_out(n))
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert (idx >= 0).all() and not dist.isnan().any(), "an output element was left unwritten"
    assert_contract(idx, x, codebook, metric)
    _check_dist(dist, idx, x, codebook, metric)
    # Random data has no near-ties: the index must be exactly torch's.
    idx_t, dist_t = reference.nearest_code(x, codebook, metric)
    assert torch.equal(idx, idx_t)
    torch.testing.assert_close(dist, dist_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicated_codes_give_lowest_index(dtype, metric):
    k, d = 131, 6
    codebook = torch.randn(k, d)
    # With BLOCK_K = 64 (the interpreter's), code j sits in lane j % 64 of tile j // 64. Duplicates
    # in the same lane of a later tile (5 -> 69, 36 -> 100) and in other lanes of later tiles
    # (3 -> 70, 3 -> 130).
    for src, dst in [(5, 69), (3, 70), (3, 130), (100, 36)]:
        codebook[dst] = codebook[src]
    if metric == "cosine":
        codebook[120] = 2 * codebook[7]  # a power-of-two multiple is an exact cosine tie
    codebook = codebook.to(dtype).to(DEVICE)
    rows = [69, 5, 70, 130, 3, 36, 100, 7, 120]
    x = codebook[rows].float() + 0.01 * torch.randn(len(rows), d, device=DEVICE)
    x = torch.cat([x, codebook[rows].float()]).to(dtype)  # noisy copies and the codes themselves
    idx, _ = kernels.nearest_code(x, codebook, metric)
    idx_t, _ = reference.nearest_code(x, codebook, metric)
    assert torch.equal(idx, idx_t)
    lowest = {69: 5, 5: 5, 70: 3, 130: 3, 3: 3, 36: 36, 100: 36, 7: 7, 120: 7 if metric == "cosine" else 120}
    assert idx[len(rows) :].tolist() == [lowest[r] for r in rows]
    assert_contract(idx, x, codebook, metric)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_ties_meet_the_contract(dtype):
    d = 17
    base = torch.randn(40, d)
    # Pairs of codes one rounding step apart, queried from their midpoint.
    codebook = torch.cat([base, base + base.abs() * 2.0**-10]).to(dtype)
    x = (0.5 * (codebook[:40].float() + codebook[40:].float())).to(dtype)
    x, codebook = x.to(DEVICE), codebook.to(DEVICE)
    for metric in METRICS:
        idx, dist = kernels.nearest_code(x, codebook, metric)
        assert_contract(idx, x, codebook, metric)
        _check_dist(dist, idx, x, codebook, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [3, 8, 20, 40])
def test_small_gaps_pick_the_exact_argmin(d, metric):
    # Each row has 24 codes on spheres around it whose squared radii differ by ~4 tau: anything
    # less accurate than fp32 with fp32 accumulation (e.g. a 16-bit or tf32 rounding of the
    # operands) picks a wrong code here, and assert_contract then fails.
    n, per_row = 12, 24
    x = torch.randn(n, d, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(n, per_row, d, dtype=torch.float64), dim=-1)
    radius = (0.25 * (1 + 2e-4 * torch.randperm(per_row, dtype=torch.float64))).sqrt()
    codebook = (x[:, None, :] + radius[None, :, None] * u).reshape(n * per_row, d)
    x, codebook = x.float().to(DEVICE), codebook.float().to(DEVICE)
    idx, _ = kernels.nearest_code(x, codebook, metric)
    assert_contract(idx, x, codebook, metric)
    assert torch.equal(idx, reference.nearest_code(x, codebook, metric)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_common_offset(dtype):
    # ||x||^2 - 2x.c + ||c||^2 cancels catastrophically here; the argmin must still meet the
    # contract and the returned distance must come from the difference (accurate, not garbage).
    x, codebook = _data(50, 67, 16, dtype, offset=1000.0)
    idx, dist = kernels.nearest_code(x, codebook, "l2")
    assert_contract(idx, x, codebook, "l2")
    _check_dist(dist, idx, x, codebook, "l2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_vectors(dtype):
    x, codebook = _data(9, 20, 5, dtype)
    x[2] = 0
    x[7] = 0
    codebook[11] = 0
    for metric in METRICS:
        idx, dist = kernels.nearest_code(x, codebook, metric)
        idx_t, dist_t = reference.nearest_code(x, codebook, metric)
        assert torch.equal(idx, idx_t)
        torch.testing.assert_close(dist, dist_t, rtol=1e-5, atol=1e-6)
    idx, dist = kernels.nearest_code(x, codebook, "l2")
    assert idx[2].item() == 11 and dist[2].item() == 0.0
    idx, dist = kernels.nearest_code(x, codebook, "cosine")
    assert idx[2].item() == 0 and dist[2].item() == 1.0  # cosine 0 to every code: the first one


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    x_big = torch.randn(30, 2 * 12).to(dtype).to(DEVICE)
    x = x_big[:, ::2]  # strided columns
    codebook = torch.randn(12, 70).to(dtype).to(DEVICE).t()  # (70, 12) transposed view
    assert not x.is_contiguous() and not codebook.is_contiguous()
    for metric in METRICS:
        idx, dist = kernels.nearest_code(x, codebook, metric)
        idx_c, dist_c = kernels.nearest_code(x.contiguous(), codebook.contiguous(), metric)
        assert torch.equal(idx, idx_c)
        assert torch.equal(dist, dist_c)  # same values, same arithmetic: bitwise
        assert torch.equal(idx, reference.nearest_code(x, codebook, metric)[0])


def test_mixed_dtypes_upcast():
    x = torch.randn(20, 9, device=DEVICE)
    codebook = torch.randn(33, 9, device=DEVICE).to(torch.bfloat16)
    for metric in METRICS:
        idx, dist = kernels.nearest_code(x, codebook, metric)
        idx_t, dist_t = reference.nearest_code(x, codebook, metric)
        assert torch.equal(idx, idx_t)
        torch.testing.assert_close(dist, dist_t, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN
@pytest.mark.parametrize("metric", METRICS)
def test_non_finite_inputs_mirror_torch(metric):
    x, codebook = _data(10, 70, 5, torch.float32)
    x[3, 2] = float("nan")
    idx, dist = kernels.nearest_code(x, codebook, metric)
    idx_t, dist_t = reference.nearest_code(x, codebook, metric)
    assert torch.equal(idx, idx_t) and torch.equal(dist.isnan(), dist_t.isnan())
    x[3, 2] = 0.0
    codebook[66, 1] = float("nan")  # torch.min picks the first NaN score: every row -> code 66
    idx, dist = kernels.nearest_code(x, codebook, metric)
    assert (idx == 66).all() and dist.isnan().all()
    assert torch.equal(idx, reference.nearest_code(x, codebook, metric)[0])
    with pytest.raises(ValueError, match="non-finite"):
        fastvq.nearest_code(x, codebook, metric, backend="triton")


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("metric", METRICS)
def test_tf32_modes_rerank(precision, metric):
    # The interpreter computes tf32 dots exactly, so this runs the re-rank path, its tie rule
    # and its plumbing; the tf32 rounding itself is tested on a GPU (test_gpu_tf32_contract).
    x, codebook = _data(50, 131, 20, torch.float32)
    codebook[100] = codebook[30]
    x[0] = codebook[30]
    idx, dist = kernels.nearest_code(x, codebook, metric, precision=precision)
    assert idx[0].item() == 30
    assert_contract(idx, x, codebook, metric, tf32=True)
    _check_dist(dist, idx, x, codebook, metric)
    if DEVICE == "cpu":
        assert torch.equal(idx, reference.nearest_code(x, codebook, metric)[0])


def test_precision_default_is_module_setting(monkeypatch):
    from fastvq.kernels import search

    monkeypatch.setattr(search, "DEFAULT_PRECISION", "bogus")
    with pytest.raises(ValueError, match="precision"):
        kernels.nearest_code(torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE))


def test_empty_x():
    idx, dist = kernels.nearest_code(torch.empty(0, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE))
    assert idx.shape == (0,) and dist.shape == (0,)


def test_errors_name_the_argument():
    x, c = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="metric"):
        kernels.nearest_code(x, c, "dot")
    with pytest.raises(ValueError, match="precision"):
        kernels.nearest_code(x, c, precision="fp8")
    with pytest.raises(TypeError, match="x must have dtype"):
        kernels.nearest_code(x.double(), c)
    with pytest.raises(TypeError, match="codebook must be a torch.Tensor"):
        kernels.nearest_code(x, [[1.0]])
    with pytest.raises(ValueError, match="share D"):
        kernels.nearest_code(x, torch.randn(5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="at least one code"):
        kernels.nearest_code(x, torch.randn(0, 3, device=DEVICE))
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.nearest_code(x[None], c)
    with pytest.raises(ValueError, match=r"out\[1\]"):
        bad_out = (torch.empty(4, dtype=torch.int64, device=DEVICE), torch.empty(3, device=DEVICE))
        kernels.nearest_code(x, c, out=bad_out)


@pytest.mark.parametrize("metric", METRICS)
def test_functional_backend_triton_equals_torch(metric):
    x = torch.randn(3, 5, 7, device=DEVICE)
    codebook = torch.randn(19, 7, device=DEVICE)
    idx, dist = fastvq.nearest_code(x, codebook, metric, backend="triton")
    idx_t, dist_t = fastvq.nearest_code(x, codebook, metric, backend="torch")
    assert idx.shape == (3, 5) and torch.equal(idx, idx_t)
    torch.testing.assert_close(dist, dist_t, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas ships for Linux")
def test_search_kernels_compile_for_gpu_targets():
    # The interpreter never meets the compiler: compile the search kernels for sm_90 (H100) in a
    # process without TRITON_INTERPRET, one config per variant (see kernels/_compile_check.py).
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "fastvq.kernels._compile_check", "--quick", "--arch", "90"]
    cmd += ["--only", "search,code_norms"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("sm_90") >= 7 and "code_norms" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Larger shapes: CUDA only (skipped elsewhere by conftest).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8193, 1031, 3), (4097, 8192, 256), (65536, 65536, 8)], ids=str)
def test_gpu_contract_at_scale(shape, dtype):
    n, k, d = shape
    x, codebook = _data(n, k, d, dtype)
    idx, dist = kernels.nearest_code(x, codebook, "l2", out=_poisoned_out(n))
    assert (idx >= 0).all() and not dist.isnan().any()
    sample = torch.randperm(n, device=DEVICE)[:512]
    assert_contract(idx[sample], x[sample], codebook, "l2")
    _check_dist(dist[sample], idx[sample], x[sample], codebook, "l2")
    assert torch.equal(idx, kernels.nearest_code(x, codebook, "l2")[0])  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_tf32_contract(metric):
    x, codebook = _data(8193, 1031, 64, torch.float32)
    idx, _ = kernels.nearest_code(x, codebook, metric, precision="tf32")
    assert_contract(idx[:1024], x[:1024], codebook, metric, tf32=True)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # N * D beyond 2^31 elements: rows past the 2^31st element must be read and written correctly.
    d = 8
    n = 2**31 // d + 4099
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    codebook = torch.randn(37, d, device=DEVICE, dtype=torch.bfloat16)
    idx, dist = kernels.nearest_code(x, codebook)
    tail = slice(n - 5000, n)
    idx_t, dist_t = reference.nearest_code(x[tail], codebook)
    assert torch.equal(idx[tail], idx_t)
    torch.testing.assert_close(dist[tail], dist_t, rtol=1e-5, atol=1e-6)
