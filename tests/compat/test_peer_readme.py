"""The calls of vector-quantize-pytorch's README for VectorQuantize, ResidualVQ, FSQ and LFQ, made on
fastvq with only the import changed: each configuration constructs, runs a training forward and a
backward, and returns what the peer's README says it returns (shapes; unpacking arity)."""

import pytest
import torch

import fastvq


def _train_step(module, x, **forward_kwargs):
    module.train()
    x = x.clone().requires_grad_()
    out = module(x, **forward_kwargs)
    loss = sum(t.sum() for t in out[2:] if isinstance(t, torch.Tensor) and t.is_floating_point()) if len(out) > 2 else 0
    (out[0].sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=32, codebook_size=64, decay=0.8, commitment_weight=1.0),  # basic usage
        dict(dim=32, codebook_size=64, rotation_trick=True),
        dict(dim=32, codebook_size=64, codebook_dim=8),  # lower codebook dimension
        dict(dim=32, codebook_size=64, use_cosine_sim=True),
        dict(dim=32, codebook_size=64, threshold_ema_dead_code=2),
        dict(dim=32, codebook_size=64, directional_reparam=True, threshold_ema_dead_code=2),
    ],
)
def test_vector_quantize_sequences(kwargs):
    vq = fastvq.VectorQuantize(**kwargs)
    quantized, indices, loss = _train_step(vq, torch.randn(2, 50, 32))
    assert quantized.shape == (2, 50, 32) and indices.shape == (2, 50) and loss.shape == ()


def test_directional_reparam_without_dead_code_revival_is_refused_as_by_the_peer():
    # The peer's README example omits threshold_ema_dead_code, and the peer itself then refuses it (assert).
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        fastvq.VectorQuantize(dim=32, codebook_size=64, directional_reparam=True, directional_reparam_variance=5e-3)


def test_vector_quantize_image_maps_orthogonal_and_heads():
    vq = fastvq.VectorQuantize(
        dim=32, codebook_size=64, accept_image_fmap=True, orthogonal_reg_weight=10,
        orthogonal_reg_max_codes=16, orthogonal_reg_active_codes_only=False,
    )
    quantized, indices, loss = _train_step(vq, torch.randn(1, 32, 6, 5))
    assert quantized.shape == (1, 32, 6, 5) and indices.shape == (1, 6, 5) and loss.shape == ()
    assert vq._codebook.embed.grad is not None  # the orthogonal term trains the codes
    heads = fastvq.VectorQuantize(
        dim=32, codebook_dim=8, heads=4, separate_codebook_per_head=True, codebook_size=64, accept_image_fmap=True
    )
    quantized, indices, loss = _train_step(heads, torch.randn(1, 32, 6, 5))
    assert quantized.shape == (1, 32, 6, 5) and indices.shape == (1, 6, 5, 4)


def test_residual_vq_returns_per_stage_losses_and_all_codes():
    rvq = fastvq.ResidualVQ(dim=32, num_quantizers=4, codebook_size=64)
    quantized, indices, losses = _train_step(rvq, torch.randn(1, 50, 32))
    assert quantized.shape == (1, 50, 32) and indices.shape == (1, 50, 4) and losses.shape == (4,)
    quantized, indices, losses, all_codes = rvq(torch.randn(1, 50, 32), return_all_codes=True)
    assert all_codes.shape == (4, 1, 50, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(diveq=True),
        dict(stochastic_sample_codes=True, sample_codebook_temp=0.1, shared_codebook=True),
        dict(kmeans_init=True, kmeans_iters=10),
    ],
)
def test_residual_vq_variants(kwargs):
    rvq = fastvq.ResidualVQ(dim=32, num_quantizers=4, codebook_size=64, **kwargs)
    quantized, indices, losses = _train_step(rvq, torch.randn(1, 50, 32))
    assert quantized.shape == (1, 50, 32) and indices.shape == (1, 50, 4) and losses.shape == (4,)


def test_fsq_and_lfq():
    fsq = fastvq.FSQ(levels=[8, 5, 5, 5])
    quantized, indices = fsq(torch.randn(1, 64, 4))
    assert quantized.shape == (1, 64, 4) and indices.shape == (1, 64)
    assert torch.equal(fsq.indices_to_codes(indices), quantized)
    lfq = fastvq.LFQ(codebook_size=2**8, dim=8, entropy_loss_weight=0.1, diversity_gamma=1.0)
    quantized, indices, entropy_aux_loss = lfq(torch.randn(1, 8, 4, 4))
    assert quantized.shape == (1, 8, 4, 4) and indices.shape == (1, 4, 4) and entropy_aux_loss.shape == ()
    assert torch.allclose(lfq.indices_to_codes(indices), quantized)
    seq = fastvq.LFQ(codebook_size=2**8, dim=16)
    quantized, indices, _ = seq(torch.randn(1, 50, 16))
    assert quantized.shape == (1, 50, 16) and indices.shape == (1, 50)
    multi = fastvq.LFQ(codebook_size=2**4, dim=8, num_codebooks=2)
    quantized, indices, _ = multi(torch.randn(1, 8, 4, 4))
    assert quantized.shape == (1, 8, 4, 4) and indices.shape == (1, 4, 4, 2)
