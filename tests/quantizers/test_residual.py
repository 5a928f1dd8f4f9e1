"""ResidualVQ: stage-by-stage refinement against a greedy fp64 reference, decoding, shared codebook,
quantize dropout, gradients, layouts, state_dict, errors."""

import itertools

import pytest
import torch

from fastvq.quantizers.gradients import rotate_to
from fastvq.quantizers.output import ResidualVQOutput
from fastvq.quantizers.residual import ResidualVQ
from fastvq.quantizers.vector_quantizer import VectorQuantizer

# Gradient-trained stages (the stages' defaults are vector-quantize-pytorch's EMA codebooks): for tests
# about the stack rather than about how a codebook learns.
GRADIENT = dict(ema_update=False, learnable_codebook=True)


def _greedy_reference(x: torch.Tensor, codebooks: list[torch.Tensor]):
    """Residual quantization by brute force in fp64: (indices (N, Q), reconstruction after each stage)."""
    residual = x.double()
    recon = torch.zeros_like(residual)
    indices, recons = [], []
    for book in codebooks:
        idx = torch.cdist(residual, book.double()).argmin(dim=1)
        residual = residual - book.double()[idx]
        recon = recon + book.double()[idx]
        indices.append(idx)
        recons.append(recon.clone())
    return torch.stack(indices, dim=-1), recons


def _multiscale_rvq(num_quantizers: int) -> ResidualVQ:
    """Stage q has the codes 2^-q {-1, 0, 1}^2: every stage must halve the error."""
    rvq = ResidualVQ(2, 9, num_quantizers, codebook_weight=1.0, **GRADIENT, backend="torch")
    grid = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=2)))
    with torch.no_grad():
        for q, layer in enumerate(rvq.layers):
            layer.embed.copy_(grid * 2.0**-q)
    return rvq


def test_each_stage_refines_a_constructed_codebook():
    rvq = _multiscale_rvq(4).eval()
    x = torch.rand(500, 2) * 3 - 1.5
    out = rvq(x)
    assert isinstance(out, ResidualVQOutput)
    q, idx, losses = out
    assert q.shape == x.shape and idx.shape == (500, 4) and idx.dtype == torch.int64
    assert losses.shape == (4,) and bool((losses == 0).all())  # per stage; 0 in eval, as the peer's
    ref_idx, ref_recons = _greedy_reference(x, [layer.embed.detach() for layer in rvq.layers])
    assert torch.equal(idx, ref_idx)
    errors = []
    for k in range(1, 5):
        partial = rvq.get_output_from_indices(idx[:, :k])  # the first k stages
        torch.testing.assert_close(partial.double(), ref_recons[k - 1])
        errors.append((partial - x).square().sum(-1).max().item())
    for before, after in itertools.pairwise(errors):
        assert after <= 0.26 * before + 1e-7  # max error halves per stage (squared: a quarter)
    assert torch.equal(rvq.get_output_from_indices(idx), q)


def test_each_stage_refines_after_short_training():
    data = torch.randn(512, 4) * torch.tensor([2.0, 1.0, 0.5, 0.25])
    rvq = ResidualVQ(4, 8, 3, codebook_weight=1.0, **GRADIENT, backend="torch")
    opt = torch.optim.Adam(rvq.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        rvq(data).losses.sum().backward()
        opt.step()
    rvq.eval()
    _, idx, _ = rvq(data)
    errors = [(rvq.get_output_from_indices(idx[:, :k]) - data).square().mean().item() for k in (1, 2, 3)]
    assert errors[0] < 0.5 * data.var(0).mean().item()
    assert errors[1] < 0.75 * errors[0] and errors[2] < 0.75 * errors[1]


def test_losses_are_the_stage_losses():
    rvq = ResidualVQ(5, 7, 3, commitment_weight=0.4, codebook_weight=1.0, **GRADIENT, backend="torch")
    x = torch.randn(3, 11, 5)
    q, idx, loss = rvq(x)
    residual, stage_losses = x, []
    for stage, layer in enumerate(rvq.layers):  # the stages run by hand, one after the other
        e, i, stage_loss = layer(residual)
        assert torch.equal(i, idx[..., stage])
        residual = residual - e.detach()
        stage_losses.append(stage_loss.detach())
    torch.testing.assert_close(rvq.last_losses, torch.stack(stage_losses))
    torch.testing.assert_close(loss.detach(), torch.stack(stage_losses))  # (Q,), as the peer's


def test_output_gradient_straight_through_per_stage_or_once():
    w = torch.randn(8, 6)
    # the peer's default: every stage's straight-through output reaches z, Q x identity
    rvq = ResidualVQ(6, 9, 3, commitment_weight=0.0, rotation_trick=False, **GRADIENT, backend="torch")
    z = torch.randn(8, 6, requires_grad=True)
    rvq(z).quantized.mul(w).sum().backward()
    torch.testing.assert_close(z.grad, 3 * w)
    # fastvq's option: one estimator for the sum, identity
    rvq = ResidualVQ(6, 9, 3, commitment_weight=0.0, stack_estimator="straight_through", **GRADIENT, backend="torch")
    z = torch.randn(8, 6, requires_grad=True)
    rvq(z).quantized.mul(w).sum().backward()
    assert torch.equal(z.grad, w)

    # every stage's commitment term reaches the input: d/dz of sum_q beta mean((r_q - sg(e_q))^2)
    rvq = ResidualVQ(6, 9, 3, commitment_weight=1.0, codebook_weight=0.0, **GRADIENT, backend="torch")
    z = torch.randn(8, 6, requires_grad=True)
    _, idx, loss = rvq(z)
    loss.sum().backward()
    codes = [layer.embed.detach()[idx[:, s]] for s, layer in enumerate(rvq.layers)]
    partial_sums = torch.cumsum(torch.stack(codes), dim=0)  # (Q, N, D): reconstruction after each stage
    expected = sum(2 * (z.detach() - partial_sums[s]) / z.numel() for s in range(3))
    torch.testing.assert_close(z.grad, expected)


def test_stack_rotation_trick_option():
    rvq = ResidualVQ(4, 9, 2, stack_estimator="rotation_trick", codebook_weight=1.0, **GRADIENT, backend="torch")
    z = torch.randn(6, 4, requires_grad=True)
    q, idx, _ = rvq(z)
    assert torch.equal(q, rvq.get_output_from_indices(idx))
    w = torch.randn(6, 4)
    (q * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    (rotate_to(z_ref, q.detach()) * w).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_decoding_ignores_dropped_stages_and_layouts():
    rvq = ResidualVQ(6, 10, 3, codebook_dim=4, accept_image_fmap=True, codebook_weight=1.0, **GRADIENT,
                     backend="torch")
    z = torch.randn(2, 6, 5, 3)
    q, idx, _ = rvq(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 3, 3)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q)
    masked = idx.clone()
    masked[..., 1] = -1  # any stage may be marked dropped, not only trailing ones
    books = rvq.codebooks  # (Q, K, codebook_dim)
    expected = rvq.project_out(books[0][idx[..., 0]] + books[2][idx[..., 2]]).permute(0, 3, 1, 2)
    torch.testing.assert_close(rvq.get_output_from_indices(masked), expected)

    seq = ResidualVQ(3, 5, 2, channel_last=False, codebook_weight=1.0, **GRADIENT, backend="torch")
    z = torch.randn(2, 3, 9)
    q, idx, _ = seq(z)
    assert q.shape == (2, 3, 9) and idx.shape == (2, 9, 2)
    assert torch.equal(seq.get_output_from_indices(idx), q)
    last = ResidualVQ(3, 5, 2, codebook_weight=1.0, **GRADIENT, backend="torch")
    last.load_state_dict(seq.state_dict())
    q_last, idx_last, _ = last(z.movedim(1, -1))
    assert torch.equal(idx_last, idx) and torch.equal(q_last.movedim(-1, 1), q)


def test_shared_codebook_is_one_parameter():
    rvq = ResidualVQ(4, 6, 3, shared_codebook=True, codebook_weight=1.0, **GRADIENT, backend="torch")
    params = list(rvq.parameters())
    assert len(params) == 1 and all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    z = torch.randn(20, 4)
    _, _, loss = rvq(z)
    loss.sum().backward()
    # its gradient is the sum of what each stage would give its own copy of the same codes
    unshared = ResidualVQ(4, 6, 3, codebook_weight=1.0, **GRADIENT, backend="torch")
    with torch.no_grad():
        for layer in unshared.layers:
            layer.embed.copy_(rvq.layers[0].embed)
    _, _, loss_u = unshared(z)
    loss_u.sum().backward()
    torch.testing.assert_close(params[0].grad[0], sum(layer._codebook.embed.grad[0] for layer in unshared.layers))
    torch.optim.SGD(rvq.parameters(), lr=0.1).step()
    assert all(torch.equal(layer.embed, rvq.layers[0].embed) for layer in rvq.layers)
    # state_dict round trip keeps the sharing
    other = ResidualVQ(4, 6, 3, shared_codebook=True, codebook_weight=1.0, **GRADIENT, backend="torch")
    other.load_state_dict(rvq.state_dict())
    assert len(list(other.parameters())) == 1 and torch.equal(other.layers[2].embed, rvq.layers[0].embed)


def test_quantize_dropout_drops_trailing_stages_in_training_only():
    rvq = ResidualVQ(4, 8, 5, quantize_dropout=True, quantize_dropout_cutoff_index=1, codebook_weight=1.0, **GRADIENT,
                     backend="torch")
    z = torch.randn(3, 7, 4)
    seen = set()
    generator = torch.Generator().manual_seed(123)
    for _ in range(40):
        q, idx, loss = rvq(z, generator=generator)
        dropped = idx[0, 0] == -1
        active = int((~dropped).sum())
        assert 2 <= active <= 5  # at least stages 0 and 1 (cutoff index 1)
        assert bool((idx[..., :active] >= 0).all()) and bool((idx[..., active:] == -1).all())
        assert torch.equal(rvq.get_output_from_indices(idx), q)
        assert bool((loss[active:] == 0).all()) and bool((loss[:active] > 0).all())
        torch.testing.assert_close(loss.detach(), rvq.last_losses)
        seen.add(active)
    assert seen == {2, 3, 4, 5}

    # reproducible from a seeded generator or from the global seed
    a = rvq(z, generator=torch.Generator().manual_seed(7)).indices
    b = rvq(z, generator=torch.Generator().manual_seed(7)).indices
    torch.manual_seed(3)
    c = rvq(z).indices
    torch.manual_seed(3)
    d = rvq(z).indices
    assert torch.equal(a, b) and torch.equal(c, d)

    rvq.eval()
    for _ in range(5):
        assert bool((rvq(z).indices >= 0).all())


def test_dropped_stages_do_not_run():
    rvq = ResidualVQ(4, 8, 3, quantize_dropout=True, codebook_weight=1.0, **GRADIENT, backend="torch")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # find a draw that keeps one stage only
        rvq.zero_grad()
        _, idx, loss = rvq(torch.randn(5, 4), generator=generator)
        if bool((idx[:, 1:] == -1).all()):
            break
    else:
        pytest.fail("no draw kept a single stage")
    loss.sum().backward()
    assert rvq.layers[0]._codebook.embed.grad is not None
    assert rvq.layers[1]._codebook.embed.grad is None and rvq.layers[2]._codebook.embed.grad is None


def test_vq_kwargs_reach_every_stage():
    rvq = ResidualVQ(4, 8, 2, commitment_weight=0.7, ema_update=True, backend="torch")
    assert all(layer.commitment_weight == 0.7 and layer.ema_update for layer in rvq.layers)
    before = rvq.codebooks.clone()
    rvq(torch.randn(64, 4))  # training forward: EMA updates every stage's codebook
    assert not torch.equal(rvq.codebooks, before)


def test_state_dict_round_trip():
    a = ResidualVQ(6, 9, 3, codebook_dim=3, codebook_weight=1.0, **GRADIENT, backend="torch")
    b = ResidualVQ(6, 9, 3, codebook_dim=3, codebook_weight=1.0, **GRADIENT, backend="torch")
    b.load_state_dict(a.state_dict())
    z = torch.randn(4, 6)
    a.eval(), b.eval()
    qa, ia, la = a(z)
    qb, ib, lb = b(z)
    assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(la, lb)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=4, codebook_size=8, num_quantizers=0), "num_quantizers must be an int >= 1"),
        (dict(dim=0, codebook_size=8, num_quantizers=2), "dim must be an int >= 1"),
        (dict(dim=4, codebook_size=0, num_quantizers=2), "codebook_size must be an int >= 1"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout_cutoff_index=2), "quantize_dropout_cutoff"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, heads=2), "heads=1 only"),
        (dict(dim=4, codebook_size=8), "num_quantizers is needed"),
        (dict(dim=4, codebook_size=(8, 4), num_quantizers=3), "one size per stage"),
        (dict(dim=4, codebook_size=(8, 0)), "codebook_size must be an int >= 1"),
        (dict(dim=4, codebook_size=(8, 4), shared_codebook=True), "equal codebook sizes"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, stack_estimator="ste"), "stack_estimator must be one of"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, stack_estimator="straight_through", quant_grad_frac=0.5),
         "quant_grad_frac > 0 needs stack_estimator=None"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quant_grad_frac=1.5), "quant_grad_frac must be"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout_multiple_of=0), "quantize_dropout_multiple"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, beam_score_quantizer_weights=[1.0]), "one weight per stage"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, eval_beam_size=3), "eval_beam_size=3 needs beam_size"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, beam_size=0), "beam_size"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, diveq=True, ema_update=True), "diveq"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, commitment_weight=-1.0), "commitment_weight"),
        (dict(dim=4, codebook_size=8, num_quantizers=2, accept_image_fmap=True, channel_last=True), "accept_image"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualVQ(**kwargs)


def test_unimplemented_peer_options_raise_naming_themselves():
    rvq = ResidualVQ(4, 8, 2, implicit_neural_codebook=True, beam_size=2, backend="torch")
    with pytest.raises(NotImplementedError, match="beam search with an implicit neural codebook"):
        rvq(torch.randn(2, 3, 4))


def _qinco_reference(x: torch.Tensor, rvq: ResidualVQ):
    """QINCo in fp64 from the paper's formula, per position: stage q > 0 searches
    c_k' = f(W [x_hat ; c_k] + b), f = residual blocks h + L2(SiLU(L1(h))), x_hat = sum of earlier codes.
    Returns (indices (P, Q), quantized (P, D))."""
    rows = x.double().reshape(-1, x.shape[-1])
    indices, total = [], torch.zeros_like(rows)
    for q, layer in enumerate(rvq.layers):
        book = layer.codebook.detach().double()  # (K, D)
        if q == 0:
            per_row = book.expand(rows.shape[0], *book.shape)  # (P, K, D)
        else:
            mlp = rvq.mlps[q - 1]
            w, b = mlp.proj_in.weight.detach().double(), mlp.proj_in.bias.detach().double()
            pairs = torch.cat((total[:, None, :].expand(-1, book.shape[0], -1), book.expand(rows.shape[0], -1, -1)), -1)
            h = pairs @ w.T + b
            for block in mlp.layers:
                l1, l2 = block[0], block[2]
                inner = torch.nn.functional.silu(h @ l1.weight.detach().double().T + l1.bias.detach().double())
                h = h + inner @ l2.weight.detach().double().T + l2.bias.detach().double()
            per_row = h
        idx = (rows - total)[:, None, :].sub(per_row).pow(2).sum(-1).argmin(-1)
        total = total + per_row[torch.arange(rows.shape[0]), idx]
        indices.append(idx)
    return torch.stack(indices, -1), total


@pytest.mark.parametrize("mlp_kwargs", [None, dict(dim_hidden=7, depth=2)])
def test_implicit_neural_codebook_matches_fp64_reference(mlp_kwargs):
    torch.manual_seed(0)
    rvq = ResidualVQ(5, 9, 3, implicit_neural_codebook=True, mlp_kwargs=mlp_kwargs, backend="torch").eval()
    assert len(rvq.mlps) == 2 and all(not layer.ema_update and layer.learnable_codebook for layer in rvq.layers)
    x = torch.randn(3, 7, 5)
    q, idx, _ = rvq(x)
    ref_idx, ref_q = _qinco_reference(x, rvq)
    assert torch.equal(idx.reshape(-1, 3), ref_idx)
    torch.testing.assert_close(q.reshape(-1, 5).double(), ref_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q, rtol=0, atol=1e-6)
    coarse = rvq.get_codes_from_indices(idx[..., :2])  # missing fine stages decode to zero codes
    assert bool((coarse[2] == 0).all())


def test_implicit_neural_codebook_trains_codes_and_mlps_by_gradient():
    torch.manual_seed(1)
    rvq = ResidualVQ(4, 6, 2, implicit_neural_codebook=True, backend="torch").train()
    x = torch.randn(2, 9, 4, requires_grad=True)
    q, _, losses = rvq(x)
    (q.square().sum() + losses.sum()).backward()
    grads = [p.grad for p in (x, *rvq.mlps.parameters(), *(layer._codebook.embed for layer in rvq.layers))]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_codebook_transform_fn_is_a_per_position_codebook():
    # An affine transform per position of the (1, K, D) codes: the search must use each position's own codes.
    torch.manual_seed(2)
    vq = VectorQuantizer(3, 8, codebook_init="normal", backend="torch").eval()
    x = torch.randn(2, 5, 3)
    scale = torch.rand(2, 5, 1, 1) + 0.5

    def per_position(codes):  # (1, K, D) -> (1, B, N, K, D)
        return codes[:, None, None] * scale

    q, idx, _ = vq(x, codebook_transform_fn=per_position)
    books = (vq.codebook.detach().double()[None, None] * scale.double())  # (B, N, K, D)
    ref = (x.double()[..., None, :] - books).pow(2).sum(-1).argmin(-1)
    assert torch.equal(idx, ref)
    torch.testing.assert_close(q.double(), books.gather(-2, ref[..., None, None].expand(2, 5, 1, 3)).squeeze(-2))
    with pytest.raises(ValueError, match="per-position codes"):
        vq(x, codebook_transform_fn=lambda codes: codes)
    with pytest.raises(ValueError, match="no topk"):
        vq(x, codebook_transform_fn=per_position, topk=2)


def test_bad_inputs():
    rvq = ResidualVQ(4, 8, 2, codebook_weight=1.0, **GRADIENT, backend="torch")
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 4"):
        rvq(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"1 <= Q <= num_quantizers = 2"):
        rvq.get_output_from_indices(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 8\)"):
        rvq.get_output_from_indices(torch.tensor([[0, -2]]))
    with pytest.raises(TypeError, match="indices must be an int64"):
        rvq.get_output_from_indices(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        rvq(torch.randn(2, 5, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 5, 2\)"):
        rvq(torch.randn(2, 5, 4), indices=torch.zeros(2, 5, 3, dtype=torch.long))
