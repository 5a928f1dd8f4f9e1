"""VectorQuantizer: layouts, projections, telemetry, state_dict, errors, torch.compile."""

import math

import pytest
import torch

import fastvq
from fastvq import QuantizerOutput, VectorQuantizer
from fastvq.testing import assert_contract, vq_reference_fp64

# The VQ-VAE paper's choices (the bundled models pin them; the defaults are vector-quantize-pytorch's):
# a gradient-trained codebook with codebook weight 1, straight-through gradients.
GRADIENT = dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, rotation_trick=False)


def test_channel_last_forward_matches_the_functional_op():
    vq = VectorQuantizer(dim=6, codebook_size=11, commitment_weight=0.25, eval_loss=True, **GRADIENT, backend="torch")
    z = torch.randn(3, 5, 6)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    q, idx, loss = out  # unpacks like vector-quantize-pytorch
    assert q.shape == z.shape and idx.shape == (3, 5) and loss.shape == ()
    assert torch.equal(q, vq.codebook[idx])
    assert_contract(idx, z, vq.embed)
    ref_loss, _, _ = vq_reference_fp64(z, vq.embed, idx, 0.25, 1.0)
    torch.testing.assert_close(loss.double(), ref_loss)


def test_image_fmap_layout_and_round_trip():
    vq = VectorQuantizer(dim=4, codebook_size=9, accept_image_fmap=True, **GRADIENT, backend="torch")
    z = torch.randn(2, 4, 5, 7)
    q, idx, _ = vq(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 7)
    flat = z.permute(0, 2, 3, 1)
    expected_idx, _ = fastvq.nearest_code(flat, vq.embed, backend="torch")
    assert torch.equal(idx, expected_idx)
    assert torch.equal(vq.get_output_from_indices(idx), q)


def test_channel_first_sequence_layout():
    vq = VectorQuantizer(dim=3, codebook_size=5, channel_last=False, **GRADIENT, backend="torch")
    z = torch.randn(2, 3, 10)
    q, idx, _ = vq(z)
    assert q.shape == (2, 3, 10) and idx.shape == (2, 10)
    assert torch.equal(vq.get_output_from_indices(idx), q)


def test_low_dimensional_codebook_with_projections():
    vq = VectorQuantizer(dim=16, codebook_size=20, codebook_dim=4, **GRADIENT, backend="torch")
    z = torch.randn(8, 16, requires_grad=True)
    q, idx, loss = vq(z)
    # the peer's codebook: as stored, before the output projection
    assert vq.embed.shape == (20, 4) and vq.codebook.shape == (20, 4)
    assert vq._codebook.embed.shape == (1, 20, 4)
    assert q.shape == (8, 16)
    torch.testing.assert_close(q, vq.project_out(vq.codebook[idx]))
    torch.testing.assert_close(vq.get_codes_from_indices(idx), vq.codebook[idx])
    torch.testing.assert_close(vq.get_output_from_indices(idx), q)
    (q.sum() + loss).backward()
    assert vq.project_in.weight.grad is not None and vq._codebook.embed.grad is not None


def test_training_updates_the_codebook_toward_the_data():
    torch.manual_seed(1)
    vq = VectorQuantizer(dim=2, codebook_size=4, **GRADIENT, backend="torch")
    centers = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [3.0, -3.0], [-3.0, -3.0]])
    with torch.no_grad():
        vq.embed.copy_(centers + torch.randn(4, 2))
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    data = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2)
    for _ in range(100):
        opt.zero_grad()
        vq(data).loss.backward()
        opt.step()
    err = torch.cdist(vq.embed.detach(), centers).min(dim=0).values
    assert err.max() < 0.2


def test_usage_telemetry_from_the_batch():
    vq = VectorQuantizer(dim=2, codebook_size=8, backend="torch")
    z = vq.embed.detach()[[0, 0, 1, 1, 2, 2, 3, 3]] + 1e-4
    vq.train()
    vq(z)
    assert vq.codes_used_fraction.item() == pytest.approx(0.5)
    assert vq.perplexity.item() == pytest.approx(4.0, rel=1e-5)  # four codes, equally used
    vq.eval()
    vq(z[:2])  # eval forwards leave the telemetry alone
    assert vq.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    assert math.isfinite(vq.perplexity.item())


def test_state_dict_round_trip():
    a = VectorQuantizer(dim=5, codebook_size=7, codebook_dim=3, backend="torch")
    b = VectorQuantizer(dim=5, codebook_size=7, codebook_dim=3, backend="torch")
    b.load_state_dict(a.state_dict())
    z = torch.randn(4, 5)
    qa, ia, la = a(z)
    qb, ib, lb = b(z)
    assert torch.equal(ia, ib) and torch.equal(qa, qb) and torch.equal(la, lb)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0, codebook_size=4), "dim must be a positive int"),
        (dict(dim=4, codebook_size=0), "codebook_size must be a positive int"),
        (dict(dim=4, codebook_size=8, codebook_dim=-2), "codebook_dim"),
        (dict(dim=4, codebook_size=8, accept_image_fmap=True, accept_3d_fmap=True), "accept_3d_fmap"),
        (dict(dim=4, codebook_size=8, backend="cuda"), "backend must be one of"),
        (dict(dim=4, codebook_size=8, commitment_weight=-0.1), "commitment_weight"),
        (dict(dim=4, codebook_size=8, codebook_weight=1.0), "codebook_weight must be 0"),
        (dict(dim=4, codebook_size=8, ema_update=True, learnable_codebook=True), "cannot be combined"),
        (dict(dim=4, codebook_size=8, codebook_init="xavier"), "codebook_init"),
        (dict(dim=4, codebook_size=8, decay=1.0), "decay"),
        (dict(dim=4, codebook_size=8, kmeans_iters=-1), "kmeans_iters"),
        (dict(dim=4, codebook_size=8, threshold_ema_dead_code=-1), "threshold_ema_dead_code"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(**kwargs)


def test_bad_forward_inputs():
    vq = VectorQuantizer(dim=4, codebook_size=8, backend="torch")
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 4, got shape \(2, 3\)"):
        vq(torch.randn(2, 3))
    with pytest.raises(TypeError, match="floating dtype"):
        vq(torch.ones(2, 4, dtype=torch.long))
    fmap = VectorQuantizer(dim=4, codebook_size=8, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\) feature map"):
        fmap(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        vq.get_output_from_indices(torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="indices must be an int64"):
        vq.get_output_from_indices(torch.tensor([0.0]))


def test_torch_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.vq = VectorQuantizer(dim=8, codebook_size=16, accept_image_fmap=True, **GRADIENT, backend="auto")
            self.dec = torch.nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            q, idx, loss = self.vq(self.enc(x))
            return self.dec(q), idx, loss

    model = Model()
    x = torch.randn(2, 3, 6, 6)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out[1], eager[1])
    torch.testing.assert_close(out[0], eager[0])
    torch.testing.assert_close(out[2], eager[2])
    (out[0].square().mean() + out[2]).backward()
    assert model.vq._codebook.embed.grad is not None and model.enc.weight.grad is not None
