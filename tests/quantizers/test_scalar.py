"""FSQ's formulas alone (fastvq/quantizers/scalar.py): the bounds' grids, the index <-> level-index
<-> code maps as mutual inverses, the straight-through gradients and noise dropout."""

import itertools

import pytest
import torch

from fastvq.quantizers import scalar

LEVELS = [[3, 4, 5], [2, 3, 2], [8, 5, 5, 5]]


def _all_level_indices(levels):
    # (prod(levels), d), dimension 0 varying fastest: the index order of mixed_radix_basis
    return torch.tensor([list(reversed(k)) for k in itertools.product(*(range(n) for n in reversed(levels)))])


@pytest.mark.parametrize(
    "levels,preserve_symmetry", [(lv, sym) for lv in LEVELS for sym in (False, True) if sym or 2 not in lv]
)  # L = 2 only under the symmetric bound
def test_index_maps_are_mutual_inverses(levels, preserve_symmetry):
    lv, basis = torch.tensor(levels, dtype=torch.int32), scalar.mixed_radix_basis(levels)
    indices = torch.arange(len(_all_level_indices(levels)))
    k = scalar.indices_to_level_indices(indices, lv, basis)
    assert torch.equal(k, _all_level_indices(levels))
    assert torch.equal(scalar.level_indices_to_indices(k, basis), indices.int())
    codes = scalar.level_indices_to_codes(k, lv, preserve_symmetry, torch.float64)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(scalar.codes_to_level_indices(codes, lv, preserve_symmetry), k)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("hard_clamp", [False, True])
def test_bounds_land_on_the_grid_their_level_indices_name(levels, hard_clamp):
    torch.manual_seed(0)
    lv = torch.tensor(levels, dtype=torch.int32)
    z = torch.randn(401, len(levels), dtype=torch.float64) * 3
    bounds = [(True, scalar.symmetric_bound_and_level(z, lv, hard_clamp))]
    if 2 not in levels:
        bounds.append((False, scalar.bound_and_level(z, lv, hard_clamp=hard_clamp)))
    for symmetric, (codes, k) in bounds:
        assert codes.dtype == torch.float64 and not k.requires_grad
        assert ((k >= 0) & (k < lv)).all() and torch.equal(k, k.round())
        torch.testing.assert_close(codes, scalar.level_indices_to_codes(k.long(), lv, symmetric, torch.float64))
        for i, n in enumerate(levels):  # every level is reached, none besides
            assert codes[:, i].unique().numel() == n


def test_zero_maps_to_the_code_zero_under_the_default_bound():
    lv = torch.tensor([3, 4, 7, 8], dtype=torch.int32)
    codes, _ = scalar.bound_and_level(torch.zeros(4), lv)
    assert torch.equal(codes, torch.zeros(4))


def test_straight_through_rounding_passes_the_gradient_unchanged():
    z = torch.tensor([-1.5, -0.4, 0.5, 2.7], requires_grad=True)
    for fn, expected in ((scalar.round_ste, [-2.0, -0.0, 0.0, 3.0]), (scalar.floor_ste, [-2.0, -1.0, 0.0, 2.0])):
        out = fn(z)
        assert torch.equal(out, torch.tensor(expected))
        (g,) = torch.autograd.grad(out.sum(), z)
        assert torch.equal(g, torch.ones(4))


@pytest.mark.parametrize("p", [0.1, 0.9])
def test_noise_dropout_draws_as_the_peer_does(p):
    codes = torch.linspace(-1, 1, 41).reshape(41, 1).expand(41, 3).t()  # non-contiguous
    torch.manual_seed(1)
    got = scalar.noise_dropout(codes, p)
    torch.manual_seed(1)
    mask = torch.full((3, 41), p).bernoulli_().bool()  # the peer's expression
    offset = torch.rand(3, 41) - 0.5
    assert torch.equal(got, torch.where(mask, codes + offset, codes).clamp(-1, 1))
    # Tensor.bernoulli_() draws with its default p = 0.5 whatever the fill: the peer's quirk, kept
    torch.manual_seed(0)
    changed = (scalar.noise_dropout(torch.zeros(20000), p) != 0).float().mean()
    assert abs(changed - 0.5) < 0.02
