"""Orthogonal regularisation: the loss against eq. (2) of Shin et al. 2021 written out in fp64 over
all n^2 pairs, and the code selection against vector-quantize-pytorch's procedure."""

import pytest
import torch

from fastvq.quantizers.regularizers import orthogonal_loss, orthogonal_reg_codes


def _reference_loss(codes: torch.Tensor) -> torch.Tensor:
    """Eq. (2): sum over books and all pairs (i, j) of cos^2(c_i, c_j) / (H n^2) - 1 / n, in fp64."""
    c = codes.double()
    h, n, _ = c.shape
    total = c.new_zeros(())
    for b in range(h):
        for i in range(n):
            cos = (c[b] @ c[b, i]) / (c[b].norm(dim=-1) * c[b, i].norm())  # (n,)
            total = total + cos.square().sum()
    return total / (h * n * n) - 1.0 / n


@pytest.mark.parametrize("shape", [(3, 37, 5), (2, 4, 11), (1, 1, 3), (2, 9, 9)])
def test_orthogonal_loss_value_and_gradient_against_the_pairwise_reference(shape):
    codes = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    loss = orthogonal_loss(codes)
    ref_codes = codes.detach().clone().requires_grad_()
    expected = _reference_loss(ref_codes)
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected)
    g = torch.randn(())
    (grad,) = torch.autograd.grad(loss, codes, g)
    (ref_grad,) = torch.autograd.grad(expected, ref_codes, g)
    torch.testing.assert_close(grad, ref_grad)


def test_orthogonal_loss_float32_matches_fp64():
    codes = torch.randn(2, 300, 7)  # n > D: the D x D Gram path
    torch.testing.assert_close(orthogonal_loss(codes).double(), _reference_loss(codes), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n, dim", [(5, 5), (3, 8), (1, 4)])
def test_orthogonal_loss_is_zero_for_orthogonal_codes_of_any_norm(n, dim):
    q, _ = torch.linalg.qr(torch.randn(2, dim, n, dtype=torch.float64))  # orthonormal columns
    codes = q.transpose(1, 2) * torch.rand(2, n, 1, dtype=torch.float64).add(0.5)  # any positive norms
    torch.testing.assert_close(orthogonal_loss(codes), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def test_orthogonal_loss_is_positive_for_parallel_codes():
    codes = torch.randn(1, 1, 6).expand(1, 4, 6) * torch.tensor([1.0, -2.0, 3.0, 0.5])[None, :, None]
    torch.testing.assert_close(orthogonal_loss(codes), torch.tensor(1.0 - 1.0 / 4))  # every cos^2 is 1


def test_orthogonal_loss_edge_cases():
    zero = torch.zeros(1, 3, 4, requires_grad=True)  # zero codes normalise to zero: finite
    loss = orthogonal_loss(zero)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, zero)[0]).all()
    empty = torch.zeros(2, 0, 4, requires_grad=True)
    assert orthogonal_loss(empty).item() == 0.0 and orthogonal_loss(empty).requires_grad
    with pytest.raises(ValueError, match="codes must be 3-D"):
        orthogonal_loss(torch.randn(4, 3))
    with pytest.raises(TypeError, match="codes"):
        orthogonal_loss(torch.ones(1, 2, 3, dtype=torch.int64))


def test_orthogonal_loss_matches_the_peer():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    for shape in [(1, 129, 16), (4, 7, 33)]:
        codes = torch.randn(shape)
        torch.testing.assert_close(orthogonal_loss(codes), peer.orthogonal_loss_fn(codes), atol=1e-6, rtol=1e-5)


def test_active_codes_are_the_used_ones_and_minus_one_is_ignored():
    codebook = torch.randn(1, 13, 3, requires_grad=True)
    indices = torch.tensor([[7, -1, 2], [7, 11, -1]])
    picked = orthogonal_reg_codes(codebook, indices, active_codes_only=True, max_codes=None)
    assert torch.equal(picked, codebook[:, [2, 7, 11]])
    (grad,) = torch.autograd.grad(picked.sum(), codebook)
    assert torch.equal(grad[0].sum(-1) != 0, torch.isin(torch.arange(13), torch.tensor([2, 7, 11])))
    assert orthogonal_reg_codes(codebook, -torch.ones(4, dtype=torch.long), True, None).shape == (1, 0, 3)


def test_all_codes_without_selection_and_per_head_books_allowed():
    codebook = torch.randn(3, 10, 4)
    assert orthogonal_reg_codes(codebook, None, active_codes_only=False, max_codes=None) is codebook
    assert orthogonal_reg_codes(codebook, None, active_codes_only=False, max_codes=10) is codebook


def test_random_subset_is_a_reproducible_draw_of_distinct_codes():
    codebook = torch.randn(2, 41, 5)
    picked = orthogonal_reg_codes(codebook, None, False, 9, generator=torch.Generator().manual_seed(3))
    again = orthogonal_reg_codes(codebook, None, False, 9, generator=torch.Generator().manual_seed(3))
    assert picked.shape == (2, 9, 5) and torch.equal(picked, again)
    ids = torch.randperm(41, generator=torch.Generator().manual_seed(3))[:9]
    assert torch.equal(picked, codebook[:, ids]) and ids.unique().numel() == 9


def test_selection_consumes_the_global_rng_as_the_peer():
    # the peer: codes = codebook[:, unique(idx)]; then codes[:, randperm(n, device)[:max]] if n > max
    codebook = torch.randn(1, 50, 6)
    indices = torch.randint(0, 50, (4, 17))
    torch.manual_seed(11)
    picked = orthogonal_reg_codes(codebook, indices, True, 8)
    torch.manual_seed(11)
    active = codebook[:, torch.unique(indices)]
    expected = active[:, torch.randperm(active.shape[1])[:8]]
    assert torch.equal(picked, expected)


def test_orthogonal_loss_of_the_peer_quantizer():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    vq = vqp.VectorQuantize(dim=6, codebook_size=40, orthogonal_reg_weight=1.0, commitment_weight=0.0,
                            orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=5)
    vq.train()
    x = torch.randn(3, 23, 6)
    torch.manual_seed(5)
    _, indices, loss = vq(x)
    torch.manual_seed(5)
    codes = orthogonal_reg_codes(vq._codebook.embed, indices, True, 5)
    torch.testing.assert_close(orthogonal_loss(codes), loss.reshape(()), atol=1e-6, rtol=1e-5)


def test_selection_errors():
    with pytest.raises(ValueError, match="separate per-head"):
        orthogonal_reg_codes(torch.randn(2, 5, 3), torch.zeros(4, dtype=torch.long), True, None)
    with pytest.raises(ValueError, match="max_codes must be a positive int"):
        orthogonal_reg_codes(torch.randn(1, 5, 3), None, False, 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        orthogonal_reg_codes(torch.randn(1, 5, 3), torch.tensor([0, 5]), True, None)
    with pytest.raises(TypeError, match="indices must"):
        orthogonal_reg_codes(torch.randn(1, 5, 3), None, True, None)
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        orthogonal_reg_codes(torch.randn(1, 5, 3), torch.zeros(3), True, None)
    with pytest.raises(ValueError, match="codebook must be 3-D"):
        orthogonal_reg_codes(torch.randn(5, 3), None, False, None)
