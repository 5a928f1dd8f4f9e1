"""FSQ: grid, indices, reachability, straight-through gradient, layouts, projections, errors.

The reference below is written from the paper's formulas, per element in fp64 with Python's
math module, independently of fastvq.quantizers.fsq's tensor code.
"""

import itertools
import math

import pytest
import torch

from fastvq.quantizers.fsq import FSQ
from fastvq.quantizers.output import QuantizerOutput

LEVEL_SETS = [[8, 5, 5, 5], [7, 6], [3], [4, 4, 3], [9, 2, 3]]  # odd, even, mixed; 2 needs symmetry


def _modes(levels):
    return [True] if 2 in levels else [False, True]


def _reference_code(z: float, level: int, symmetric: bool) -> float:
    """The paper's bound + round for one element (fp64), or the symmetric variant."""
    if symmetric:
        k = math.floor((level - 1) * (math.tanh(z) + 1) / 2 + 0.5)
        k = min(max(k, 0), level - 1)
        return -1 + 2 * k / (level - 1)
    half_l = (level - 1) * (1 + 1e-3) / 2
    offset = 0.5 if level % 2 == 0 else 0.0
    bounded = math.tanh(z + math.atanh(offset / half_l)) * half_l - offset
    return math.floor(bounded + 0.5) / (level // 2)


def _grid(level: int, symmetric: bool) -> list[float]:
    if symmetric:
        return [-1 + 2 * k / (level - 1) for k in range(level)]
    return [(k - level // 2) / (level // 2) for k in range(level)]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_forward_matches_the_elementwise_reference_and_lies_on_the_grid(levels):
    for symmetric in _modes(levels):
        fsq = FSQ(levels, preserve_symmetry=symmetric).double()
        z = 2.5 * torch.randn(3, 41, len(levels), dtype=torch.float64)
        out = fsq(z)
        assert isinstance(out, QuantizerOutput)
        q, idx, loss = out
        assert q.shape == z.shape and q.dtype == torch.float64 and idx.shape == (3, 41) and idx.dtype == torch.int64
        assert loss.shape == () and loss.item() == 0.0
        for d, level in enumerate(levels):
            got = q[..., d].flatten()
            expected = [_reference_code(v, level, symmetric) for v in z[..., d].flatten().tolist()]
            # 1e-12: the two sides may write the same grid point differently ((k - c) / h vs -1 + 2k / (L - 1)).
            torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
            grid = torch.tensor(_grid(level, symmetric), dtype=torch.float64)
            assert (got[:, None] - grid[None, :]).abs().min(dim=1).values.max() < 1e-12
            assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_round_trip_and_index_formula(levels):
    for symmetric in _modes(levels):
        fsq = FSQ(levels, preserve_symmetry=symmetric)
        all_idx = torch.arange(fsq.codebook_size)
        assert fsq.codebook_size == math.prod(levels)
        codes = fsq.indices_to_codes(all_idx)  # (K, d)
        assert torch.equal(fsq.codes_to_indices(codes), all_idx)
        assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size  # all codes distinct
        # index = sum_i k_i prod_{j<i} L_j, dimension 0 fastest
        for j, k in enumerate(itertools.product(*[range(level) for level in reversed(levels)])):
            k = k[::-1]
            assert tuple(fsq.indices_to_level_indices(torch.tensor(j)).tolist()) == k
            expected = [_grid(level, symmetric)[ki] for level, ki in zip(levels, k, strict=True)]
            torch.testing.assert_close(codes[j], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)
        # the forward's indices agree with its own codes
        q, idx, _ = fsq(3 * torch.randn(200, len(levels)))
        assert torch.equal(fsq.codes_to_indices(q), idx)
        assert torch.equal(fsq.indices_to_codes(idx), q)
        assert torch.equal(fsq.implicit_codebook[idx], q)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_every_code_is_reachable(levels):
    for symmetric in _modes(levels):
        fsq = FSQ(levels, preserve_symmetry=symmetric).double()
        # Per dimension, one input for each level, found by a sweep (not by inverting the bound).
        sweep = torch.linspace(-8, 8, 4001, dtype=torch.float64)
        witnesses = []
        for d, level in enumerate(levels):
            z = torch.zeros(sweep.numel(), len(levels), dtype=torch.float64)
            z[:, d] = sweep
            k = fsq.indices_to_level_indices(fsq(z).indices)[:, d]
            assert torch.equal(torch.unique(k), torch.arange(level))
            assert bool((k[1:] >= k[:-1]).all())  # monotone in z
            witnesses.append([sweep[(k == ki).nonzero()[0, 0]].item() for ki in range(level)])
        z = torch.tensor(list(itertools.product(*witnesses)), dtype=torch.float64)
        _, idx, _ = fsq(z)
        assert torch.equal(torch.sort(idx).values, torch.arange(fsq.codebook_size))


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 4, 3]])
def test_zero_maps_to_the_centre_code(levels):
    fsq = FSQ(levels)
    q, _, _ = fsq(torch.zeros(1, len(levels)))
    assert torch.equal(q, torch.zeros(1, len(levels)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_straight_through_gradient_is_identity_through_rounding(symmetric):
    levels = [8, 5, 4]
    fsq = FSQ(levels, preserve_symmetry=symmetric).double()
    z = (2 * torch.randn(64, 3, dtype=torch.float64)).requires_grad_()
    w = torch.randn(64, 3, dtype=torch.float64)
    (fsq(z).quantized * w).sum().backward()
    # d code / dz with round -> identity: d/dz of the unrounded position, divided by the step.
    expected = torch.empty_like(z)
    for d, level in enumerate(levels):
        zd = z[:, d].detach()
        if symmetric:
            expected[:, d] = 1 - torch.tanh(zd) ** 2  # (L-1)/2 * sech^2 / ((L-1)/2)
        else:
            half_l = (level - 1) * (1 + 1e-3) / 2
            shift = math.atanh((0.5 if level % 2 == 0 else 0.0) / half_l)
            expected[:, d] = (1 - torch.tanh(zd + shift) ** 2) * half_l / (level // 2)
    torch.testing.assert_close(z.grad, expected * w)


def test_loss_is_a_zero_scalar_of_the_accumulation_dtype():
    fsq = FSQ([5, 5])
    assert fsq(torch.randn(2, 2)).loss.dtype == torch.float32
    assert fsq(torch.randn(2, 2, dtype=torch.bfloat16)).loss.dtype == torch.float32
    assert fsq.double()(torch.randn(2, 2, dtype=torch.float64)).loss.dtype == torch.float64


def test_half_precision_input_is_quantized_in_fp32():
    fsq = FSQ([8, 6, 5])
    z = (2 * torch.randn(4, 33, 3)).to(torch.bfloat16)
    q, idx, _ = fsq(z)
    q32, idx32, _ = fsq(z.float())
    assert q.dtype == torch.bfloat16 and torch.equal(idx, idx32)
    assert torch.equal(q, q32.to(torch.bfloat16))


def test_projections_layouts_and_decoding():
    fsq = FSQ([8, 5, 5], dim=16)
    z = torch.randn(2, 7, 16, requires_grad=True)
    q, idx, _ = fsq(z)
    assert q.shape == (2, 7, 16) and idx.shape == (2, 7)
    torch.testing.assert_close(fsq.get_output_from_indices(idx), q)
    torch.testing.assert_close(fsq.codebook[idx], q)
    q.square().sum().backward()
    assert fsq.project_in.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0

    fmap = FSQ([8, 5, 5], dim=6, accept_image_fmap=True)
    z = torch.randn(2, 6, 5, 3)
    q, idx, _ = fmap(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 3)
    torch.testing.assert_close(fmap.get_output_from_indices(idx), q)
    last = FSQ([8, 5, 5], dim=6)
    last.load_state_dict(fmap.state_dict())
    q_last, idx_last, _ = last(z.permute(0, 2, 3, 1))
    assert torch.equal(idx_last, idx)
    torch.testing.assert_close(q_last.permute(0, 3, 1, 2), q)

    seq = FSQ([7, 5], channel_last=False)
    z = torch.randn(2, 2, 9)
    q, idx, _ = seq(z)
    assert q.shape == (2, 2, 9) and idx.shape == (2, 9)
    assert torch.equal(seq.get_output_from_indices(idx), q)
    assert torch.equal(q, FSQ([7, 5])(z.movedim(1, -1)).quantized.movedim(-1, 1))


def test_state_dict_round_trip():
    a, b = FSQ([8, 5, 5], dim=10), FSQ([8, 5, 5], dim=10)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    z = torch.randn(4, 10)
    qa, ia, _ = a(z)
    qb, ib, _ = b(z)
    assert torch.equal(ia, ib) and torch.equal(qa, qb)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(levels=[]), "levels must be a non-empty list"),
        (dict(levels="855"), "levels must be a non-empty list"),
        (dict(levels=[8, 1]), "levels must be ints >= 2"),
        (dict(levels=[8, 2.5]), "levels must be ints >= 2"),
        (dict(levels=[8, 2]), "preserve_symmetry"),
        (dict(levels=[8, 5], dim=0), "dim must be a positive int"),
        (dict(levels=[8, 5], accept_image_fmap=True, channel_last=True), "accept_image_fmap"),
        (dict(levels=[2**32, 2**32]), "int64"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSQ(**kwargs)


def test_bad_inputs():
    fsq = FSQ([8, 5])
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 2"):
        fsq(torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating dtype"):
        fsq(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        fsq.indices_to_codes(torch.tensor([40]))
    with pytest.raises(TypeError, match="indices must be an int64"):
        fsq.get_output_from_indices(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"codes must be \(\.\.\., 2\)"):
        fsq.codes_to_indices(torch.zeros(3))
