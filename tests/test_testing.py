"""The oracle itself must be able to fail: wrong answers and wrong tie-breaks are caught."""

import pytest
import torch

from fastvq.testing import assert_contract, contract_tau, distances_fp64


def test_oracle_rejects_a_wrong_index():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]])
    assert_contract(torch.tensor([0]), x, codebook)
    with pytest.raises(AssertionError, match="break the numerics contract"):
        assert_contract(torch.tensor([1]), x, codebook)


def test_oracle_rejects_a_higher_index_on_an_exact_tie():
    codebook = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    x = torch.tensor([[0.5, 0.5]])
    assert_contract(torch.tensor([0]), x, codebook)
    with pytest.raises(AssertionError):
        assert_contract(torch.tensor([1]), x, codebook)


def test_oracle_rejects_a_higher_duplicate_even_when_another_code_is_nearest():
    # Codes 0 and 2 are duplicates; code 1 is nearest, but within tau choosing 2 is still wrong.
    codebook = torch.tensor([[1.0, 0.0], [1.0 + 1.2e-7, 0.0], [1.0, 0.0]])
    x = torch.tensor([[2.0, 0.0]])
    assert distances_fp64(x, codebook).argmin().item() == 1
    assert_contract(torch.tensor([0]), x, codebook)  # within tau of the best: allowed
    with pytest.raises(AssertionError):
        assert_contract(torch.tensor([2]), x, codebook)


def test_oracle_accepts_distinct_codes_at_equal_distance():
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert_contract(torch.tensor([1]), torch.zeros(1, 2), codebook)


def test_oracle_rejects_out_of_range_and_wrong_count():
    codebook, x = torch.randn(3, 2), torch.randn(4, 2)
    with pytest.raises(AssertionError, match="out of range"):
        assert_contract(torch.tensor([0, 1, 2, 3]), x, codebook)
    with pytest.raises(AssertionError, match="entries"):
        assert_contract(torch.tensor([0, 1]), x, codebook)


def test_tau_is_absolute_and_grows_with_the_norms():
    codebook = torch.randn(5, 8)
    small, big = torch.randn(3, 8), 1000 * torch.randn(3, 8)
    assert (contract_tau(big, codebook) > contract_tau(small, codebook)).all()
    assert (contract_tau(small, codebook, tf32=True) > contract_tau(small, codebook)).all()


def test_fp64_distances_are_direct():
    x, codebook = torch.randn(4, 3), torch.randn(6, 3)
    expected = torch.cdist(x.double(), codebook.double()) ** 2
    torch.testing.assert_close(distances_fp64(x, codebook), expected)
