"""ResidualVQ against vector-quantize-pytorch's ResidualVQ (the peer, release 1.32): state_dict keys,
outputs, per-stage losses, EMA training steps and input gradients; return_all_codes against an fp64
lookup written from the peer's get_codes_from_indices."""

import random

import pytest
import torch

from fastvq.quantizers.output import ResidualVQOutputWithCodes
from fastvq.quantizers.residual import ResidualVQ

peer = pytest.importorskip("vector_quantize_pytorch")

CONFIGS = {
    "plain": dict(dim=6, codebook_size=16, num_quantizers=3),
    "projection": dict(dim=6, codebook_size=16, num_quantizers=3, codebook_dim=3),
    "per_stage_sizes": dict(dim=5, codebook_size=(16, 9, 5)),
    "no_rotation_trick": dict(dim=6, codebook_size=16, num_quantizers=3, rotation_trick=False),
    "grad_frac": dict(dim=6, codebook_size=16, num_quantizers=3, quant_grad_frac=0.25, learnable_codebook=True,
                      ema_update=False),
}


def _pair(seed: int = 0, **kwargs):
    """(peer's ResidualVQ, fastvq's) with the peer's random codebooks copied into fastvq's."""
    torch.manual_seed(seed)
    theirs = peer.ResidualVQ(**kwargs)
    ours = ResidualVQ(**kwargs, backend="torch")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _assert_same_step(theirs, ours, x, state_prefix="", **forward_kwargs):
    """One forward (+ backward of output and losses) of both: equal outputs, indices, losses, input
    gradients (in training: in eval the peer's stages give the input no gradient), and state afterwards
    (the codebooks; all buffers for EMA codebooks) under the keys that start with ``state_prefix``."""
    outs, grads = [], []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        out = module(xi, **forward_kwargs)
        if xi.requires_grad and out[0].requires_grad:
            w = torch.linspace(-1, 1, out[0].numel()).reshape(out[0].shape)  # a fixed, uneven upstream gradient
            ((out[0] * w).sum() + out[2].sum()).backward()
        outs.append(out)
        grads.append(xi.grad)
    (q_t, i_t, l_t, *_), (q_o, i_o, l_o, *_) = outs
    assert torch.equal(i_t, i_o)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-6)
    assert l_o.shape == l_t.shape == (ours.num_quantizers,)
    torch.testing.assert_close(l_o.detach(), l_t.detach(), rtol=1e-5, atol=1e-7)
    if ours.training:
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    state_t = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if not key.startswith(state_prefix) or not (ours.layers[0].ema_update or key.endswith(".embed")):
            continue  # usage statistics of a gradient-trained codebook are telemetry here
        torch.testing.assert_close(value.float(), state_t[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    return outs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_load_both_ways(name):
    theirs, ours = _pair(**CONFIGS[name])
    assert set(theirs.state_dict()) == set(ours.state_dict())
    torch.manual_seed(1)
    fresh = peer.ResidualVQ(**CONFIGS[name])
    fresh.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_and_training_steps_match_the_peer(name):
    theirs, ours = _pair(**CONFIGS[name])
    x = torch.randn(3, 7, CONFIGS[name]["dim"])
    theirs.eval(), ours.eval()
    _, _, losses = _assert_same_step(theirs, ours, x)[1]
    assert bool((losses == 0).all())  # the peer's stages return 0 in eval mode
    theirs.train(), ours.train()
    for _ in range(2):  # the EMA moves the codebooks between the steps
        _assert_same_step(theirs, ours, torch.randn(3, 7, CONFIGS[name]["dim"]))


def test_quantize_dropout_with_a_fixed_seed_matches_the_peer():
    kwargs = dict(dim=4, codebook_size=8, num_quantizers=5, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                  quantize_dropout_multiple_of=2)
    theirs, ours = _pair(**kwargs)
    seen = set()
    for seed in range(12):
        _, idx, losses = _assert_same_step(theirs, ours, torch.randn(2, 5, 4), rand_quantize_dropout_fixed_seed=seed)[1]
        active = int((idx[0, 0] >= 0).sum())
        # written from the peer's formula: j ~ randrange(cutoff, Q), then round_up_multiple(j + 1, 2)
        j = random.Random(seed).randrange(1, 5)
        assert active == min(-(-(j + 1) // 2) * 2, 5)
        assert bool((losses[active:] == 0).all())
        seen.add(active)
    assert seen == {2, 4, 5}


@pytest.mark.parametrize("zeros", [True, False])
def test_mask_matches_the_peer(zeros):
    theirs, ours = _pair(dim=4, codebook_size=8, num_quantizers=2, return_zeros_for_masked_padding=zeros)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    for training in (False, True):
        theirs.train(training), ours.train(training)
        q, idx, _ = _assert_same_step(theirs, ours, torch.randn(2, 5, 4), mask=mask)[1]
        assert bool((idx[1, 2:] == -1).all())


def test_freeze_codebook_per_call_matches_the_peer():
    theirs, ours = _pair(dim=4, codebook_size=8, num_quantizers=3)
    before = ours.codebooks.clone()
    _assert_same_step(theirs, ours, torch.randn(2, 9, 4), freeze_codebook=True, sample_codebook_temp=0.5)
    assert torch.equal(ours.codebooks, before)


def test_shared_ema_codebook_matches_the_peer():
    kwargs = dict(dim=4, codebook_size=8, num_quantizers=3, shared_codebook=True)
    try:
        theirs, ours = _pair(**kwargs)
    except NotImplementedError as err:  # the stages' manual_ema_update keyword is not there yet
        pytest.skip(str(err))
    assert all(layer._codebook is ours.layers[0]._codebook for layer in ours.layers)
    for _ in range(2):
        _assert_same_step(theirs, ours, torch.randn(2, 9, 4))


def test_return_all_codes_is_the_peers_fourth_value():
    # gradient-trained codes: an EMA step inside the forward would move them before the peer's lookup
    theirs, ours = _pair(dim=6, codebook_size=(7, 5, 3), codebook_dim=4, quantize_dropout=True,
                         ema_update=False, learnable_codebook=True)
    x = torch.randn(2, 9, 6)
    out = ours(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=3)
    assert isinstance(out, ResidualVQOutputWithCodes)
    quantized, indices, losses, all_codes = out  # the peer README's unpacking
    assert all_codes.shape == (3, 2, 9, 4)
    expected = torch.zeros(3, 2, 9, 4, dtype=torch.float64)  # fp64 lookup, zeros for dropped (-1) stages
    for q, layer in enumerate(ours.layers):
        kept = indices[..., q] >= 0
        expected[q][kept] = layer.codebook.detach().double()[indices[..., q][kept]]
    torch.testing.assert_close(all_codes.double(), expected)
    torch.testing.assert_close(ours.project_out(all_codes.sum(0)), quantized, rtol=1e-5, atol=1e-6)
    theirs_codes = theirs(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=3)[3]
    torch.testing.assert_close(all_codes, theirs_codes)
    # coarse indices (the first stage only) decode as the peer's
    torch.testing.assert_close(ours.get_codes_from_indices(indices[..., :1]),
                               theirs.get_codes_from_indices(indices[..., :1]))


def test_image_feature_maps_decode_as_the_peer():
    # The peer's ResidualVQ forward fails on (B, D, H, W) maps in 1.32; its decoding works: compare that,
    # and our forward against the channel-last run of the same stages.
    theirs, ours = _pair(dim=4, codebook_size=8, num_quantizers=2, accept_image_fmap=True)
    ours.eval()
    x = torch.randn(2, 4, 3, 5)
    q, idx, _ = ours(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 5, 2)
    last = ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, backend="torch").eval()
    last.load_state_dict(ours.state_dict())
    q_last, idx_last, _ = last(x.permute(0, 2, 3, 1))
    assert torch.equal(idx, idx_last) and torch.equal(q, q_last.permute(0, 3, 1, 2))
    torch.testing.assert_close(ours.get_codes_from_indices(idx), theirs.get_codes_from_indices(idx))


def test_cross_entropy_mode_sums_the_stage_losses():
    ours = ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, backend="torch")
    x = torch.randn(2, 5, 4)
    _, targets, _ = ours.eval()(x)
    try:
        quantized, ce = ours(x, indices=targets)
    except NotImplementedError as err:  # the stages' indices= keyword is not there yet
        pytest.skip(str(err))
    residual, expected = x, 0
    for q, layer in enumerate(ours.layers):
        e, stage_ce = layer(residual, indices=targets[..., q])
        residual, expected = residual - e.detach(), expected + stage_ce
    torch.testing.assert_close(ce, expected)
    assert quantized.shape == x.shape


def test_diveq_output_is_the_directional_reparameterisation():
    try:
        _, ours = _pair(dim=4, codebook_size=8, num_quantizers=2, diveq=True)
    except (NotImplementedError, TypeError) as err:  # route_gradients_to_input not there yet
        pytest.skip(str(err))
    assert ours.quant_grad_frac == 1.0 and all(not layer.ema_update for layer in ours.layers)
    x = torch.randn(3, 6, 4)
    try:
        q, idx, _ = ours(x)
    except ImportError as err:  # gradients.directional_reparam not there yet
        pytest.skip(str(err))
    codes = ours.get_output_from_indices(idx)
    # DiVeQ: x + ||e - x|| * unit(noised direction): the distance to x is exactly the code's
    torch.testing.assert_close((q - x).norm(dim=-1), (codes - x).norm(dim=-1), rtol=1e-5, atol=1e-6)


BEAM_CONFIGS = {
    "plain": dict(dim=6, codebook_size=16, num_quantizers=3),
    "weights_projection": dict(dim=6, codebook_size=7, num_quantizers=3, codebook_dim=4,
                               beam_score_quantizer_weights=[1.0, 0.5, 2.0], commitment_weight=0.6),
    "no_rotation_trick": dict(dim=5, codebook_size=(9, 6, 4), rotation_trick=False),
}


@pytest.mark.parametrize("beam", [2, 3])
@pytest.mark.parametrize("name", list(BEAM_CONFIGS))
def test_beam_search_in_eval_matches_the_peer(name, beam):
    theirs, ours = _pair(**BEAM_CONFIGS[name], beam_size=beam)  # strict load of the peer's state_dict
    theirs.eval(), ours.eval()
    dim = BEAM_CONFIGS[name]["dim"]
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    for kwargs in ({}, {"mask": mask}):
        _, idx, losses = _assert_same_step(theirs, ours, torch.randn(3, 7, dim), **kwargs)[1]
        assert bool((losses > 0).all())  # beam search reports the chosen codes' losses in eval too
    # A 2-D input (B, dim) and a per-call beam that differs from the constructor's.
    _assert_same_step(theirs, ours, torch.randn(11, dim), beam_size=beam + 1)


@pytest.mark.parametrize("name", list(BEAM_CONFIGS))
def test_beam_search_training_step_matches_the_peer(name):
    # The peer 1.32 updates only the FIRST stage's codebook after a beam search: its final
    # `all_residuals[..., 0, :]` picks stage 0 instead of beam 0, so its zip over the stages stops after
    # one. fastvq updates every stage (the peer's stated intent; test_residual_beam.py checks the later
    # stages against a reference); here the outputs, losses, gradients and stage 0's state must agree.
    dim = BEAM_CONFIGS[name]["dim"]
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    for kwargs in ({}, {"mask": mask}):  # a fresh pair each: the later stages differ after a step
        theirs, ours = _pair(**BEAM_CONFIGS[name], beam_size=2)
        theirs.train(), ours.train()
        _assert_same_step(theirs, ours, torch.randn(3, 7, dim), state_prefix="layers.0.", **kwargs)


QINCO_CONFIGS = {
    "default_mlp": dict(dim=6, codebook_size=16, num_quantizers=3),
    "small_mlp_no_rotation": dict(dim=5, codebook_size=9, num_quantizers=3, rotation_trick=False,
                                  mlp_kwargs=dict(dim_hidden=7, depth=2)),
    "projection": dict(dim=6, codebook_size=8, num_quantizers=2, codebook_dim=4),
}


@pytest.mark.parametrize("name", list(QINCO_CONFIGS))
def test_implicit_neural_codebook_matches_the_peer(name):
    kwargs = QINCO_CONFIGS[name] | {"implicit_neural_codebook": True}
    theirs, ours = _pair(**kwargs)  # strict load: the peer's mlps.<i>.* keys
    dim = kwargs["dim"]
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    theirs.eval(), ours.eval()
    _, idx, _ = _assert_same_step(theirs, ours, torch.randn(3, 7, dim))[1]
    torch.testing.assert_close(ours.get_output_from_indices(idx), theirs.get_output_from_indices(idx),
                               rtol=1e-5, atol=1e-6)
    theirs.train(), ours.train()
    for kwargs_ in ({}, {"mask": mask}):
        theirs.zero_grad(), ours.zero_grad()
        _assert_same_step(theirs, ours, torch.randn(3, 7, dim), **kwargs_)
        grads_t = {n: p.grad for n, p in theirs.named_parameters()}
        for n, p in ours.named_parameters():  # the codes and the MLPs train by gradient: equal gradients
            assert p.grad is not None and grads_t[n] is not None, n
            torch.testing.assert_close(p.grad, grads_t[n], rtol=1e-4, atol=1e-6, msg=n)
    # one optimizer step on both, then equal outputs again
    for module in (theirs, ours):
        torch.optim.SGD(module.parameters(), lr=0.5).step()
    _assert_same_step(theirs, ours, torch.randn(3, 7, dim))
