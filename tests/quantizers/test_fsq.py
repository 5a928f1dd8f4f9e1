"""FSQ: grid, indices, reachability, straight-through gradient, the peer's options, layouts,
projections, errors, and agreement with vector-quantize-pytorch's FSQ (when installed).

The reference below is written from the paper's formulas (Mentzer et al. 2023, App. A.1; the
symmetric variant of arXiv:2411.19842, Sec. 3.2), per element in fp64 with Python's math module,
independently of fastvq.quantizers.fsq's tensor code.
"""

import itertools
import math

import pytest
import torch

from fastvq.quantizers.fsq import FSQ, FSQOutput

LEVEL_SETS = [[8, 5, 5, 5], [7, 6], [3], [4, 4, 3], [9, 2, 3]]  # odd, even, mixed; 2 needs symmetry


def _modes(levels):
    return [True] if 2 in levels else [False, True]


def _reference_level(z: float, level: int, symmetric: bool, hard_clamp: bool = False) -> int:
    """The level index k in [0, L) of one element (fp64): the paper's bound + round, or the symmetric one."""
    squash = (lambda v: min(max(v, -1.0), 1.0)) if hard_clamp else math.tanh
    if symmetric:
        return min(max(math.floor((level - 1) * (squash(z) + 1) / 2 + 0.5), 0), level - 1)
    half_l = (level - 1) * (1 + 1e-3) / 2
    offset = 0.5 if level % 2 == 0 else 0.0
    shift = offset / half_l if hard_clamp else math.atanh(offset / half_l)
    return round(squash(z + shift) * half_l - offset) + level // 2  # round: half to even, as torch.round


def _grid(level: int, symmetric: bool) -> list[float]:
    if symmetric:
        return [-1 + 2 * k / (level - 1) for k in range(level)]
    return [(k - level // 2) / (level // 2) for k in range(level)]


def _reference(z: torch.Tensor, levels, symmetric=False, hard_clamp=False):
    """(codes, indices) of (..., len(levels)) z: fp64 codes and int64 indices, dimension 0 fastest."""
    rows = z.reshape(-1, len(levels)).tolist()
    codes, indices = [], []
    for row in rows:
        ks = [_reference_level(v, L, symmetric, hard_clamp) for v, L in zip(row, levels, strict=True)]
        codes.append([_grid(L, symmetric)[k] for k, L in zip(ks, levels, strict=True)])
        indices.append(sum(k * math.prod(levels[:i]) for i, k in enumerate(ks)))
    shape = z.shape[:-1]
    return torch.tensor(codes, dtype=torch.float64).reshape(*shape, len(levels)), torch.tensor(indices).reshape(shape)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_forward_matches_the_elementwise_reference_and_lies_on_the_grid(levels):
    for symmetric in _modes(levels):
        fsq = FSQ(levels, preserve_symmetry=symmetric).double()
        z = 2.5 * torch.randn(3, 41, len(levels), dtype=torch.float64)
        out = fsq(z)
        assert isinstance(out, FSQOutput) and len(out) == 2
        q, idx = out
        assert q.shape == z.shape and q.dtype == torch.float64 and idx.shape == (3, 41) and idx.dtype == torch.int32
        ref_q, ref_idx = _reference(z, levels, symmetric)
        # 1e-12: the two sides may write the same grid point differently ((k - c) / h vs -1 + 2k / (L - 1)).
        torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-12)
        assert torch.equal(idx.long(), ref_idx)
        for d, level in enumerate(levels):
            got = q[..., d].flatten()
            grid = torch.tensor(_grid(level, symmetric), dtype=torch.float64)
            assert (got[:, None] - grid[None, :]).abs().min(dim=1).values.max() < 1e-12
            assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("symmetric", [False, True])
def test_bound_hard_clamp_matches_the_reference(symmetric):
    levels = [5, 4, 2] if symmetric else [5, 4, 3]
    fsq = FSQ(levels, preserve_symmetry=symmetric, bound_hard_clamp=True).double()
    z = 1.5 * torch.randn(2, 300, 3, dtype=torch.float64)
    q, idx = fsq(z)
    ref_q, ref_idx = _reference(z, levels, symmetric, hard_clamp=True)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-12)
    assert torch.equal(idx.long(), ref_idx)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_round_trip_and_index_formula(levels):
    for symmetric in _modes(levels):
        fsq = FSQ(levels, preserve_symmetry=symmetric)
        all_idx = torch.arange(fsq.codebook_size)
        assert fsq.codebook_size == math.prod(levels)
        codes = fsq.indices_to_implicit_codes(all_idx)  # (K, d)
        assert torch.equal(fsq.implicit_codebook, codes)
        assert fsq.codes_to_indices(codes).dtype == torch.int32
        assert torch.equal(fsq.codes_to_indices(codes).long(), all_idx)
        assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size  # all codes distinct
        # index = sum_i k_i prod_{j<i} L_j, dimension 0 fastest
        for j, k in enumerate(itertools.product(*[range(level) for level in reversed(levels)])):
            k = k[::-1]
            assert tuple(fsq.indices_to_level_indices(torch.tensor(j)).tolist()) == k
            expected = [_grid(level, symmetric)[ki] for level, ki in zip(levels, k, strict=True)]
            # 2e-7: one fp32 ulp, the peer's k * (2 / (L - 1)) - 1 for the symmetric grid
            torch.testing.assert_close(codes[j], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=2e-7)
        # the forward's indices agree with its own codes
        q, idx = fsq(3 * torch.randn(1, 200, len(levels)))
        assert torch.equal(fsq.codes_to_indices(q), idx)
        assert torch.equal(fsq.indices_to_codes(idx), q)
        assert torch.equal(fsq.implicit_codebook[idx.long()], q)


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
        _, idx = fsq(z)
        assert torch.equal(torch.sort(idx.long()).values, torch.arange(fsq.codebook_size))


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 4, 3]])
def test_zero_maps_to_the_centre_code(levels):
    fsq = FSQ(levels)
    q, _ = fsq(torch.zeros(1, len(levels)))
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


def test_half_precision_input_is_quantized_in_fp32():
    fsq = FSQ([8, 6, 5])
    z = (2 * torch.randn(4, 33, 3)).to(torch.bfloat16)
    q, idx = fsq(z)
    q32, idx32 = fsq(z.float())
    assert q.dtype == torch.bfloat16 and torch.equal(idx, idx32)
    assert torch.equal(q, q32.to(torch.bfloat16))


def test_num_codebooks_quantize_each_slice_independently():
    levels = [7, 6, 4]
    fsq = FSQ(levels, num_codebooks=2).double()
    assert fsq.dim == 6 and fsq.keep_num_codebooks_dim and fsq.codebook_size == 168
    z = 2 * torch.randn(2, 9, 6, dtype=torch.float64)
    q, idx = fsq(z)
    assert q.shape == z.shape and idx.shape == (2, 9, 2)
    for c in range(2):
        ref_q, ref_idx = _reference(z[..., 3 * c : 3 * (c + 1)], levels)
        torch.testing.assert_close(q[..., 3 * c : 3 * (c + 1)], ref_q, rtol=0, atol=1e-12)
        assert torch.equal(idx[..., c].long(), ref_idx)
    torch.testing.assert_close(fsq.indices_to_codes(idx).double(), q, rtol=0, atol=1e-7)  # float32, as the peer
    # one codebook with the axis kept
    kept = FSQ([5, 5], keep_num_codebooks_dim=True)
    q, idx = kept(torch.randn(2, 4, 2))
    assert idx.shape == (2, 4, 1) and torch.equal(kept.indices_to_codes(idx), q)


def test_noise_dropout_only_in_training_and_after_the_indices():
    torch.manual_seed(0)
    p = 0.3
    fsq = FSQ([5, 4, 2], preserve_symmetry=True, noise_dropout=p).double()
    z = (2 * torch.randn(4, 2000, 3, dtype=torch.float64)).requires_grad_()
    clean, clean_idx = fsq.eval()(z)
    noisy, noisy_idx = fsq.train()(z)
    (g,) = torch.autograd.grad(noisy.sum(), z)
    clean, noisy = clean.detach(), noisy.detach()
    assert torch.equal(clean_idx, noisy_idx)  # indices are taken before the noise
    changed = noisy != clean
    assert abs(changed.double().mean().item() - p) < 0.02  # Bernoulli(p) per element (rand() == 0.5 aside)
    delta = noisy - clean
    unclamped = (clean + delta).abs() < 1  # where the clamp did not bite, delta is the U(-0.5, 0.5) offset
    assert delta.abs().max() <= 0.5 and noisy.abs().max() <= 1
    assert abs(delta[changed & unclamped].mean().item()) < 0.03
    # straight-through: the noise and the clamp's inside pass the bound's gradient unchanged
    assert bool((g[noisy.abs() < 1] > 0).all())


def test_orthogonal_rotation_is_a_saved_orthogonal_buffer_around_the_quantizer():
    torch.manual_seed(0)
    levels = [5, 5, 5]
    fsq = FSQ(levels, orthogonal_rotation=True).double()
    rot = fsq.orthogonal_rot
    assert "orthogonal_rot" in fsq.state_dict()
    torch.testing.assert_close(rot.T @ rot, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)  # made in fp32
    z = 2 * torch.randn(3, 50, 3, dtype=torch.float64)
    q, idx = fsq(z)
    ref_q, ref_idx = _reference(z @ rot, levels)
    assert torch.equal(idx.long(), ref_idx)
    torch.testing.assert_close(q, ref_q @ rot.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(fsq.indices_to_codes(idx).double(), q, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="asymmetric levels"):
        FSQ([5, 4, 3], orthogonal_rotation=True)


def test_return_indices_false_returns_none():
    fsq = FSQ([8, 5], return_indices=False)
    z = 2 * torch.randn(2, 3, 2)
    q, idx = fsq(z)
    assert idx is None and torch.equal(q, FSQ([8, 5])(z).quantized)
    assert torch.equal(q, fsq.quantize(z))


def test_layouts_channel_first_auto_detection_and_aliases():
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5], dim=6)
    seq = torch.randn(2, 7, 6)
    q_seq, idx_seq = fsq(seq)
    assert q_seq.shape == (2, 7, 6) and idx_seq.shape == (2, 7)
    for shape in [(2, 6, 5, 3), (2, 6, 2, 3, 4)]:  # 4-D and 5-D input: channel-first, as the peer
        z = torch.randn(shape)
        q, idx = fsq(z)
        q_last, idx_last = fsq(z.movedim(1, -1).reshape(2, -1, 6))
        assert q.shape == z.shape and idx.shape == (2, *shape[2:])
        assert torch.equal(idx.flatten(1), idx_last)
        torch.testing.assert_close(q.movedim(1, -1).reshape(2, -1, 6), q_last)
        torch.testing.assert_close(fsq.indices_to_codes(idx), q)  # channel-first, as forward
        torch.testing.assert_close(fsq.get_output_from_indices(idx).movedim(-1, 1), q)  # wrappers' channel-last
    # channel_first for 3-D input; channel_last=False is the same; channel_last=True keeps 4-D channel-last
    first = FSQ([7, 5], channel_first=True)
    z = torch.randn(2, 2, 9)
    q, idx = first(z)
    assert idx.shape == (2, 9) and torch.equal(q, FSQ([7, 5])(z.movedim(1, -1)).quantized.movedim(-1, 1))
    assert torch.equal(first.indices_to_codes(idx), q) and torch.equal(first.get_output_from_indices(idx), q)
    assert torch.equal(FSQ([7, 5], channel_last=False)(z).quantized, q)
    last = FSQ([7, 5], channel_last=True)
    z = torch.randn(2, 4, 3, 2)
    assert torch.equal(last(z).quantized, FSQ([7, 5])(z.reshape(2, -1, 2)).quantized.reshape(z.shape))
    # accept_image_fmap: (B, dim, H, W) only
    fmap = FSQ([8, 5, 5], dim=6, accept_image_fmap=True)
    fmap.load_state_dict(fsq.state_dict())
    z = torch.randn(2, 6, 5, 3)
    assert torch.equal(fmap(z).indices, fsq(z).indices)
    torch.testing.assert_close(fmap.get_output_from_indices(fmap(z).indices), fmap(z).quantized)
    with pytest.raises(ValueError, match="accept_image_fmap"):
        fmap(torch.randn(2, 6, 5))


def test_projections_and_decoding():
    fsq = FSQ([8, 5, 5], dim=16, projection_has_bias=False)
    assert fsq.has_projections and fsq.project_in.bias is None
    z = torch.randn(2, 7, 16, requires_grad=True)
    q, idx = fsq(z)
    assert q.shape == (2, 7, 16) and idx.shape == (2, 7)
    torch.testing.assert_close(fsq.indices_to_codes(idx), q)
    torch.testing.assert_close(fsq.get_output_from_indices(idx), q)
    torch.testing.assert_close(fsq.codebook[idx.long()], q)
    q.square().sum().backward()
    assert fsq.project_in.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_state_dict_keys_are_the_peers():
    a, b = FSQ([8, 5, 5], dim=10), FSQ([8, 5, 5], dim=10)
    b.load_state_dict(a.state_dict(), strict=True)
    assert set(a.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    assert set(FSQ([8, 5, 5]).state_dict()) == set()
    z = torch.randn(4, 3, 10)
    qa, ia = a(z)
    qb, ib = b(z)
    assert torch.equal(ia, ib) and torch.equal(qa, qb)


def test_fsq_as_a_stage_of_the_wrappers_and_in_the_model_registry():
    from fastvq.models.quantizer_registry import build_quantizer
    from fastvq.quantizers.grouped import GroupedQuantizer
    from fastvq.quantizers.output import QuantizerOutput
    from fastvq.quantizers.residual import ResidualStack

    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, 4)  # (B, dim, H, W)
    flat = z.movedim(1, -1).reshape(2, -1, 3)  # what 4-D+ stages see: (B, N, dim)
    stack = ResidualStack([FSQ([5, 4, 3]) for _ in range(2)], accept_image_fmap=True)
    q, idx, loss = stack(z)
    q_flat, idx_flat, _ = ResidualStack(list(stack.layers))(flat)  # the same stages, channel-last
    assert idx.shape == (2, 5, 4, 2) and idx.dtype == torch.int64 and bool((loss == 0).all())
    assert torch.equal(idx.reshape(2, -1, 2), idx_flat)
    torch.testing.assert_close(q.movedim(1, -1).reshape(2, -1, 3), q_flat)
    torch.testing.assert_close(stack.get_output_from_indices(idx), q)
    grouped = GroupedQuantizer([FSQ([5, 4, 3]), FSQ([5, 4, 3])], accept_image_fmap=True)
    z2 = torch.randn(2, 6, 5, 4)
    q, idx, loss = grouped(z2)
    assert q.shape == z2.shape and idx.shape == (2, 2, 5, 4) and loss.item() == 0
    for g, fsq in enumerate(grouped.groups):
        assert torch.equal(idx[g], fsq(z2[:, 3 * g : 3 * (g + 1)]).indices)  # FSQ reads 4-D as channel-first
    torch.testing.assert_close(grouped.get_output_from_indices(idx), q)
    model_fsq = build_quantizer("fsq", 3, 60, 0.25, levels=[5, 4, 3])
    out = model_fsq(z)
    assert isinstance(out, QuantizerOutput) and out.indices.dtype == torch.int64 and out.loss.item() == 0
    assert out.indices.shape == (2, 5, 4)
    torch.testing.assert_close(model_fsq.get_output_from_indices(out.indices), out.quantized)


def test_the_peer_readme_example():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


PEER_CONFIGS = [
    dict(levels=[8, 5, 5, 5]),
    dict(levels=[8, 5, 5, 5], dim=16),
    dict(levels=[7, 6, 4], num_codebooks=2),
    dict(levels=[7, 6, 4], num_codebooks=2, dim=10, projection_has_bias=False),
    dict(levels=[4, 3, 2], preserve_symmetry=True),
    dict(levels=[5, 4, 2], preserve_symmetry=True, noise_dropout=0.3),
    dict(levels=[8, 6], return_indices=False),
    dict(levels=[5, 5, 5], orthogonal_rotation=True),
    dict(levels=[5, 4], bound_hard_clamp=True),
    dict(levels=[5, 4], channel_first=True),
    dict(levels=[5, 4], keep_num_codebooks_dim=True),
]


@pytest.mark.parametrize("cfg", PEER_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_outputs_as_the_peer_from_its_state_dict(cfg):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    peer = peer_module.FSQ(**cfg)
    ours = FSQ(**cfg)
    ours.load_state_dict(peer.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(peer.state_dict())
    seq = (2, peer.dim, 7) if cfg.get("channel_first") else (2, 7, peer.dim)
    for shape in [seq, (2, peer.dim, 5, 3), (2, peer.dim, 2, 3, 4)]:
        z = 2 * torch.randn(shape)
        for training in (False, True):
            peer.train(training), ours.train(training)
            torch.manual_seed(1)
            q_peer, idx_peer = peer(z)
            torch.manual_seed(1)  # noise_dropout draws in the peer's order
            q_ours, idx_ours = ours(z)
            assert torch.equal(q_ours, q_peer)  # bitwise in fp32
            if idx_peer is None:
                assert idx_ours is None
                continue
            assert idx_ours.dtype == idx_peer.dtype and torch.equal(idx_ours, idx_peer)
        if idx_peer is not None:
            torch.testing.assert_close(ours.indices_to_codes(idx_peer), peer.indices_to_codes(idx_peer))
    if peer.return_indices:
        assert torch.equal(ours.implicit_codebook, peer.implicit_codebook)
        codes = peer.implicit_codebook
        assert torch.equal(ours.codes_to_indices(codes), peer.codes_to_indices(codes))


def test_same_outputs_as_the_peer_in_half_precision():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    for cfg in [dict(levels=[8, 5, 5, 5]), dict(levels=[4, 3, 2], preserve_symmetry=True)]:
        for force in (True, False):
            peer, ours = peer_module.FSQ(**cfg, force_quantization_f32=force), FSQ(**cfg, force_quantization_f32=force)
            z = (2 * torch.randn(3, 50, len(cfg["levels"]))).to(torch.bfloat16)
            (q_peer, i_peer), (q_ours, i_ours) = peer(z), ours(z)
            assert q_ours.dtype == q_peer.dtype and torch.equal(q_ours, q_peer) and torch.equal(i_ours, i_peer)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(levels=[]), "levels must be a non-empty list"),
        (dict(levels="855"), "levels must be a non-empty list"),
        (dict(levels=[8, 1]), "levels must be ints >= 2"),
        (dict(levels=[8, 2.5]), "levels must be ints >= 2"),
        (dict(levels=[8, 2]), "preserve_symmetry"),
        (dict(levels=[8, 5], dim=0), "dim must be a positive int"),
        (dict(levels=[8, 5], num_codebooks=0), "num_codebooks must be a positive int"),
        (dict(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
        (dict(levels=[8, 5], noise_dropout=0.1), "needs preserve_symmetry"),
        (dict(levels=[8, 5], preserve_symmetry=True, noise_dropout=1.5), r"noise_dropout must lie in \[0, 1\]"),
        (dict(levels=[8, 5], accept_image_fmap=True, channel_last=True), "accept_image_fmap"),
        (dict(levels=[8, 5], channel_first=True, channel_last=True), "channel_first"),
        (dict(levels=[2**16, 2**16]), "int32"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSQ(**kwargs)


def test_bad_inputs():
    fsq = FSQ([8, 5])
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 2"):
        fsq(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\(B, dim, \.\.\.\) with dim = 2"):
        fsq(torch.randn(3, 4, 5, 6))  # 4-D is channel-first
    with pytest.raises(TypeError, match="floating dtype"):
        fsq(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        fsq.indices_to_codes(torch.tensor([40]))
    with pytest.raises(TypeError, match="indices must be an int64"):
        fsq.get_output_from_indices(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"codes must be \(\.\.\., 2\)"):
        fsq.codes_to_indices(torch.zeros(3))
    with pytest.raises(ValueError, match="num_codebooks == 1"):
        _ = FSQ([5, 5], num_codebooks=2).codebook
