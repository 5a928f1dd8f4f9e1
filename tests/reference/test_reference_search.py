"""The PyTorch path's nearest-code search against the fp64 oracle, on the contract's adversarial cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvq
from fastvq.reference import search as search_mod
from fastvq.testing import assert_contract, distances_fp64

SHAPES = [(1, 1, 1), (7, 5, 3), (33, 31, 16), (100, 67, 17), (257, 1031, 3), (64, 2, 1)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_matches_oracle(n, k, d, dtype, metric):
    x = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    idx, dist = fastvq.nearest_code(x, codebook, metric=metric, backend="torch")
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert dist.dtype == torch.float32 and not dist.requires_grad
    assert_contract(idx, x, codebook, metric)
    ref = distances_fp64(x, codebook, metric).gather(1, idx[:, None]).squeeze(1)
    torch.testing.assert_close(dist.double(), ref, atol=1e-5 * (1 + ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicated_codes_take_the_lowest_index(metric):
    k, d = 97, 19
    codebook = torch.randn(k, d)
    # Every code appears three times; the copies sit at higher indices than the original.
    codebook = torch.cat([codebook, codebook[torch.randperm(k)], codebook[torch.randperm(k)]])
    first = {}
    for i, row in enumerate(codebook):
        first.setdefault(tuple(row.tolist()), i)
    x = codebook[torch.randint(0, 3 * k, (500,))] + 0.01 * torch.randn(500, d)
    idx, _ = fastvq.nearest_code(x, codebook, metric=metric, backend="torch")
    assert_contract(idx, x, codebook, metric)
    canonical = torch.tensor([first[tuple(codebook[i].tolist())] for i in idx.tolist()])
    assert torch.equal(idx, canonical)


def test_exact_ties_between_distinct_codes_take_the_lowest_index():
    # x = 0 is equidistant from +e and -e: every row ties between codes 1 and 2.
    codebook = torch.tensor([[5.0, 5.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    idx, dist = fastvq.nearest_code(torch.zeros(10, 2), codebook, backend="torch")
    assert idx.tolist() == [1] * 10
    assert dist.tolist() == [1.0] * 10


def test_near_ties_meet_the_contract():
    d = 64
    base = torch.randn(1, d)
    # Codes a hair apart: the correct winner is decided at the last bits of fp32.
    codebook = base + 1e-4 * torch.randn(300, d)
    x = base + 1e-4 * torch.randn(1000, d)
    idx, _ = fastvq.nearest_code(x, codebook, backend="torch")
    assert_contract(idx, x, codebook)


@pytest.mark.parametrize("offset", [1000.0, -3000.0])
def test_large_common_offset(offset):
    # ||x||^2 - 2x.c + ||c||^2 cancels badly here; the returned distance must not.
    codebook = torch.randn(257, 32) + offset
    x = codebook[torch.randint(0, 257, (300,))] + 0.1 * torch.randn(300, 32)
    idx, dist = fastvq.nearest_code(x, codebook, backend="torch")
    assert_contract(idx, x, codebook)
    ref = distances_fp64(x, codebook).gather(1, idx[:, None]).squeeze(1)
    torch.testing.assert_close(dist.double(), ref, rtol=1e-3, atol=1e-3)
    assert (dist >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_zero_vectors(metric):
    codebook = torch.randn(13, 5)
    codebook[4] = 0
    x = torch.zeros(6, 5)
    idx, dist = fastvq.nearest_code(x, codebook, metric=metric, backend="torch")
    assert_contract(idx, x, codebook, metric)
    if metric == "l2":
        assert idx.tolist() == [4] * 6 and dist.tolist() == [0.0] * 6
    else:  # cosine to a zero vector is 0 for every code: all tie, code 0 wins, distance 1
        assert idx.tolist() == [0] * 6 and dist.tolist() == [1.0] * 6


def test_non_contiguous_and_high_rank_inputs():
    big = torch.randn(4, 9, 6, 11)
    x = big.permute(0, 2, 1, 3)[..., ::2]  # (4, 6, 9, 6), non-contiguous
    codebook = torch.randn(40, 12)[:, ::2]  # (40, 6), non-contiguous
    assert not x.is_contiguous() and not codebook.is_contiguous()
    idx, dist = fastvq.nearest_code(x, codebook, backend="torch")
    assert idx.shape == dist.shape == (4, 6, 9)
    assert_contract(idx, x, codebook)
    idx2, _ = fastvq.nearest_code(x.contiguous(), codebook.contiguous(), backend="torch")
    assert torch.equal(idx, idx2)


def test_one_dimensional_x_is_one_vector():
    codebook = torch.randn(9, 4)
    idx, dist = fastvq.nearest_code(codebook[3] + 1e-3, codebook, backend="torch")
    assert idx.shape == () and idx.item() == 3 and dist.shape == ()


def test_empty_x():
    idx, dist = fastvq.nearest_code(torch.randn(0, 7), torch.randn(5, 7), backend="torch")
    assert idx.shape == (0,) and dist.shape == (0,)


def test_chunking_is_invisible(monkeypatch):
    # Force tiles of 3 rows and of 1 row: results must equal the one-tile answer.
    x, codebook = torch.randn(50, 9), torch.randn(23, 9)
    full = fastvq.nearest_code(x, codebook, backend="torch")
    for budget in (3 * 4 * 23, 1):
        monkeypatch.setattr(search_mod, "MAX_TILE_BYTES", budget)
        idx, dist = fastvq.nearest_code(x, codebook, backend="torch")
        assert torch.equal(idx, full[0]) and torch.equal(dist, full[1])


def test_tile_never_exceeds_the_budget():
    for k in (1, 1000, 8192, 65536, 10**6):
        rows = search_mod.tile_rows(10**7, k, torch.device("cuda"))
        assert rows >= 1
        assert rows * k * 4 <= max(search_mod.MAX_TILE_BYTES, k * 4)
    assert search_mod.tile_rows(5, 10, torch.device("cpu")) == 5


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 70),
    d=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    metric=st.sampled_from(["l2", "cosine"]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_contract_holds(n, k, d, dtype, metric, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, d, generator=gen)).to(dtype)
    codebook = (scale * torch.randn(k, d, generator=gen)).to(dtype)
    idx, _ = fastvq.nearest_code(x, codebook, metric=metric, backend="torch")
    assert_contract(idx, x, codebook, metric)
