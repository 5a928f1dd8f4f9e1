"""Assignment alone: nearest codes per head against an fp64 brute force, for shared and per-head
codebooks, with the VQ-VAE loss written out."""

import pytest
import torch

from fastvq.quantizers.assignment import lookup, nearest


def _reference(z, books):
    """fp64 brute force: idx (..., H), loss terms sum over heads of mean squared error."""
    heads = z.shape[-2]
    idx = torch.empty(z.shape[:-1], dtype=torch.int64)
    for h in range(heads):
        book = books[0] if books.shape[0] == 1 else books[h]
        d = ((z[..., h, None, :].double() - book.double()) ** 2).sum(-1)  # (..., K)
        idx[..., h] = d.argmin(-1)
    return idx


@pytest.mark.parametrize("num_books", [1, 3])
def test_nearest_matches_brute_force(num_books):
    torch.manual_seed(0)
    z = torch.randn(2, 9, 3, 5)  # (B, N, H, D), odd sizes
    books = torch.randn(num_books, 11, 5, requires_grad=True)
    zq, idx, loss = nearest(z, books, commitment_weight=0.3, codebook_weight=0.7, backend="torch")
    assert idx.shape == (2, 9, 3) and idx.dtype == torch.int64 and zq.shape == z.shape
    assert torch.equal(idx, _reference(z, books.detach()))
    chosen = torch.stack([books[0 if num_books == 1 else h][idx[..., h]] for h in range(3)], dim=-2)
    assert torch.equal(zq, chosen.detach())  # the code, bitwise
    expected = (0.3 + 0.7) * ((z.double() - chosen.detach().double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected)
    # codebook term: d/d e_k of 0.7 mean((sg(z) - e)^2) over the rows that chose e_k
    loss.backward()
    expected_grad = torch.zeros(num_books, 11, 5, dtype=torch.float64)
    diff = (chosen.detach().double() - z.double()) * 2 * 0.7 / z.numel()
    for h in range(3):
        b = 0 if num_books == 1 else h
        expected_grad[b].index_add_(0, idx[..., h].reshape(-1), diff[..., h, :].reshape(-1, 5))
    torch.testing.assert_close(books.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


def test_straight_through_to_the_input():
    z = torch.randn(4, 2, 3, requires_grad=True)
    books = torch.randn(2, 6, 3)
    zq, _, _ = nearest(z, books, 0.0, 0.0, backend="torch")
    g = torch.randn_like(zq)
    (gz,) = torch.autograd.grad(zq, z, g)
    assert torch.equal(gz, g)


def test_books_must_match_the_heads():
    with pytest.raises(ValueError, match="books must hold 1 or 3 codebooks"):
        nearest(torch.randn(4, 3, 2), torch.randn(2, 5, 2), 0.25, 1.0, backend="torch")


@pytest.mark.parametrize("num_books", [1, 3])
def test_lookup_inverts_nearest(num_books):
    z = torch.randn(4, 5, 3, 2)
    books = torch.randn(num_books, 9, 2)
    zq, idx, _ = nearest(z, books, 0.25, 1.0, backend="torch")
    assert torch.equal(lookup(books, idx), zq)
    idx = torch.randint(0, 9, (6, 3), dtype=torch.int32)
    expected = torch.stack([books[0 if num_books == 1 else h][idx[:, h].long()] for h in range(3)], dim=1)
    assert torch.equal(lookup(books, idx), expected)
