"""Every VectorQuantize option against vector-quantize-pytorch itself: one layer of each, the same
state (strict load), the same input and the same random stream; after a training step (and in eval
mode) the outputs, indices, loss terms, input gradients and codebooks must agree.

Skipped where the peer is not installed (CI); the options' formulas have their own tests in the
parts' files (test_sampling, test_regularizers, test_affine, test_codebook, test_gradients)."""

from functools import partial

import pytest
import torch

from fastvq import VectorQuantize

peer = pytest.importorskip("vector_quantize_pytorch")

DIM, K = 8, 16

# A tiny dead-code threshold keeps revival (whose random rows cannot follow the peer's draws) out of
# one step while the usage tracking it needs still runs.
OPTIONS = {
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "stochastic_cosine": dict(stochastic_sample_codes=True, use_cosine_sim=True),
    "gumbel_straight_through": dict(
        stochastic_sample_codes=True, straight_through=True, rotation_trick=False, route_gradients_to_input=False,
        ema_update=False,
    ),
    "cross_entropy_commitment": dict(commitment_use_cross_entropy_loss=True, ema_update=False),
    "cross_entropy_learnable": dict(commitment_use_cross_entropy_loss=True, learnable_codebook=True, ema_update=False),
    "diversity": dict(codebook_diversity_loss_weight=0.1, codebook_diversity_temperature=10.0, ema_update=False),
    "diversity_heads": dict(
        codebook_diversity_loss_weight=0.1, heads=2, codebook_dim=4, separate_codebook_per_head=True, ema_update=False
    ),
    "orthogonal": dict(orthogonal_reg_weight=10.0),
    "orthogonal_active_max": dict(
        orthogonal_reg_weight=10.0, orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=5
    ),
    "directional_reparam": dict(directional_reparam=True, threshold_ema_dead_code=1e-3),
    "sync_update": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "affine": dict(affine_param=True),
    "layernorm_projection": dict(codebook_dim=4, layernorm_after_project_in=True),
    "inplace_optimizer": dict(
        learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=partial(torch.optim.SGD, lr=0.5)
    ),
    "no_route_to_input": dict(learnable_codebook=True, ema_update=False, route_gradients_to_input=False),
    "manual_ema": dict(manual_ema_update=True),
    "dead_codes_learnable": dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=1e-3),
}

# With an EMA codebook the peer writes the new codes through ``.data`` before its backward runs, so
# the gradients of terms that read the codes (cross-entropy, diversity, Gumbel straight-through) use
# the UPDATED codes; fastvq's use the codes of the forward. Those terms agree only in value then.
EMA_VALUE_ONLY = {
    "cross_entropy_ema": dict(commitment_use_cross_entropy_loss=True),
    "diversity_ema": dict(codebook_diversity_loss_weight=0.1),
    "gumbel_straight_through_ema": dict(
        stochastic_sample_codes=True, straight_through=True, rotation_trick=False, route_gradients_to_input=False
    ),
}


def _pair(kwargs, seed=0):
    torch.manual_seed(seed)
    theirs = peer.VectorQuantize(dim=DIM, codebook_size=K, **kwargs)
    ours = VectorQuantize(dim=DIM, codebook_size=K, **kwargs, backend="torch")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _step(layer, x, seed, **forward_kwargs):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    quantized, indices, loss, breakdown = layer(x, return_loss_breakdown=True, **forward_kwargs)
    (quantized.square().sum() + loss).backward()
    return quantized.detach(), indices, loss.detach(), breakdown, x.grad


def _assert_same(theirs, ours, atol=1e-5):
    names = ("quantized", "indices", "loss", "breakdown", "x.grad")[: len(theirs)]
    for name, a, b in zip(names, theirs, ours, strict=True):
        if name == "breakdown":
            for term, u, v in zip(a._fields, a, b, strict=True):
                torch.testing.assert_close(v.detach().float(), u.detach().float(), atol=atol, rtol=1e-4, msg=term)
        else:
            torch.testing.assert_close(b, a, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_training_step_and_eval_match_the_peer(name):
    kwargs = OPTIONS[name]
    theirs, ours = _pair(kwargs)
    x = torch.randn(3, 10, DIM)
    _assert_same(_step(theirs, x, seed=1), _step(ours, x, seed=1))
    if kwargs.get("manual_ema_update"):
        theirs._codebook.update_ema()
        ours._codebook.update_ema()
    state_theirs, state_ours = theirs.state_dict(), ours.state_dict()
    assert state_theirs.keys() == state_ours.keys()
    for key in state_theirs:
        if key.endswith(("cluster_size", "embed_avg")) and not theirs.ema_update:
            # Without EMA the peer tracks usage only with revival, and the sums too, which nothing reads;
            # fastvq always tracks usage (telemetry) and never the unused sums.
            continue
        torch.testing.assert_close(state_ours[key].float(), state_theirs[key].float(), atol=1e-5, rtol=1e-4, msg=key)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        for a, b in zip(theirs(x), ours(x), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(EMA_VALUE_ONLY))
def test_terms_that_read_ema_codes_match_the_peer_in_value(name):
    theirs, ours = _pair(EMA_VALUE_ONLY[name])
    x = torch.randn(3, 10, DIM)
    a, b = _step(theirs, x, seed=1), _step(ours, x, seed=1)
    _assert_same(a[:4], b[:4])
    torch.testing.assert_close(ours.codebook, theirs.codebook, atol=1e-5, rtol=1e-4)


def test_forward_controls_match_the_peer():
    theirs, ours = _pair({})
    x = torch.randn(3, 10, DIM)
    weight = torch.rand(K)
    _assert_same(_step(theirs, x, 1, ema_update_weight=weight), _step(ours, x, 1, ema_update_weight=weight))
    for _ in range(2):
        _assert_same(_step(theirs, x, 2, accum_ema_update=True), _step(ours, x, 2, accum_ema_update=True))
    _assert_same(_step(theirs, x, 3), _step(ours, x, 3))
    torch.testing.assert_close(ours.codebook, theirs.codebook, atol=1e-5, rtol=1e-4)


def test_topk_and_cross_entropy_to_given_indices_match_the_peer():
    theirs, ours = _pair({})
    x = torch.randn(3, 10, DIM)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        for a, b in zip(theirs(x, topk=3), ours(x, topk=3), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    target = torch.randint(0, K, (3, 10))
    theirs.train(), ours.train()
    _, ce_theirs = theirs(x, indices=target)
    _, ce_ours = ours(x, indices=target)
    torch.testing.assert_close(ce_ours, ce_theirs, atol=1e-5, rtol=1e-4)
    theirs.train(), ours.train()
    torch.testing.assert_close(ours.codebook, theirs.codebook, atol=1e-5, rtol=1e-4)


def test_update_indices_and_expire_codes_match_the_peer():
    theirs, ours = _pair(dict(threshold_ema_dead_code=0.5))
    x = torch.randn(3, 10, DIM)
    target = torch.randint(0, K, (3, 10))
    theirs.update_indices(x, target)
    ours.update_indices(x, target)
    torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size)
    torch.testing.assert_close(ours._codebook.embed_avg, theirs._codebook.embed_avg, atol=1e-6, rtol=1e-5)
