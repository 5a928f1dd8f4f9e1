"""fastvq.compat.taming.VectorQuantizer2 against taming's behaviour, written from the description.

The reference below is an independent fp64 implementation of the VQ-VAE layer as taming documents
it (dense distances, argmin, the two loss terms with beta on the codebook term for legacy=True and
on the commitment term for legacy=False, straight-through z_q); gradients come from torch.autograd
on it. Remap, index shapes and checkpoint keys are checked against their stated rules.
"""

import numpy as np
import pytest
import torch

import fastvq.compat.taming as taming_compat
from fastvq import kernels
from fastvq.compat.taming import VectorQuantizer2
from fastvq.testing import assert_contract

# (B, e_dim, H, W, n_e): one odd shape, the degenerate one, and one with more codes than positions.
SHAPES = [(3, 5, 7, 3, 37), (1, 1, 1, 1, 1), (2, 16, 4, 5, 64)]


def reference_fp64(z, weight, beta, legacy, grad_zq, idx=None):
    """taming's forward in fp64, and autograd's gradients of loss + <z_q, grad_zq> to z and weight.

    Returns (z_q (B, C, H, W), loss, idx (N,), grad_z, grad_weight). With ``idx`` given, those
    indices are used instead of the fp64 argmin (for inputs whose search ran in lower precision).
    """
    b, c, h, w = z.shape
    z64 = z.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    rows = z64.permute(0, 2, 3, 1).reshape(-1, c)  # (N, C)
    if idx is None:
        dist = ((rows.detach()[:, None, :] - w64.detach()[None, :, :]) ** 2).sum(-1)  # (N, K), from the difference
        idx = dist.argmin(1)
    e = w64[idx]  # (N, C)
    commitment = ((e.detach() - rows) ** 2).mean()  # pulls z towards its code
    codebook = ((e - rows.detach()) ** 2).mean()  # pulls the code towards z
    loss = commitment + beta * codebook if legacy else beta * commitment + codebook
    z_q = (rows + (e - rows).detach()).reshape(b, h, w, c).permute(0, 3, 1, 2)
    gz, gw = torch.autograd.grad(loss + (z_q * grad_zq.double()).sum(), (z64, w64))
    return z_q.detach(), loss.detach(), idx, gz, gw


def make_module(n_e, e_dim, beta=0.25, dtype=torch.float32, **kwargs):
    vq = VectorQuantizer2(n_e, e_dim, beta, **kwargs)
    with torch.no_grad():  # codes spread like the inputs, so that assignments vary
        vq.embedding.weight.copy_(torch.randn(n_e, e_dim))
    return vq.to(dtype)


def save_used(tmp_path, used):
    path = tmp_path / "used.npy"
    np.save(path, np.asarray(used, dtype=np.int64))
    return str(path)


def backends():
    out = ["torch", "auto"]
    if kernels.AVAILABLE and (torch.cuda.is_available() or kernels.interpreter_active()):
        out.append("triton")
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("beta", [0.25, 1.7])
def test_forward_and_gradients_match_fp64_reference(shape, legacy, beta):
    b, c, h, w, n_e = shape
    vq = make_module(n_e, c, beta, dtype=torch.float64, legacy=legacy)
    z = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    z_q, loss, (perplexity, min_encodings, idx) = vq(z)
    assert perplexity is None and min_encodings is None  # taming's VectorQuantizer2 computes neither
    assert z_q.shape == (b, c, h, w) and z_q.is_contiguous() and loss.shape == ()
    assert idx.shape == (b * h * w,) and idx.dtype == torch.int64

    grad_zq = torch.randn(b, c, h, w, dtype=torch.float64)
    ref_zq, ref_loss, ref_idx, ref_gz, ref_gw = reference_fp64(z, vq.embedding.weight, beta, legacy, grad_zq)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(z_q, ref_zq, rtol=0, atol=1e-15)
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(-1, c), vq.embedding.weight[idx])  # the codes, bitwise
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    (loss + (z_q * grad_zq).sum()).backward()
    torch.testing.assert_close(z.grad, ref_gz, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(vq.embedding.weight.grad, ref_gw, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("legacy", [True, False])
def test_float32_backends_meet_the_contract(backend, legacy):
    b, c, h, w, n_e = SHAPES[0]
    vq = make_module(n_e, c, 0.4, legacy=legacy, backend=backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    vq = vq.to(device)
    z = torch.randn(b, c, h, w, device=device, requires_grad=True)
    z_q, loss, (_, _, idx) = vq(z)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, c)
    assert_contract(idx, rows, vq.embedding.weight.detach())
    grad_zq = torch.randn_like(z)
    _, ref_loss, _, ref_gz, ref_gw = reference_fp64(z, vq.embedding.weight, 0.4, legacy, grad_zq, idx=idx)
    (loss + (z_q * grad_zq).sum()).backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(z.grad.double(), ref_gz, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embedding.weight.grad.double(), ref_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_puts_beta_on_the_codebook_term(legacy):
    # Closed form of the loss-only gradients, without autograd: with M = numel(z),
    #   d/dz = w_commit * 2 (z - e) / M,   d/de_k = w_codebook * 2 sum_{i: idx_i = k} (e_k - z_i) / M.
    beta = 0.3
    vq = make_module(11, 4, beta, dtype=torch.float64, legacy=legacy)
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    _, loss, (_, _, idx) = vq(z)
    gz, gw = torch.autograd.grad(loss, (z, vq.embedding.weight))
    w_commit, w_codebook = (1.0, beta) if legacy else (beta, 1.0)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    e = vq.embedding.weight.detach()[idx]
    m = z.numel()
    expect_gz = (w_commit * 2 * (rows - e) / m).reshape(2, 3, 5, 4).permute(0, 3, 1, 2)
    expect_gw = torch.zeros(11, 4, dtype=torch.float64).index_add_(0, idx, w_codebook * 2 * (e - rows) / m)
    torch.testing.assert_close(gz, expect_gz, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gw, expect_gw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, (1 + beta) * ((rows - e) ** 2).mean(), rtol=1e-12, atol=0)


def test_forward_runs_the_fused_op(monkeypatch):
    calls = []
    real = taming_compat.vector_quantize

    def spy(z, codebook, **kwargs):
        calls.append(kwargs)
        return real(z, codebook, **kwargs)

    monkeypatch.setattr(taming_compat, "vector_quantize", spy)
    vq = make_module(9, 3, 0.2, legacy=False, backend="torch")
    vq(torch.randn(2, 3, 4, 4))
    assert calls == [{"commitment_weight": 0.2, "codebook_weight": 1.0, "backend": "torch"}]


def test_output_dtype_is_promoted_like_taming():
    # taming's z + (z_q - z).detach() promotes: the wider of the features' and the codebook's dtype.
    vq = make_module(7, 3)
    z_q, loss, _ = vq(torch.randn(2, 3, 4, 4).half())
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32
    vq = vq.to(torch.bfloat16)
    z_q, _, (_, _, idx) = vq(torch.randn(2, 3, 4, 4))
    assert z_q.dtype == torch.float32
    assert torch.equal(z_q.permute(0, 2, 3, 1).reshape(-1, 3), vq.embedding.weight[idx].float())  # exact upcast


def test_sane_index_shape():
    b, c, h, w, n_e = SHAPES[0]
    vq_flat = make_module(n_e, c)
    vq_sane = make_module(n_e, c, sane_index_shape=True)
    vq_sane.load_state_dict(vq_flat.state_dict())
    z = torch.randn(b, c, h, w)
    idx_flat = vq_flat(z)[2][2]
    idx_sane = vq_sane(z)[2][2]
    assert idx_flat.shape == (b * h * w,) and idx_sane.shape == (b, h, w)
    assert torch.equal(idx_sane.reshape(-1), idx_flat)  # row-major over (B, H, W)
    rows = z.permute(0, 2, 3, 1)  # index [b, i, j] is the code of z[b, :, i, j]
    assert torch.equal(idx_sane[2, 6, 1], ((rows[2, 6, 1] - vq_sane.embedding.weight) ** 2).sum(-1).argmin())


def expected_remap(codes, used, unknown):
    """Position of each code in ``used`` (the first if listed twice), else ``unknown``; by a loop."""
    used = list(used)
    return torch.tensor([used.index(k) if k in used else unknown for k in codes.tolist()])


def test_remap_extra_and_round_trip(tmp_path):
    b, c, h, w, n_e = SHAPES[0]
    used = [30, 2, 17, 5, 2, 36, 11, 0, 23, 8]  # unsorted, code 2 twice, most codes missing
    vq = make_module(n_e, c, remap=save_used(tmp_path, used), unknown_index="extra", sane_index_shape=False)
    assert vq.re_embed == len(used) + 1 and vq.unknown_index == len(used)
    assert set(vq.state_dict()) == {"embedding.weight", "used"}
    z = torch.randn(b, c, h, w)
    z_q, _, (_, _, idx) = vq(z)
    codes = reference_fp64(z, vq.embedding.weight, 0.25, True, torch.zeros_like(z))[2]
    assert idx.shape == (b * h * w, 1)  # taming's shape with remap
    expect = expected_remap(codes, used, len(used))
    assert torch.equal(idx.reshape(-1), expect)
    assert (expect == len(used)).any() and (expect < len(used)).any()  # both branches exercised

    idx_before = idx.clone()
    back = vq.get_codebook_entry(idx.reshape(-1), None)  # (N, C)
    assert torch.equal(idx, idx_before)  # the extra index is not zeroed in the caller's tensor
    unmapped = torch.tensor([used[i] if i < len(used) else used[0] for i in idx.reshape(-1).tolist()])
    assert torch.equal(back, vq.embedding.weight[unmapped])  # the "extra" index reads used[0], as taming
    known = expect < len(used)
    rows_q = z_q.permute(0, 2, 3, 1).reshape(-1, c)
    assert torch.equal(back[known], rows_q[known])


def test_remap_random_draws_like_taming(tmp_path):
    b, c, h, w, n_e = SHAPES[0]
    used = [4, 9, 21, 33, 1]
    vq = make_module(n_e, c, remap=save_used(tmp_path, used), sane_index_shape=True)
    assert vq.re_embed == len(used)
    z = torch.randn(b, c, h, w)
    codes = reference_fp64(z, vq.embedding.weight, 0.25, True, torch.zeros_like(z))[2]
    unknown = torch.tensor([k not in used for k in codes.tolist()])
    assert unknown.any() and not unknown.all()
    torch.manual_seed(123)
    idx = vq(z)[2][2]
    assert idx.shape == (b, h, w)
    flat = idx.reshape(-1)
    assert torch.equal(flat[~unknown], expected_remap(codes, used, -1)[~unknown])
    # taming draws uniform in [0, len(used)) from the global CPU generator, one per unknown code.
    torch.manual_seed(123)
    assert torch.equal(flat[unknown], torch.randint(0, len(used), size=(int(unknown.sum()),)))


def test_remap_integer_unknown_index(tmp_path):
    used = [0, 3, 6, 3]  # code 3 listed twice: its first position (1) is the one returned
    vq = make_module(8, 2, remap=save_used(tmp_path, used), unknown_index=3)
    inds = torch.tensor([[6, 5, 0], [3, 7, 6]])
    out = vq.remap_to_used(inds)
    assert torch.equal(out, torch.tensor([[2, 3, 0], [1, 3, 2]]))
    before = out.clone()
    assert torch.equal(vq.unmap_to_all(out), torch.tensor([[6, 3, 0], [3, 3, 6]]))
    assert torch.equal(out, before)  # not modified in place


@pytest.mark.parametrize("sane", [False, True])
def test_get_codebook_entry_round_trip(sane):
    b, c, h, w, n_e = SHAPES[0]
    vq = make_module(n_e, c, sane_index_shape=sane)
    z = torch.randn(b, c, h, w)
    z_q, _, (_, _, idx) = vq(z)
    out = vq.get_codebook_entry(idx, (b, h, w, c))
    assert out.shape == (b, c, h, w) and out.is_contiguous()
    assert torch.equal(out, z_q)
    flat = vq.get_codebook_entry(idx.reshape(-1), None)
    assert flat.shape == (b * h * w, c) and torch.equal(flat, vq.embedding.weight[idx.reshape(-1)])
    (g,) = torch.autograd.grad(out.sum(), vq.embedding.weight)  # differentiable, like nn.Embedding
    assert torch.equal(g.sum(1), torch.bincount(idx.reshape(-1), minlength=n_e).float() * c)


def test_taming_state_dict_loads_strictly_and_reproduces(tmp_path):
    b, c, h, w, n_e = SHAPES[0]
    weight = torch.randn(n_e, c, dtype=torch.float64)
    vq = VectorQuantizer2(n_e, c, 0.25).double()
    assert set(vq.state_dict()) == {"embedding.weight"}
    vq.load_state_dict({"embedding.weight": weight.clone()}, strict=True)  # a taming checkpoint's keys
    z = torch.randn(b, c, h, w, dtype=torch.float64)
    z_q, loss, (_, _, idx) = vq(z)
    ref_zq, ref_loss, ref_idx, _, _ = reference_fp64(z, weight, 0.25, True, torch.zeros_like(z))
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(z_q, ref_zq, rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="embedding.weight"):  # a renamed key cannot pass silently
        vq.load_state_dict({"codebook": weight}, strict=True)

    used = [3, 1, 4]
    vq_r = VectorQuantizer2(n_e, c, 0.25, remap=save_used(tmp_path, used), unknown_index="extra").double()
    with torch.no_grad():
        vq_r.used.zero_()  # so that loading must restore it
    vq_r.load_state_dict({"embedding.weight": weight, "used": torch.tensor(used)}, strict=True)
    assert torch.equal(vq_r.used, torch.tensor(used))
    expect = expected_remap(ref_idx, used, len(used))
    assert torch.equal(vq_r(z)[2][2].reshape(-1), expect)


def test_initialisation_like_taming():
    n_e = 512
    vq = VectorQuantizer2(n_e, 64, 0.25)
    weight = vq.embedding.weight
    assert isinstance(vq.embedding, torch.nn.Embedding) and weight.shape == (n_e, 64)
    assert weight.abs().max() <= 1.0 / n_e
    assert weight.max() > 0.9 / n_e and weight.min() < -0.9 / n_e  # uniform over the whole range
    assert abs(weight.mean().item()) < 0.05 / n_e


def _bad_npy(tmp_path, arr):
    path = tmp_path / "bad.npy"
    np.save(path, arr)
    return str(path)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda p: VectorQuantizer2(8.0, 3, 0.25), TypeError, "n_e"),
        (lambda p: VectorQuantizer2(8, 0, 0.25), ValueError, "e_dim"),
        (lambda p: VectorQuantizer2(8, 3, -0.1), ValueError, "beta"),
        (lambda p: VectorQuantizer2(8, 3, "0.25"), TypeError, "beta"),
        (lambda p: VectorQuantizer2(8, 3, 0.25, unknown_index="zero"), ValueError, "unknown_index"),
        (
            lambda p: VectorQuantizer2(8, 3, 0.25, remap=_bad_npy(p, np.arange(3)), unknown_index=3),
            ValueError,
            "unknown_index",
        ),
        (lambda p: VectorQuantizer2(8, 3, 0.25, remap=_bad_npy(p, np.array([1, 8]))), ValueError, "remap"),
        (lambda p: VectorQuantizer2(8, 3, 0.25, remap=_bad_npy(p, np.ones((2, 2), dtype=int))), ValueError, "remap"),
        (lambda p: VectorQuantizer2(8, 3, 0.25, remap=_bad_npy(p, np.array([0.5]))), ValueError, "remap"),
        (lambda p: VectorQuantizer2(8, 3, 0.25, remap=np.arange(3)), TypeError, "remap"),
        (lambda p: VectorQuantizer2(8, 3, 0.25, backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(tmp_path, make, exc, match):
    with pytest.raises(exc, match=match):
        make(tmp_path)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda vq: vq(torch.randn(2, 3, 4)), ValueError, "z"),
        (lambda vq: vq(torch.randn(2, 4, 4, 4)), ValueError, "e_dim"),
        (lambda vq: vq(torch.randint(0, 3, (2, 3, 4, 4))), TypeError, "z"),
        (lambda vq: vq([[1.0]]), TypeError, "z"),
        (lambda vq: vq(torch.randn(2, 3, 4, 4), temp=0.5), ValueError, "temp"),
        (lambda vq: vq(torch.randn(2, 3, 4, 4), rescale_logits=True), ValueError, "rescale_logits"),
        (lambda vq: vq(torch.randn(2, 3, 4, 4), return_logits=True), ValueError, "return_logits"),
        (lambda vq: vq.get_codebook_entry(torch.tensor([8]), None), ValueError, "indices"),
        (lambda vq: vq.get_codebook_entry(torch.tensor([1.0]), None), TypeError, "indices"),
        (lambda vq: vq.get_codebook_entry(torch.zeros(6, dtype=torch.long), (1, 2, 3)), ValueError, "shape"),
        (lambda vq: vq.get_codebook_entry(torch.zeros(6, dtype=torch.long), (1, 2, 1, 3)), ValueError, "shape"),
        (lambda vq: vq.get_codebook_entry(torch.zeros(6, dtype=torch.long), (1, 3, 3, 2)), ValueError, "shape"),
    ],
)
def test_bad_call_arguments_name_the_argument(call, exc, match):
    vq = VectorQuantizer2(8, 3, 0.25)
    with pytest.raises(exc, match=match):
        call(vq)
