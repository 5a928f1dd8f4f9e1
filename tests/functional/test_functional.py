"""vector_quantize and nearest_code through the functional API: loss, gradients, errors, dispatch."""

import pytest
import torch

import fastvq
from fastvq import kernels
from fastvq.functional import resolve_backend
from fastvq.testing import assert_contract, vq_reference_fp64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (37, 13, 3), (100, 67, 17), (64, 256, 40)])
@pytest.mark.parametrize("weights", [(0.25, 1.0), (1.3, 0.0), (0.0, 0.7)])
def test_vq_forward_and_backward_match_fp64(n, k, d, dtype, weights):
    beta, cw = weights
    z = torch.randn(n, d).to(dtype).requires_grad_(True)
    codebook = torch.randn(k, d).to(dtype).requires_grad_(True)
    zq, idx, loss = fastvq.vector_quantize(z, codebook, commitment_weight=beta, codebook_weight=cw, backend="torch")
    assert torch.equal(zq, codebook[idx])  # bitwise, not z + (e - z).detach()
    assert zq.dtype == dtype and loss.dtype == torch.float32 and loss.shape == ()
    assert_contract(idx, z, codebook)

    ref_loss, ref_gz, ref_gc = vq_reference_fp64(z, codebook, idx, beta, cw)
    # 16-bit: computed in fp32, rounded once to the input dtype (8 or 11 significant bits).
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rel, atol=0.0)
    # The loss gradients alone (dzq = 0), at a tolerance scaled to their own size.
    gz, gc = torch.autograd.grad(loss, (z, codebook), retain_graph=True)
    for got, ref in ((gz, ref_gz), (gc, ref_gc)):
        torch.testing.assert_close(got.double(), ref, rtol=rel, atol=rel * ref.abs().max().item() + 1e-30)
    # Straight-through alone: dzq reaches z unchanged and never the codebook.
    grad_zq = torch.randn(n, d).to(dtype)
    gz, gc = torch.autograd.grad(zq, (z, codebook), grad_zq)
    assert torch.equal(gz, grad_zq)
    assert not gc.any()


def test_gradcheck_float64():
    z = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    # Indices are piecewise constant in the inputs; random inputs at this size sit far from a
    # decision boundary compared with gradcheck's 1e-6 perturbation.
    # Stop-gradients are a convention finite differences cannot see: numerically both loss
    # terms depend on both inputs. Isolate each term, where convention and calculus agree.
    def commitment_only(z):
        return fastvq.vector_quantize(z, codebook.detach(), 0.3, 0.0, backend="torch")[2]

    def codebook_only(c):
        return fastvq.vector_quantize(z.detach(), c, 0.0, 0.8, backend="torch")[2]

    assert torch.autograd.gradcheck(commitment_only, (z,))
    assert torch.autograd.gradcheck(codebook_only, (codebook,))
    # zq is locally constant in z; its gradient to z is the identity by the straight-through rule.
    zq, _, _ = fastvq.vector_quantize(z, codebook, backend="torch")
    g = torch.randn_like(zq)
    (gz,) = torch.autograd.grad(zq, z, g)
    torch.testing.assert_close(gz, g)


def test_codebook_without_grad_gets_none_and_z_still_trains():
    z = torch.randn(20, 4, requires_grad=True)
    codebook = torch.randn(7, 4)
    zq, _, loss = fastvq.vector_quantize(z, codebook, backend="torch")
    (zq.sum() + loss).backward()
    assert z.grad is not None and codebook.grad is None


def test_loss_only_backward():
    z = torch.randn(20, 4, requires_grad=True)
    codebook = torch.randn(7, 4, requires_grad=True)
    _, idx, loss = fastvq.vector_quantize(z, codebook, backend="torch")
    loss.backward()
    _, ref_gz, ref_gc = vq_reference_fp64(z, codebook, idx, 0.25, 1.0)
    torch.testing.assert_close(z.grad.double(), ref_gz)
    torch.testing.assert_close(codebook.grad.double(), ref_gc)


def test_many_rows_on_one_code_accumulate():
    codebook = torch.randn(5, 6, requires_grad=True)
    z = codebook.detach()[2] + 0.01 * torch.randn(1000, 6)
    _, idx, loss = fastvq.vector_quantize(z, codebook, backend="torch")
    assert (idx == 2).all()
    loss.backward()
    _, _, ref_gc = vq_reference_fp64(z, codebook, idx, 0.25, 1.0)
    torch.testing.assert_close(codebook.grad.double(), ref_gc, rtol=1e-5, atol=1e-7)
    assert codebook.grad[[0, 1, 3, 4]].abs().max() == 0


def test_shapes_high_rank_and_empty():
    z = torch.randn(2, 3, 5, 4)
    zq, idx, loss = fastvq.vector_quantize(z, torch.randn(6, 4), backend="torch")
    assert zq.shape == z.shape and idx.shape == (2, 3, 5)
    zq, idx, loss = fastvq.vector_quantize(torch.randn(0, 4), torch.randn(6, 4), backend="torch")
    assert zq.shape == (0, 4) and loss.item() == 0.0


def test_mixed_dtypes_return_codebook_dtype():
    z = torch.randn(10, 8, dtype=torch.bfloat16)
    codebook = torch.randn(6, 8)
    zq, idx, _ = fastvq.vector_quantize(z, codebook, backend="torch")
    assert zq.dtype == torch.float32 and torch.equal(zq, codebook[idx])


BAD_INPUTS = [
    (lambda: ([1.0, 2.0], torch.randn(3, 2)), TypeError, "x must be a torch.Tensor"),
    (lambda: (torch.ones(4, 2, dtype=torch.int64), torch.randn(3, 2)), TypeError, "floating dtype.*int64"),
    (lambda: (torch.randn(4, 2), torch.ones(3, 2, dtype=torch.int32)), TypeError, "codebook.*int32"),
    (lambda: (torch.randn(4, 5), torch.randn(3, 2)), ValueError, r"D = 2.*\(4, 5\).*\(3, 2\)"),
    (lambda: (torch.randn(4, 2), torch.randn(3, 2, 1)), ValueError, r"codebook must be 2-D.*\(3, 2, 1\)"),
    (lambda: (torch.randn(4, 2), torch.randn(0, 2)), ValueError, "codebook is empty"),
    (lambda: (torch.tensor(1.0), torch.randn(3, 2)), ValueError, "at least 1 dimension"),
    (lambda: (torch.randn(4, 2), torch.randn(3, 2, device="meta")), ValueError, "on cpu but codebook is on meta"),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(make, exc, match):
    x, codebook = make()
    with pytest.raises(exc, match=match):
        fastvq.nearest_code(x, codebook)
    with pytest.raises(exc, match=match.replace("x must", "z must")):
        fastvq.vector_quantize(x, codebook)


def test_bad_options_raise():
    x, codebook = torch.randn(4, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="metric must be one of"):
        fastvq.nearest_code(x, codebook, metric="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvq.nearest_code(x, codebook, backend="cuda")
    with pytest.raises(ValueError, match="commitment_weight must be finite and >= 0, got -1"):
        fastvq.vector_quantize(x, codebook, commitment_weight=-1.0)
    with pytest.raises(ValueError, match="codebook_weight"):
        fastvq.vector_quantize(x, codebook, codebook_weight=float("nan"))


@pytest.mark.parametrize("where", ["x", "codebook"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_reported(where, bad):
    x, codebook = torch.randn(8, 3), torch.randn(5, 3)
    if where == "x":
        x[6, 1] = bad
    else:
        codebook[:, 0] = bad  # every code poisoned: whichever wins, the distance is not finite
    with pytest.raises(ValueError, match="non-finite values"):
        fastvq.nearest_code(x, codebook, backend="torch")
    with pytest.raises(ValueError, match="non-finite values"):
        fastvq.vector_quantize(x, codebook, backend="torch")


def test_backend_resolution_on_cpu():
    x = torch.randn(3, 2)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    assert resolve_backend("auto", x.double()) == "torch"
    if not kernels.AVAILABLE:
        with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
            resolve_backend("triton", x)
        return
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        resolve_backend("triton", x.double())
    assert resolve_backend("triton", x) == "triton"  # CPU tensors: the interpreter (conftest sets it)


class _FakeCudaTensor:
    """What resolve_backend reads of a tensor (device and dtype), for a CUDA tensor without a GPU."""

    is_cuda = True

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype


def test_auto_stays_on_torch_on_cuda_until_the_kernels_are_verified(monkeypatch):
    from fastvq.functional import dispatch

    monkeypatch.setattr(kernels, "AVAILABLE", True)  # as on a GPU machine with triton
    cuda = _FakeCudaTensor()
    assert dispatch.KERNELS_VERIFIED_ON_GPU is False  # flipped by the commit recording a passing GPU check
    assert resolve_backend("auto", cuda, cuda) == "torch"
    monkeypatch.setattr(dispatch, "KERNELS_VERIFIED_ON_GPU", True)
    assert resolve_backend("auto", cuda, cuda) == "triton"
    assert resolve_backend("auto", cuda, torch.randn(2, 2)) == "torch"  # a CPU tensor among them
    assert resolve_backend("auto", _FakeCudaTensor(torch.float64)) == "torch"  # no fp64 kernels


def test_code_stats_matches_a_loop():
    x = torch.randn(50, 3)
    idx = torch.randint(0, 7, (50,))
    counts, sums = fastvq.code_stats(x, idx, 7, backend="torch")
    for k in range(7):
        assert counts[k].item() == (idx == k).sum().item()
        torch.testing.assert_close(sums[k], x[idx == k].sum(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="idx shape"):
        fastvq.code_stats(x, idx[:3], 7)
    with pytest.raises(TypeError, match="int64"):
        fastvq.code_stats(x, idx.int(), 7)
