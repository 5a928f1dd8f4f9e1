"""How VectorQuantizer wires the peer's options to their parts, checked against references written
here (the parts' formulas have their own tests; test_vector_quantize_options_peer.py compares with
the peer itself where it is installed)."""

from functools import partial

import torch

from fastvq import VectorQuantize

DIM, K = 6, 11


def _layer(**kwargs):
    torch.manual_seed(0)
    return VectorQuantize(dim=DIM, codebook_size=K, backend="torch", **kwargs)


def test_inplace_optimizer_steps_the_codes_towards_their_rows_then_searches_again():
    lr = 0.5
    vq = _layer(learnable_codebook=True, in_place_codebook_optimizer=partial(torch.optim.SGD, lr=lr))
    codes = vq.codebook.detach().double().clone()
    x = torch.randn(4, 9, DIM)
    rows = x.reshape(-1, DIM).double()
    idx = torch.cdist(rows, codes).argmin(-1)
    # d/de mean((e_idx - z)^2) over all elements, one SGD step
    grad = torch.zeros_like(codes).index_add_(0, idx, 2 * (codes[idx] - rows) / rows.numel())
    moved = codes - lr * grad
    quantized, indices, loss, breakdown = vq(x, return_loss_breakdown=True)
    torch.testing.assert_close(vq.codebook.detach().double(), moved, atol=1e-6, rtol=1e-6)
    assert torch.equal(indices.reshape(-1), torch.cdist(rows, moved).argmin(-1))  # the second search
    inplace_loss = (codes[idx] - rows).pow(2).mean()
    torch.testing.assert_close(breakdown.inplace_optimize.double(), inplace_loss, rtol=1e-5, atol=0)


def test_topk_returns_the_k_nearest_codes_best_first():
    vq = _layer().eval()
    x = torch.randn(3, 5, DIM)
    quantized, indices, loss = vq(x, topk=4)
    dist = torch.cdist(x.reshape(-1, DIM).double(), vq.codebook.double())
    assert indices.shape == (3, 5, 4) and quantized.shape == (3, 5, 4, DIM) and loss.shape == (3, 5, 4)
    assert torch.equal(indices.reshape(-1, 4), dist.topk(4, largest=False).indices)
    torch.testing.assert_close(quantized, vq.codebook[indices])
    torch.testing.assert_close(loss, (x.unsqueeze(-2) - quantized).pow(2).mean(-1))  # commitment 1.0


def test_cross_entropy_to_given_indices():
    vq = _layer().eval()
    x = torch.randn(2, 7, DIM)
    target = torch.randint(0, K, (2, 7))
    _, ce = vq(x, indices=target)
    logits = -torch.cdist(x.reshape(-1, DIM).double(), vq.codebook.double())
    torch.testing.assert_close(ce.double(), torch.nn.functional.cross_entropy(logits, target.reshape(-1)))


def test_no_route_to_input_and_sync_update():
    x = torch.randn(2, 5, DIM, requires_grad=True)
    vq = _layer(learnable_codebook=True, route_gradients_to_input=False, commitment_weight=0.0)
    vq(x)[0].sum().backward()
    assert x.grad is None and vq._codebook.embed.grad is not None  # the output is the codes themselves
    base = _layer(learnable_codebook=True, rotation_trick=False)
    synced = _layer(learnable_codebook=True, rotation_trick=False, sync_update_v=0.5, route_gradients_to_input=False)
    synced.load_state_dict(base.state_dict())
    base.route_gradients_to_input = False
    base(x.detach())[0].sum().backward()
    synced(x.detach())[0].sum().backward()
    torch.testing.assert_close(synced._codebook.embed.grad, 1.5 * base._codebook.embed.grad)


def test_bridge_and_layernorm_modules_have_the_peers_keys():
    bridged = _layer(vq_bridge=torch.nn.Linear(DIM, DIM))
    assert not bridged.ema_update and bridged.learnable_codebook  # the peer's defaults with a bridge
    assert {"_codebook.vq_bridge.weight", "_codebook.vq_bridge.bias"} <= set(bridged.state_dict())
    x = torch.randn(2, 5, DIM)
    quantized, indices, _ = bridged.eval()(x)
    torch.testing.assert_close(quantized, bridged.vq_bridge(bridged.codebook)[indices])
    normed = _layer(codebook_dim=4, layernorm_after_project_in=True)
    assert {"project_in.0.weight", "project_in.1.weight", "project_out.weight"} <= set(normed.state_dict())
    assert "project_in.weight" in _layer(codebook_dim=4).state_dict()  # one Linear without the LayerNorm


def test_stochastic_sampling_only_in_training():
    vq = _layer(stochastic_sample_codes=True, sample_codebook_temp=5.0)
    x = torch.randn(8, 50, DIM)
    nearest = torch.cdist(x.reshape(-1, DIM), vq.codebook).argmin(-1)
    vq.eval()
    assert torch.equal(vq(x)[1].reshape(-1), nearest)
    vq.train()
    torch.manual_seed(3)
    sampled = vq(x, ema_update=False)[1].reshape(-1)
    assert 0.05 < (sampled != nearest).float().mean() < 0.95  # a hot temperature draws other codes
    assert torch.equal(vq(x, sample_codebook_temp=0.0, ema_update=False)[1].reshape(-1), nearest)
