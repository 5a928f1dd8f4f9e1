"""The grouped split alone: G quantizers on G feature slices, against an fp64 brute force per
group, the leading groups axis of the indices, decoding, layouts and errors."""

import pytest
import torch

from fastvq import FSQ, VectorQuantizer
from fastvq.quantizers.grouped import GroupedQuantizer
from fastvq.quantizers.residual import ResidualVQ


def test_vector_quantizer_groups_match_brute_force():
    torch.manual_seed(0)
    gradient = dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, eval_loss=True)
    groups = [VectorQuantizer(4, 7, commitment_weight=0.5, **gradient, backend="torch") for _ in range(3)]
    grouped = GroupedQuantizer(groups).eval()
    assert grouped.dim == 12
    z = torch.randn(2, 5, 12)
    q, idx, loss = grouped(z)
    assert q.shape == z.shape and idx.shape == (3, 2, 5)
    expected_loss = 0
    for g, vq in enumerate(groups):
        part = z[..., 4 * g : 4 * (g + 1)].double()
        book = vq.embed.detach().double()
        ref = ((part[..., None, :] - book) ** 2).sum(-1).argmin(-1)
        assert torch.equal(idx[g], ref)
        assert torch.equal(q[..., 4 * g : 4 * (g + 1)], vq.embed.detach()[ref])
        expected_loss = expected_loss + 1.5 * ((part - book[ref]) ** 2).mean()  # commitment + codebook
    torch.testing.assert_close(loss.double(), expected_loss)  # the sum over groups
    torch.testing.assert_close(grouped.last_losses.double(), torch.stack([
        1.5 * ((z[..., 4 * g : 4 * (g + 1)].double() - groups[g].embed.detach().double()[idx[g]]) ** 2).mean()
        for g in range(3)
    ]))
    assert torch.equal(grouped.get_output_from_indices(idx), q)


def test_residual_groups_on_an_image_feature_map():
    stages = dict(ema_update=False, learnable_codebook=True)  # codes fixed during the comparison
    rvqs = [ResidualVQ(3, 6, 2, **stages, backend="torch") for _ in range(2)]
    grouped = GroupedQuantizer(rvqs, accept_image_fmap=True)
    z = torch.randn(2, 6, 5, 3)  # (B, dim, H, W)
    q, idx, _ = grouped(z, generator=torch.Generator().manual_seed(0))
    assert q.shape == z.shape and idx.shape == (2, 2, 5, 3, 2)  # (G, B, H, W, Q)
    for g, rvq in enumerate(grouped.groups):
        q_g, idx_g, _ = rvq(z[:, 3 * g : 3 * (g + 1)].permute(0, 2, 3, 1))
        assert torch.equal(idx[g], idx_g)
        torch.testing.assert_close(q[:, 3 * g : 3 * (g + 1)], q_g.permute(0, 3, 1, 2))
    torch.testing.assert_close(grouped.get_output_from_indices(idx), q)
    assert "groups.1.layers.0._codebook.embed" in grouped.state_dict()


def test_fsq_groups_gradients_stay_in_their_slice():
    grouped = GroupedQuantizer([FSQ([5, 3]), FSQ([5, 3])])
    z = torch.randn(7, 4, requires_grad=True)
    q, idx, loss = grouped(z)
    assert idx.shape == (2, 7) and loss.item() == 0
    for g, fsq in enumerate(grouped.groups):
        assert torch.equal(q[:, 2 * g : 2 * (g + 1)], fsq(z[:, 2 * g : 2 * (g + 1)].detach()).quantized)
    (gz,) = torch.autograd.grad(q[:, :2].sum(), z)
    assert bool((gz[:, 2:] == 0).all()) and bool((gz[:, :2] != 0).any())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GroupedQuantizer([]), "at least one quantizer"),
        (lambda: GroupedQuantizer([FSQ([5, 5]), FSQ([5, 5, 5])]), "same input size dim, got \\[2, 3\\]"),
        (lambda: GroupedQuantizer([FSQ([5, 5])], accept_image_fmap=True, channel_last=True), "accept_image_fmap"),
    ],
)
def test_bad_constructions(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    grouped = GroupedQuantizer([FSQ([5, 5]), FSQ([5, 5])])
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 4"):
        grouped(torch.randn(3, 5))
    with pytest.raises(ValueError, match="G = num_groups = 2"):
        grouped.get_output_from_indices(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 25\)"):
        grouped.get_output_from_indices(torch.tensor([[0], [25]]))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    groups = [VectorQuantizer(2, 5, ema_update=True, backend="torch") for _ in range(3)]
    twins = [VectorQuantizer(2, 5, ema_update=True, backend="torch") for _ in range(3)]
    grouped, twin = GroupedQuantizer(groups), GroupedQuantizer(twins)
    twin.load_state_dict(grouped.state_dict())
    z = torch.randn(3, 7, 6)
    out = torch.compile(grouped, fullgraph=True, backend="aot_eager")(z)  # training: EMA updates inside
    ref = twin(z)
    assert torch.equal(out.indices, ref.indices)
    assert all(torch.equal(a.embed, b.embed) for a, b in zip(groups, twins, strict=True))
