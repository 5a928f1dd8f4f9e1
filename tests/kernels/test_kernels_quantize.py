"""fastvq.kernels.vq_fwd / vq_bwd (kernels/quantize.py, kernels/_segment.py) against fastvq.reference
and the fp64 reference, and fastvq.vector_quantize(backend="triton") end to end.

Without CUDA the kernels run under TRITON_INTERPRET=1 (conftest.py) at tiny, odd shapes.
The codebook gradient is a segmented reduction over sorted indices in chunks of 64 positions:
N = 200 with few codes makes segments that cross one and several chunk boundaries.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import kernels, reference
from fastvq.testing import assert_contract, vq_reference_fp64

pytestmark = pytest.mark.skipif(
    not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.UNAVAILABLE_REASON}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (7, 5, 3), (33, 31, 16), (100, 67, 17), (200, 3, 40), (130, 1, 100)]  # (N, K, D)


def _data(n, k, d, dtype):
    return torch.randn(n, d).to(dtype).to(DEVICE), torch.randn(k, d).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# vq_fwd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vq_fwd(shape, dtype):
    n, k, d = shape
    z, codebook = _data(n, k, d, dtype)
    out = (
        torch.full((n, d), float("nan"), dtype=dtype, device=DEVICE),
        torch.full((n,), -1, dtype=torch.int64, device=DEVICE),
        torch.full((n,), float("nan"), device=DEVICE),
    )
    zq, idx, sqerr = kernels.vq_fwd(z, codebook, out=out)
    assert zq.dtype == codebook.dtype and idx.dtype == torch.int64 and sqerr.dtype == torch.float32
    assert (idx >= 0).all() and not sqerr.isnan().any()
    assert torch.equal(zq.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       codebook[idx].view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
    assert_contract(idx, z, codebook, "l2")
    ref = ((z.double() - codebook.double()[idx]) ** 2).sum(1)
    assert ((sqerr.double() - ref).abs() <= (d + 2) * 2.0**-24 * ref + 1e-30).all()
    zq_t, idx_t, sqerr_t = reference.vq_fwd(z, codebook)
    assert torch.equal(idx, idx_t) and torch.equal(zq, zq_t)
    torch.testing.assert_close(sqerr, sqerr_t, rtol=1e-5, atol=1e-6)


def test_vq_fwd_mixed_dtypes_and_strides():
    z = torch.randn(40, 2 * 9, device=DEVICE)[:, ::2]
    codebook = torch.randn(9, 70, device=DEVICE, dtype=torch.bfloat16).t()
    zq, idx, sqerr = kernels.vq_fwd(z, codebook)
    zq_t, idx_t, sqerr_t = reference.vq_fwd(z, codebook)
    assert zq.dtype == torch.bfloat16 and torch.equal(zq, zq_t) and torch.equal(idx, idx_t)
    torch.testing.assert_close(sqerr, sqerr_t, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# vq_bwd


def _bwd_case(n, k, d, dtype, skew=False):
    z, codebook = _data(n, k, d, dtype)
    idx = reference.nearest_code(z, codebook)[0]
    if skew:  # most rows on code 1: segments crossing several 64-row chunks
        idx[torch.rand(n, device=DEVICE) < 0.8] = min(1, k - 1)
    grad_zq = torch.randn(n, d, device=DEVICE).to(codebook.dtype)
    grad_loss = torch.tensor(1.7, device=DEVICE)
    return grad_zq, grad_loss, z, codebook, idx


def _assert_grads_close(got, want, dtype, what):
    # fp32: a few roundings of the same sums in another order; 16-bit: one output rounding.
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.abs().max().item() + 1e-30
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vq_bwd_matches_torch_and_fp64(shape, dtype):
    n, k, d = shape
    grad_zq, grad_loss, z, codebook, idx = _bwd_case(n, k, d, dtype, skew=n >= 100)
    cw, cbw = 0.25, 1.0
    out = torch.full((n, d), float("nan"), dtype=dtype, device=DEVICE)
    gz, gc = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, cw, cbw, out=out)
    assert gz.dtype == z.dtype and gc.dtype == codebook.dtype and not gz.isnan().any()
    gz_t, gc_t = reference.vq_bwd(grad_zq, grad_loss, z, codebook, idx, cw, cbw)
    _assert_grads_close(gz, gz_t, dtype, "grad_z vs torch")
    _assert_grads_close(gc, gc_t, dtype, "grad_codebook vs torch")
    _, gz64, gc64 = vq_reference_fp64(z, codebook, idx, cw, cbw)
    _assert_grads_close(gz, grad_zq.double() + 1.7 * gz64, dtype, "grad_z vs fp64")
    _assert_grads_close(gc, 1.7 * gc64, dtype, "grad_codebook vs fp64")
    unused = torch.ones(k, dtype=torch.bool, device=DEVICE)
    unused[idx] = False
    assert (gc[unused] == 0).all(), "codes no row picked must get exactly zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vq_bwd_commitment_term_alone(dtype):
    # With dzq = 0 grad_z is the commitment term alone (~1e-4), which a tolerance scaled to dzq
    # (~1) could not see: check it at its own scale.
    n, k, d = 100, 31, 17
    _, grad_loss, z, codebook, idx = _bwd_case(n, k, d, dtype)
    zero = torch.zeros(n, d, dtype=dtype, device=DEVICE)
    gz, gc = kernels.vq_bwd(zero, grad_loss, z, codebook, idx, 0.25, 1.0)
    _, gz64, gc64 = vq_reference_fp64(z, codebook, idx, 0.25, 1.0)
    _assert_grads_close(gz, 1.7 * gz64, dtype, "commitment grad_z vs fp64")
    _assert_grads_close(gc, 1.7 * gc64, dtype, "grad_codebook vs fp64")


@pytest.mark.parametrize("n", [63, 64, 65, 128, 129, 300])
@pytest.mark.parametrize("impl", ["dot", "scan"])
def test_vq_bwd_scatter_chunk_boundaries(n, impl, monkeypatch):
    # Segments that start, end or span exactly at the 64-row chunk boundaries; "scan" runs the GPU
    # formulation (tl.associative_scan) through the interpreter, "dot" the interpreter's default.
    from fastvq.kernels import _segment

    monkeypatch.setattr(_segment, "SCAN_IMPL", impl)
    d, k = 3, 6
    z, codebook = _data(n, k, d, torch.float32)
    idx = torch.tensor([i * k // n for i in range(n)], device=DEVICE)  # runs of ~n/k rows once sorted
    if n > 70:
        idx[:70] = 2  # a run across the first chunk boundary
    idx = idx[torch.randperm(n, device=DEVICE)]  # the kernel sorts them back
    grad_zq = torch.randn(n, d, device=DEVICE)
    g = torch.tensor(0.3, device=DEVICE)
    gz, gc = kernels.vq_bwd(grad_zq, g, z, codebook, idx, 0.5, 2.0)
    gz_t, gc_t = reference.vq_bwd(grad_zq, g, z, codebook, idx, 0.5, 2.0)
    _assert_grads_close(gz, gz_t, torch.float32, "grad_z")
    _assert_grads_close(gc, gc_t, torch.float32, "grad_codebook")


def test_vq_bwd_all_rows_on_one_code():
    n, k, d = 300, 5, 4
    grad_zq, grad_loss, z, codebook, _ = _bwd_case(n, k, d, torch.float32)
    idx = torch.full((n,), 3, dtype=torch.int64, device=DEVICE)
    _, gc = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    _, gc_t = reference.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    _assert_grads_close(gc, gc_t, torch.float32, "grad_codebook")
    assert (gc[[0, 1, 2, 4]] == 0).all()


def test_vq_bwd_deterministic_and_no_codebook_grad():
    grad_zq, grad_loss, z, codebook, idx = _bwd_case(200, 7, 9, torch.float32, skew=True)
    gz1, gc1 = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    gz2, gc2 = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    assert torch.equal(gz1, gz2) and torch.equal(gc1, gc2)  # bitwise: no atomics
    gz3, gc3 = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0, False)
    assert gc3 is None and torch.equal(gz3, gz1)


def test_vq_bwd_strided_grad_and_zero_grad_loss():
    n, k, d = 50, 9, 6
    _, _, z, codebook, idx = _bwd_case(n, k, d, torch.float32)
    grad_zq = torch.ones(1, device=DEVICE).expand(n, d)  # stride (0, 0), as sum().backward() gives
    g = torch.zeros((), device=DEVICE)
    gz, gc = kernels.vq_bwd(grad_zq, g, z, codebook, idx, 0.25, 1.0)
    assert torch.equal(gz, torch.ones(n, d, device=DEVICE)) and (gc == 0).all()


def test_vq_bwd_errors():
    grad_zq, grad_loss, z, codebook, idx = _bwd_case(10, 4, 3, torch.float32)
    with pytest.raises(TypeError, match="grad_loss"):
        kernels.vq_bwd(grad_zq, 1.0, z, codebook, idx, 0.25, 1.0)
    with pytest.raises(TypeError, match="idx must be int64"):
        kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx.int(), 0.25, 1.0)
    with pytest.raises(ValueError, match="idx must have shape"):
        kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx[:5], 0.25, 1.0)
    with pytest.raises(ValueError, match="must agree"):
        kernels.vq_bwd(grad_zq[:, :2], grad_loss, z, codebook, idx, 0.25, 1.0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"idx must lie in \[0, 4\)"):
            kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx + 4, 0.25, 1.0)


# ---------------------------------------------------------------------------------------------
# End to end through fastvq.vector_quantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("needs_codebook_grad", [True, False])
def test_vector_quantize_triton_equals_torch(dtype, needs_codebook_grad):
    z0 = torch.randn(2, 37, 11).to(dtype).to(DEVICE)
    c0 = torch.randn(23, 11).to(dtype).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        z = z0.clone().requires_grad_(True)
        codebook = c0.clone().requires_grad_(needs_codebook_grad)
        zq, idx, loss = fastvq.vector_quantize(z, codebook, commitment_weight=0.3, backend=backend)
        (zq.float().square().sum() * 0.01 + loss).backward()
        results[backend] = (zq, idx, loss, z.grad, codebook.grad)
    (zq, idx, loss, gz, gc), (zq_t, idx_t, loss_t, gz_t, gc_t) = results["triton"], results["torch"]
    assert torch.equal(idx, idx_t) and torch.equal(zq, zq_t)
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-7)
    _assert_grads_close(gz, gz_t, dtype, "z.grad")
    if needs_codebook_grad:
        _assert_grads_close(gc, gc_t, dtype, "codebook.grad")
    else:
        assert gc is None and gc_t is None


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas ships for Linux")
def test_quantize_kernels_compile_for_gpu_targets():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "fastvq.kernels._compile_check", "--quick", "--arch", "90", "--only", "vq_bwd,segment"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("sm_90") == 4


# ---------------------------------------------------------------------------------------------
# Larger shapes: CUDA only (skipped elsewhere by conftest).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_vq_at_scale(dtype):
    n, k, d = 8193, 1031, 3
    grad_zq, grad_loss, z, codebook, _ = _bwd_case(n, k, d, dtype)
    zq, idx, sqerr = kernels.vq_fwd(z, codebook)
    assert torch.equal(zq, codebook[idx])
    assert_contract(idx[:512], z[:512], codebook, "l2")
    idx[: n // 2] = 7  # a popular code: one segment across many chunks
    gz, gc = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    gz_t, gc_t = reference.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    _assert_grads_close(gz, gz_t, dtype, "grad_z")
    _assert_grads_close(gc, gc_t, dtype, "grad_codebook")
    gz2, gc2 = kernels.vq_bwd(grad_zq, grad_loss, z, codebook, idx, 0.25, 1.0)
    assert torch.equal(gz, gz2) and torch.equal(gc, gc2)


@pytest.mark.gpu
def test_gpu_vq_bwd_int64_offsets():
    d = 8
    n = 2**31 // d + 4099
    z = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    codebook = torch.randn(37, d, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.randint(0, 37, (n,), device=DEVICE)
    grad_zq = torch.zeros(1, device=DEVICE, dtype=torch.bfloat16).expand(n, d)
    gz, gc = kernels.vq_bwd(grad_zq, torch.tensor(1.0, device=DEVICE), z, codebook, idx, 0.25, 1.0)
    tail = slice(n - 5000, n)
    want = (0.25 * 2.0 / (n * d)) * (z[tail].float() - codebook[idx[tail]].float())
    torch.testing.assert_close(gz[tail].float(), want, rtol=1e-2, atol=1e-12)
