"""How real projects call vector-quantize-pytorch, made on fastvq with only the import changed.

The calls are written here from how each project uses the peer (its constructor keywords, the
layout it feeds, how it unpacks the result), at small sizes: audiolm-pytorch's SoundStream
(ResidualVQ with k-means init, dead codes, structured quantize dropout, stochastic sampling, the
rotation trick), meshgpt-pytorch (ResidualVQ with a shared codebook, stochastic sampling, a mask and
a per-call temperature), magvit2-pytorch (LFQ with several codebooks on channel-first video, with
the loss breakdown; FSQ with several codebooks) and muse-maskgit-pytorch (LFQ on image maps,
decoding indices back to projected codes).
"""

import pytest
import torch

from fastvq import FSQ, LFQ, ResidualVQ


@pytest.mark.parametrize("stochastic", [False, True])
def test_audiolm_soundstream_residual_vq(stochastic):
    rq = ResidualVQ(
        dim=16, num_quantizers=8, codebook_size=32, decay=0.95, commitment_weight=1.0,
        quantize_dropout_multiple_of=2, kmeans_init=True, threshold_ema_dead_code=2, quantize_dropout=True,
        quantize_dropout_cutoff_index=1, stochastic_sample_codes=stochastic, rotation_trick=True,
    )
    x = torch.randn(2, 40, 16, requires_grad=True)
    quantized, indices, commit_loss = rq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 40, 8) and commit_loss.shape == (8,)
    active = int((indices[0, 0] >= 0).sum())
    assert active % 2 == 0 and active >= 2  # stage counts rounded up to multiples of 2, cutoff index 1
    (quantized.sum() + commit_loss.sum()).backward()
    assert torch.isfinite(x.grad).all()
    rq.eval()
    quantized, indices, commit_loss = rq(x.detach())
    assert (indices >= 0).all() and torch.equal(commit_loss, torch.zeros(8))
    assert torch.allclose(rq.get_output_from_indices(indices), quantized, atol=1e-5)


def test_meshgpt_residual_vq_shared_codebook_with_mask():
    rq = ResidualVQ(
        dim=16, num_quantizers=2, codebook_size=32, shared_codebook=True, commitment_weight=1.0,
        stochastic_sample_codes=True, kmeans_init=True, sample_codebook_temp=0.1,
    )
    x = torch.randn(3, 12, 16, requires_grad=True)
    mask = torch.arange(12)[None] < torch.tensor([12, 7, 3])[:, None]
    quantized, codes, commit_loss = rq(x, mask=mask, sample_codebook_temp=0.5)
    assert quantized.shape == x.shape and codes.shape == (3, 12, 2) and commit_loss.shape == (2,)
    assert (codes[~mask] == -1).all() and (codes[mask] >= 0).all()
    assert (quantized[~mask] == 0).all()
    (quantized.sum() + commit_loss.sum()).backward()
    assert rq.layers[0]._codebook is rq.layers[1]._codebook


def test_magvit2_lfq_on_video_with_loss_breakdown():
    quantizer = LFQ(
        dim=8, codebook_size=2**4, num_codebooks=2, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
        diversity_gamma=1.0, soft_clamp_input_value=10, spherical=False,
    )
    video = torch.randn(1, 8, 3, 4, 4, requires_grad=True)
    (quantized, codes, aux_losses), breakdown = quantizer(video, return_loss_breakdown=True)
    assert quantized.shape == video.shape and codes.shape == (1, 3, 4, 4, 2) and aux_losses.shape == ()
    assert len(breakdown) == 3  # per-sample entropy, batch entropy, commitment
    (quantized.sum() + aux_losses).backward()
    assert torch.isfinite(video.grad).all()


def test_magvit2_fsq_on_video():
    quantizer = FSQ(levels=[8, 5, 5, 5], dim=8, num_codebooks=2)
    video = torch.randn(1, 8, 3, 4, 4)
    quantized, codes = quantizer(video)
    assert quantized.shape == video.shape and codes.shape == (1, 3, 4, 4, 2)


def test_muse_maskgit_lfq_decodes_projected_codes():
    quantizer = LFQ(dim=12, codebook_size=2**6, entropy_loss_weight=0.1)
    fmap = torch.randn(2, 12, 4, 4)
    quantized, indices, _ = quantizer(fmap)
    assert indices.shape == (2, 4, 4)
    decoded = quantizer.indices_to_codes(indices)  # projected back to dim, channel-first
    assert decoded.shape == fmap.shape and torch.allclose(decoded, quantized, atol=1e-6)
