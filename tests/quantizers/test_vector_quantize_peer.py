"""fastvq.VectorQuantize as vector-quantize-pytorch's VectorQuantize: defaults, keywords, returns, masks,
checkpoints. Tests marked ``peer`` compare with the peer itself (skipped where it is not installed); the
others check the same contract against references written here."""

import pytest
import torch

import fastvq
from fastvq import VectorQuantize
from fastvq.quantizers.vector_quantizer import LossBreakdown, QuantizerOutputWithBreakdown


@pytest.fixture
def peer():
    return pytest.importorskip("vector_quantize_pytorch").VectorQuantize


CONFIGS = [
    dict(dim=8, codebook_size=16),
    dict(dim=8, codebook_size=16, codebook_dim=4),
    dict(dim=8, codebook_size=16, heads=2, codebook_dim=4),
    dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True),
    dict(dim=8, codebook_size=16, use_cosine_sim=True),
    dict(dim=8, codebook_size=16, decay=0.5, commitment_weight=0.3),
]


def _pair(peer, kwargs, seed=0):
    """A peer layer and a fastvq layer holding the peer's state (strict load)."""
    torch.manual_seed(seed)
    theirs = peer(**kwargs)
    ours = VectorQuantize(**kwargs, backend="torch")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def test_alias_and_defaults():
    assert fastvq.VectorQuantize is fastvq.VectorQuantizer
    vq = VectorQuantize(dim=8, codebook_size=32)
    assert vq.ema_update and not vq.learnable_codebook and vq.codebook_weight == 0.0
    assert (vq.decay, vq.eps, vq.commitment_weight, vq.kmeans_iters) == (0.8, 1e-5, 1.0, 10)
    assert vq.rotation_trick and not VectorQuantize(dim=1, codebook_size=4).rotation_trick
    assert vq.codebook_dim == 8 and VectorQuantize(dim=8, codebook_size=4, heads=2).codebook_dim == 8
    assert vq.channel_last and vq.threshold_ema_dead_code == 0
    bound = (6 / (32 * 8)) ** 0.5  # kaiming-uniform over the (1, K, D) tensor, as the peer
    assert vq._codebook.embed.shape == (1, 32, 8) and vq._codebook.embed.abs().max() <= bound
    assert torch.equal(vq._codebook.cluster_size, torch.ones(1, 32))
    assert torch.equal(vq._codebook.embed_avg, vq._codebook.embed)
    assert [name for name, _ in vq.named_parameters()] == []  # an EMA codebook is a buffer
    vq.codebook = torch.ones(32, 8)  # the peer's setter
    assert torch.equal(vq._codebook.embed, torch.ones(1, 32, 8))
    learnable = VectorQuantize(dim=8, codebook_size=32, learnable_codebook=True)
    assert not learnable.ema_update and learnable.codebook_weight == learnable.commitment_weight


def test_unimplemented_and_misused_peer_keywords_raise_naming_them():
    with pytest.raises(NotImplementedError, match="sync_affine_param"):
        VectorQuantize(dim=4, codebook_size=8, sync_affine_param=True)
    VectorQuantize(dim=4, codebook_size=8, sync_affine_param=False)  # the default passes
    with pytest.raises(TypeError, match="not_a_keyword"):
        VectorQuantize(dim=4, codebook_size=8, not_a_keyword=1)
    vq = VectorQuantize(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="per-position codes"):  # the transform must give per-position codebooks
        vq(torch.randn(2, 3, 4), codebook_transform_fn=lambda e: e)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(straight_through=True), "at most one of"),  # rotation_trick defaults to True
        (dict(directional_reparam=True), "threshold_ema_dead_code"),
        (dict(straight_through=True, rotation_trick=False, learnable_codebook=True), "straight_through"),
        (dict(sync_update_v=0.5), "learnable_codebook"),
        (dict(sync_update_v=1.5, learnable_codebook=True), r"\[0, 1\]"),
        (dict(vq_bridge=torch.nn.Identity(), learnable_codebook=False), "vq_bridge"),
        (dict(affine_param=True, use_cosine_sim=True), "euclidean"),
    ],
)
def test_combinations_the_peer_refuses_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantize(dim=4, codebook_size=8, **kwargs)


def test_mask_excludes_rows_from_loss_and_ema_and_fills_outputs():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=3, codebook_size=5, decay=0.5, backend="torch")
    twin = VectorQuantize(dim=3, codebook_size=5, decay=0.5, backend="torch")
    twin.load_state_dict(vq.state_dict())
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    q, idx, loss = vq(x, mask=mask)
    q_ref, idx_ref, loss_ref = twin(x[mask][None])  # the valid rows alone
    assert torch.equal(idx[mask], idx_ref[0]) and (idx[~mask] == -1).all()
    torch.testing.assert_close(q[mask], q_ref[0])
    assert (q[~mask] == 0).all()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(vq._codebook.embed, twin._codebook.embed)
    torch.testing.assert_close(vq._codebook.cluster_size, twin._codebook.cluster_size)
    q_lens, idx_lens, _ = VectorQuantize(dim=3, codebook_size=5).eval()(x, lens=torch.tensor([4, 6]))
    assert (idx_lens[0, 4:] == -1).all() and (idx_lens[1] >= 0).all()
    keep = VectorQuantize(dim=3, codebook_size=5, return_zeros_for_masked_padding=False).eval()
    assert torch.equal(keep(x, mask=mask).quantized[~mask], x[~mask])


def test_freeze_codebook_and_eval_loss():
    vq = VectorQuantize(dim=4, codebook_size=8, backend="torch")
    before = vq._codebook.embed.clone()
    x = torch.randn(5, 4)
    vq(x, freeze_codebook=True)
    assert torch.equal(vq._codebook.embed, before)
    vq(x, ema_update=False)  # the peer's per-forward switch: no update this time
    assert torch.equal(vq._codebook.embed, before)
    vq(x)
    assert not torch.equal(vq._codebook.embed, before)
    with pytest.raises(NotImplementedError, match="ema_update"):
        VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True)(x, ema_update=True)
    vq.eval()
    assert vq(x).loss.item() == 0.0  # the peer's eval loss
    out = vq(x, return_loss_breakdown=True)
    assert isinstance(out, QuantizerOutputWithBreakdown) and isinstance(out.loss_breakdown, LossBreakdown)


def test_accept_3d_fmap():
    vq = VectorQuantize(dim=4, codebook_size=8, accept_3d_fmap=True, backend="torch").eval()
    x = torch.randn(2, 4, 3, 5, 6)
    q, idx, _ = vq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 5, 6)
    assert torch.equal(vq.get_output_from_indices(idx), q)


# -- against the peer -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_peer_state_dict_keys_and_eval_outputs(peer, kwargs):
    theirs, ours = _pair(peer, kwargs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = torch.randn(3, 10, 8)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t)
    assert l_o.shape == l_t.shape == () and l_o.item() == l_t.item() == 0.0
    torch.testing.assert_close(ours.codebook, theirs.codebook)
    if kwargs.get("heads", 1) == 1 or kwargs.get("separate_codebook_per_head"):  # the peer keeps a heads axis
        torch.testing.assert_close(ours.get_output_from_indices(i_t), theirs.get_output_from_indices(i_t))


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_peer_one_training_step_with_ema(peer, kwargs):
    theirs, ours = _pair(peer, kwargs)
    x = torch.randn(3, 10, 8)
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_t, i_t, l_t = theirs(x_t)
    q_o, i_o, l_o = ours(x_o)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(l_o, l_t)
    for name in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(ours._codebook, name), getattr(theirs._codebook, name), msg=name)
    g = torch.randn_like(x)
    (q_t * g).sum().add(l_t).backward()
    (q_o * g).sum().add(l_o).backward()
    torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["image", "channel_first"])
def test_peer_layouts(peer, layout):
    kwargs = dict(dim=4, codebook_size=8, accept_image_fmap=True) if layout == "image" else \
        dict(dim=4, codebook_size=8, channel_last=False)
    theirs, ours = _pair(peer, kwargs)
    x = torch.randn(2, 4, 5, 6) if layout == "image" else torch.randn(2, 4, 7)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(l_o, l_t)


def test_peer_learnable_codebook_gradients(peer):
    kwargs = dict(dim=6, codebook_size=8, learnable_codebook=True, ema_update=False, commitment_weight=0.4)
    theirs, ours = _pair(peer, kwargs)
    x = torch.randn(4, 5, 6)
    _, i_t, l_t = theirs(x)
    _, i_o, l_o = ours(x)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(l_o, l_t)
    l_t.backward(), l_o.backward()
    torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad)


def test_peer_mask_lens_and_breakdown(peer):
    theirs, ours = _pair(peer, dict(dim=4, codebook_size=8, decay=0.6))
    x = torch.randn(3, 7, 4)
    lens = torch.tensor([7, 3, 5])
    q_t, i_t, l_t, b_t = theirs(x, lens=lens, return_loss_breakdown=True)
    q_o, i_o, l_o, b_o = ours(x, lens=lens, return_loss_breakdown=True)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(l_o, l_t)
    assert b_o._fields == b_t._fields
    for a, b in zip(b_o, b_t, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed)
    torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size)


def test_peer_low_precision_input_keeps_its_dtype(peer):
    theirs, ours = _pair(peer, dict(dim=8, codebook_size=16))
    theirs.eval(), ours.eval()
    x = torch.randn(2, 9, 8, dtype=torch.bfloat16)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert q_o.dtype == q_t.dtype == torch.bfloat16 and l_o.dtype == l_t.dtype
    assert torch.equal(i_o, i_t) and torch.equal(q_o, q_t)
