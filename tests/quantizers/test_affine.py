"""Affine codebook statistics: the running statistics against a hand-written fp64 EMA, the two maps
against their formulas, and buffers, keys and values against vector-quantize-pytorch's Codebook."""

import pytest
import torch

from fastvq.quantizers.affine import affine_codes, affine_rows, register_affine_buffers, update_affine_
from fastvq.quantizers.codebook import Codebook


def _book(books=2, size=11, dim=5, dtype=torch.float32):
    book = Codebook(torch.randn(books, size, dim, dtype=dtype), learnable=False, initted=True)
    register_affine_buffers(book, books, dim)
    return book


def _moments(t):
    """Mean and population variance over axis 1, written out: sum / M and sum of squares / M."""
    t = t.double()
    mean = t.sum(1, keepdim=True) / t.shape[1]
    return mean, ((t - mean) ** 2).sum(1, keepdim=True) / t.shape[1]


def _close_fp32(actual, expected):
    """fp32 results against an fp64 reference: fp32's rounding, not fp64's default tolerance."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_registered_buffers_have_the_peer_names_shapes_and_initial_state():
    book = _book(books=3, dim=7)
    assert book.batch_mean is None and book.batch_variance is None
    assert "batch_mean" in book._buffers and "batch_variance" in book._buffers  # registered, as None
    for name in ("codebook_mean", "codebook_variance"):
        assert getattr(book, name).shape == (3, 1, 7)
        flag = getattr(book, name + "_needs_init")
        assert flag.shape == () and flag.dtype == torch.bool and bool(flag)
    keys = set(book.state_dict())
    assert {"codebook_mean", "codebook_variance", "codebook_mean_needs_init", "codebook_variance_needs_init"} <= keys
    assert "batch_mean" not in keys and "batch_variance" not in keys  # None until the first update
    with pytest.raises(ValueError, match="already has affine buffers"):
        register_affine_buffers(book, 3, 7)


def test_three_updates_follow_the_hand_written_ema():
    book = _book(books=2, size=11, dim=5)
    batch_decay, codebook_decay = 0.8, 0.6
    expected = {}
    steps = [(torch.randn(2, 37, 5) * 3 + 1, torch.randn(2, 11, 5), True),
             (torch.randn(2, 37, 5), torch.randn(2, 11, 5) * 2, True),
             (torch.randn(2, 37, 5) - 2, torch.randn(2, 11, 5), False)]  # the last in evaluation
    for step, (rows, codes, training) in enumerate(steps):
        update_affine_(book, rows, codes, training, batch_decay, codebook_decay)
        new = {"batch": _moments(rows)}
        if training:
            new["codebook"] = _moments(codes)
        for kind, (mean, var) in new.items():
            decay = batch_decay if kind == "batch" else codebook_decay
            if step == 0:
                expected[kind] = [mean, var]
            else:
                olds = expected[kind]
                expected[kind] = [o * decay + f * (1 - decay) for o, f in zip(olds, (mean, var), strict=True)]
        for kind in ("batch", "codebook"):
            _close_fp32(getattr(book, f"{kind}_mean"), expected[kind][0])
            _close_fp32(getattr(book, f"{kind}_variance"), expected[kind][1])
    assert not bool(book.codebook_mean_needs_init) and not bool(book.codebook_variance_needs_init)


def test_an_empty_batch_leaves_the_batch_statistics_and_updates_in_place():
    book = _book(books=1, dim=3)
    update_affine_(book, torch.randn(1, 9, 3), torch.randn(1, 11, 3), True, 0.9, 0.9)
    mean, cb_mean = book.batch_mean.clone(), book.codebook_mean
    update_affine_(book, torch.randn(1, 0, 3), torch.randn(1, 11, 3), True, 0.9, 0.9)
    assert torch.equal(book.batch_mean, mean)
    assert book.codebook_mean is cb_mean  # the same tensor, updated in place


def _reference_maps(book, t):
    """Both maps in fp64 from the buffers: (codes map of t, rows map of t)."""
    cm, cv, bm, bv = (getattr(book, n).double() for n in ("codebook_mean", "codebook_variance", "batch_mean",
                                                           "batch_variance"))
    cs, bs = cv.clamp(min=1e-5).sqrt(), bv.clamp(min=1e-5).sqrt()
    t = t.double()
    return (t - cm) * bs / cs + bm, (t - bm) * cs / bs + cm


def test_maps_against_their_formulas_with_a_constant_dimension():
    book = _book(books=2, size=11, dim=5)
    rows = torch.randn(2, 41, 5) * 4 + 3
    rows[..., 2] = 0.5  # variance 0: the clamp keeps it finite
    codes = torch.randn(2, 11, 5, requires_grad=True)
    update_affine_(book, rows, codes, True, 0.99, 0.9)
    ref_codes, _ = _reference_maps(book, codes.detach())
    _, ref_rows = _reference_maps(book, rows)
    mapped = affine_codes(book, codes)
    _close_fp32(mapped, ref_codes)
    _close_fp32(affine_rows(book, rows), ref_rows)
    # gradient to the codes is the per-dimension scale s_b / s_c
    (grad,) = torch.autograd.grad(mapped.sum(), codes)
    scale = (book.batch_variance.clamp(min=1e-5).sqrt() / book.codebook_variance.clamp(min=1e-5).sqrt())
    torch.testing.assert_close(grad, scale.expand_as(grad))


def test_maps_invert_each_other_and_are_the_identity_when_statistics_coincide():
    book = _book(books=3, size=13, dim=4, dtype=torch.float64)
    book.double()
    rows = torch.randn(3, 29, 4, dtype=torch.float64) * 2 - 1
    codes = torch.randn(3, 13, 4, dtype=torch.float64)
    update_affine_(book, rows, codes, True, 0.5, 0.5)
    torch.testing.assert_close(affine_rows(book, affine_codes(book, codes)), codes)
    torch.testing.assert_close(affine_codes(book, affine_rows(book, rows)), rows)
    same = _book(books=3, size=13, dim=4, dtype=torch.float64)
    same.double()
    update_affine_(same, codes, codes, True, 0.5, 0.5)  # batch statistics == codebook statistics
    torch.testing.assert_close(affine_codes(same, codes), codes)
    torch.testing.assert_close(affine_rows(same, rows), rows)


def test_heads_last_rows_map_as_the_books_first_layout():
    book = _book(books=3, size=7, dim=4)
    update_affine_(book, torch.randn(3, 20, 4) * 2, torch.randn(3, 7, 4), True, 0.9, 0.9)
    rows = torch.randn(2, 5, 3, 4)  # (B, N, H, D), one codebook per head
    per_book = rows.reshape(-1, 3, 4).transpose(0, 1)  # (H, M, D)
    expected = affine_rows(book, per_book).transpose(0, 1).reshape(2, 5, 3, 4)
    torch.testing.assert_close(affine_rows(book, rows, books_axis=-2), expected)
    back = affine_codes(book, affine_rows(book, rows, books_axis=2), books_axis=2)
    torch.testing.assert_close(back, rows)
    shared = _book(books=1, size=7, dim=4)  # one codebook shared by 3 heads: statistics broadcast
    update_affine_(shared, torch.randn(1, 20, 4), torch.randn(1, 7, 4), True, 0.9, 0.9)
    torch.testing.assert_close(affine_rows(shared, rows, books_axis=-2), affine_rows(shared, rows.reshape(1, -1, 4))
                               .reshape(2, 5, 3, 4))
    for axis in (-1, 3, 4, True):
        with pytest.raises(ValueError, match="books_axis must be an axis of rows other than the last"):
            affine_rows(book, rows, books_axis=axis)
    with pytest.raises(ValueError, match="rows must have 3 codebooks on axis 0"):
        affine_rows(book, rows)


def test_errors():
    book = _book(books=2, dim=5)
    with pytest.raises(RuntimeError, match="no batch values yet"):
        affine_codes(book, torch.randn(2, 11, 5))
    with pytest.raises(NotImplementedError, match="sync_affine_param"):
        update_affine_(book, torch.randn(2, 3, 5), torch.randn(2, 11, 5), True, 0.9, 0.9, sync=True)
    with pytest.raises(ValueError, match=r"rows must have shape \(2, \*, 5\)"):
        update_affine_(book, torch.randn(1, 3, 5), torch.randn(2, 11, 5), True, 0.9, 0.9)
    with pytest.raises(ValueError, match="batch_decay must be a float in"):
        update_affine_(book, torch.randn(2, 3, 5), torch.randn(2, 11, 5), True, 1.5, 0.9)
    with pytest.raises(TypeError, match="codes must"):
        update_affine_(book, torch.randn(2, 3, 5), torch.ones(2, 11, 5, dtype=torch.long), True, 0.9, 0.9)
    with pytest.raises(ValueError, match="books must be a positive int"):
        register_affine_buffers(Codebook(torch.randn(1, 3, 2), learnable=False, initted=True), 0, 2)


def _peer_book_after_one_forward(dim, size, x, decay=0.8):
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    pbook = peer.Codebook(dim, size, affine_param=True, decay=decay, threshold_ema_dead_code=0,
                          affine_param_batch_decay=0.7, affine_param_codebook_decay=0.6)
    pbook.train()
    embed0 = pbook.embed.detach().clone()
    quantize, idx, _ = pbook(x)
    return pbook, embed0, quantize, idx


def test_state_dict_keys_and_statistics_equal_the_peer_codebook_after_one_forward():
    dim, size = 6, 17
    x = torch.randn(3, 19, dim) * 2 + 0.5
    pbook, embed0, quantize, idx = _peer_book_after_one_forward(dim, size, x)
    book = Codebook(embed0, learnable=False, initted=True)
    register_affine_buffers(book, 1, dim)
    rows = x.reshape(1, -1, dim)
    update_affine_(book, rows, embed0, True, 0.7, 0.6)
    peer_state = pbook.state_dict()
    assert set(book.state_dict()) == set(peer_state)
    for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
        assert getattr(book, name).shape == peer_state[name].shape
        torch.testing.assert_close(getattr(book, name), peer_state[name])
    # the peer's quantize is the affine-mapped code, its EMA input the affine-mapped rows
    torch.testing.assert_close(quantize, affine_codes(book, embed0)[0][idx])
    sums = torch.zeros(size, dim).index_add_(0, idx.reshape(-1), affine_rows(book, rows)[0])
    torch.testing.assert_close(pbook.embed_avg[0], 0.8 * embed0[0] + 0.2 * sums)


def test_a_peer_state_dict_loads_strictly_into_a_fresh_book():
    dim, size = 4, 9
    pbook, _, _, _ = _peer_book_after_one_forward(dim, size, torch.randn(2, 11, dim))
    book = Codebook(torch.zeros(1, size, dim), learnable=False, initted=True)
    register_affine_buffers(book, 1, dim)
    assert book.batch_mean is None
    book.load_state_dict(pbook.state_dict(), strict=True)
    for name, value in pbook.state_dict().items():
        assert torch.equal(getattr(book, name), value), name
    # and our own round trip
    again = Codebook(torch.zeros(1, size, dim), learnable=False, initted=True)
    register_affine_buffers(again, 1, dim)
    again.load_state_dict(book.state_dict(), strict=True)
    assert torch.equal(again.batch_variance, pbook.batch_variance)
