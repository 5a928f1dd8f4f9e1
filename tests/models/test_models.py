"""The bundled models: one optimisation step each at a tiny size, and the maths they rest on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastvq.models import MODELS, build_model
from fastvq.models.blocks import ConvNetConfig, Decoder, Encoder
from fastvq.models.discriminator import PatchDiscriminator
from fastvq.models.losses import PerceptualLoss, adaptive_weight, hinge_d_loss
from fastvq.models.prior import PriorConfig, TransformerPrior, filter_logits
from fastvq.models.quantizer_registry import build_quantizer
from fastvq.models.vae import VAE, VAEConfig, kl_to_standard_normal
from fastvq.models.vqgan import VQGAN, VQGANConfig
from fastvq.models.vqvae import VQVAE, VQVAEConfig, usage_stats
from fastvq.quantizers.textbook import TextbookQuantizer

SMALL = {"ch": 8, "ch_mult": (1, 2), "codebook_size": 16, "embed_dim": 4}
IMAGE_MODELS = {
    "ae": {"ch": 8, "ch_mult": (1, 2)},
    "vae": {"ch": 8, "ch_mult": (1, 2)},
    "vqvae": SMALL,
    "vqgan": {**SMALL, "disc_start": 0, "disc_ndf": 8},
}


def _images(b=4, size=16):
    return torch.rand(b, 3, size, size) * 2 - 1


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_one_optimisation_step(name):
    cfg_cls, _ = MODELS[name]
    model = build_model(name, cfg_cls.preset("tiny", **IMAGE_MODELS[name]))
    groups = model.optim_groups()
    opts = {k: torch.optim.AdamW(v, lr=1e-3) for k, v in groups.items()}
    before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
    x = _images()
    losses = model.training_losses(x, None, step=0)
    for key in groups:
        assert losses[key].dim() == 0 and torch.isfinite(losses[key])
        losses[key].backward(inputs=groups[key], retain_graph=True)
        opts[key].step()
    assert all(torch.isfinite(v).all() for v in losses.values())
    for key, params in groups.items():
        assert any(not torch.equal(p, q) for p, q in zip(params, before[key], strict=True)), key
    with torch.no_grad():
        assert model.reconstruct(x).shape == x.shape
        if hasattr(model, "sample"):
            assert model.sample(3, 16).shape == (3, 3, 16, 16)


def test_encoder_decoder_shapes_with_attention():
    cfg = ConvNetConfig(ch=8, ch_mult=(1, 2, 2), attn=True, num_res_blocks=2)
    z = Encoder(cfg, 5)(_images(2, 32))
    assert z.shape == (2, 5, 8, 8)
    assert Decoder(cfg, 5)(z).shape == (2, 3, 32, 32)


def test_presets_build_and_reject_unknown_names():
    for cfg_cls, _ in MODELS.values():
        assert set(cfg_cls.PRESETS) >= {"tiny", "base"}
        cfg = cfg_cls.preset("base")
        assert cfg_cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="preset"):
        VQVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown"):
        VQVAEConfig.preset("tiny", codebook_sise=3)


# -- VAE ---------------------------------------------------------------------------------------


def test_vae_kl_matches_the_closed_form():
    torch.manual_seed(1)
    mu, logvar = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), expected)
    assert torch.all(kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_vae_elbo_is_reconstruction_plus_kl():
    model = VAE(VAEConfig.preset("tiny", ch=8, ch_mult=(1, 2)))
    torch.manual_seed(0)
    out = model.training_losses(_images())
    assert out["elbo"] < 0 and out["kl"] > 0
    # loss per pixel = recon / (2 sigma^2) + beta * kl / D  (the ELBO without its constant)
    d = 3 * 16 * 16
    expected = out["recon"] / (2 * 0.1**2) + out["kl"] / d
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-4, atol=1e-5)


# -- VQ-VAE ------------------------------------------------------------------------------------


def test_codebook_starts_from_kmeans_of_encoder_outputs():
    model = VQVAE(VQVAEConfig.preset("tiny", **SMALL, dead_code_threshold=0.0))
    x = _images(8)
    model.train()
    z = model.encoder(x).detach().movedim(1, -1).reshape(-1, 4)
    random_codes = model.quantizer.embed.detach().clone()
    model.training_losses(x)
    assert model.quantizer._codebook._initted and bool(model.quantizer._codebook.initted)
    codes = model.quantizer.embed.detach()

    def error(c):  # mean squared distance of the batch to its nearest code
        return ((z[:, None, :] - c[None]) ** 2).sum(-1).min(1).values.mean()

    # k-means centroids of this very batch fit it far better than the random init did
    assert error(codes) < 0.2 * error(random_codes)


def test_dead_codes_are_restarted_onto_encoder_outputs():
    model = VQVAE(VQVAEConfig.preset("tiny", **SMALL, dead_code_threshold=100.0))  # every code counts as dead
    model.train()
    x = _images(8)
    model.training_losses(x)
    z = model.encoder(x).detach().movedim(1, -1).reshape(-1, 4)
    assert torch.cdist(model.quantizer.embed.detach(), z).min(dim=1).values.max() < 1e-3


def test_textbook_and_fastvq_quantizers_agree():
    torch.manual_seed(0)
    fast = build_quantizer("vq", 4, 16, 0.25)
    slow = TextbookQuantizer(4, 16)
    slow.embed.data.copy_(fast.embed.data)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    a, b = fast(z), slow(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.quantized, b.quantized)
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        build_quantizer("nope", 4, 16, 0.25)


def test_usage_stats():
    stats = usage_stats(torch.tensor([0, 1, 1, 3]), 8)
    assert stats["codes_used_fraction"] == 3 / 8
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert abs(stats["perplexity"] - float(torch.exp(-(p * p.log()).sum()))) < 1e-9


# -- VQ-GAN ------------------------------------------------------------------------------------


def test_adaptive_weight_matches_a_hand_computation():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    a = torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    nll = (w * a).sum() ** 2  # d/dw = 2 (w.a) a
    g = (w**2).sum()  # d/dw = 2 w
    s = float((w.detach() * a).sum())
    grad_nll = 2 * s * a
    grad_g = 2 * w.detach()
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(nll, g, w), expected)
    assert adaptive_weight(nll * 0, g, w) == 0
    assert adaptive_weight(nll, g * 0, w) == 1e4  # clamped


def test_hinge_loss_and_patch_discriminator():
    assert hinge_d_loss(torch.full((2, 1), 2.0), torch.full((2, 1), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(2, 1), torch.zeros(2, 1)) == 1
    assert PatchDiscriminator(3, 8, 2)(_images(2, 32)).shape == (2, 1, 6, 6)


def test_vqgan_discriminator_waits_for_disc_start():
    model = VQGAN(VQGANConfig.preset("tiny", **SMALL, disc_start=5, disc_ndf=8))
    out = model.training_losses(_images(), step=4)
    assert not out["disc_loss"].requires_grad and "g_loss" not in out
    out = model.training_losses(_images(), step=5)
    assert out["disc_loss"].requires_grad and out["disc_weight"] >= 0
    groups = model.optim_groups()
    assert len(groups["loss"]) + len(groups["disc_loss"]) == len(list(model.parameters()))


def test_perceptual_loss_from_local_weights(tmp_path):
    from fastvq.models import losses

    torch.manual_seed(0)
    convs, ch, index = {}, 3, 0
    for v in losses._VGG16:
        if v == "M":
            index += 1
            continue
        convs[f"features.{index}.weight"] = torch.randn(v, ch, 3, 3) * 0.05
        convs[f"features.{index}.bias"] = torch.zeros(v)
        ch, index = v, index + 2
    save_file(convs, str(tmp_path / "vgg.safetensors"))
    loss = PerceptualLoss(tmp_path / "vgg.safetensors")
    x = _images(2, 32)
    assert loss(x, x) == 0
    assert loss(x, -x) > 0
    with pytest.raises(FileNotFoundError):
        PerceptualLoss(tmp_path / "missing.safetensors")
    model = VQGAN(VQGANConfig.preset("tiny", **SMALL, disc_ndf=8, perceptual_weights=str(tmp_path / "vgg.safetensors")))
    assert "perceptual" in model.training_losses(_images(2, 32))
    assert not any("perceptual" in k for k in model.state_dict())


# -- transformer prior --------------------------------------------------------------------------


def _prior(**kw):
    torch.manual_seed(0)
    return TransformerPrior(PriorConfig(vocab_size=11, seq_len=9, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def test_prior_step_and_causality():
    prior = _prior().train()
    codes = torch.randint(0, 11, (4, 3, 3))
    out = prior.training_losses(codes)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    # changing a later token never changes earlier logits
    prior.eval()
    tokens = torch.randint(0, 11, (1, 6))
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 11
    torch.testing.assert_close(prior(tokens)[:, :4], prior(changed)[:, :4])


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 4}, {"top_p": 0.8}])
def test_kv_cache_sampling_equals_no_cache_sampling(kw):
    prior = _prior()
    a = prior.generate(5, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = prior.generate(5, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (5, 9) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 11


def test_kv_cache_logits_equal_full_forward():
    prior = _prior()
    tokens = torch.randint(0, 11, (2, 7))
    full = prior(tokens)
    caches = [{} for _ in prior.blocks]
    steps = [prior(tokens[:, :3], 0, caches)] + [prior(tokens[:, t : t + 1], t, caches) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_class_conditional_prior():
    prior = _prior(class_cond=True, num_classes=3)
    labels = torch.tensor([0, 2])
    out = prior.training_losses(torch.randint(0, 11, (2, 9)), labels)
    assert torch.isfinite(out["loss"])
    seqs = prior.generate(2, labels=labels, generator=torch.Generator().manual_seed(0))
    assert seqs.shape == (2, 9)
    with pytest.raises(ValueError, match="class labels"):
        prior.generate(2)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits)).any()


@pytest.mark.parametrize(
    ("quantizer", "kwargs", "k", "dim"),
    [
        ("fsq", {"levels": [4, 4]}, 16, 2),
        ("lfq", {}, 16, 4),
        ("textbook", {}, 16, 4),
        ("vq", {"kmeans_init": True}, 16, 4),
    ],
)
def test_vqvae_takes_any_quantizer_of_the_family(quantizer, kwargs, k, dim):
    model = VQVAE(VQVAEConfig.preset("tiny", **{**SMALL, "codebook_size": k, "embed_dim": dim},
                                     quantizer=quantizer, quantizer_kwargs=kwargs))
    out = model.training_losses(_images())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 < out["codes_used"] <= 1
    idx = model.encode_indices(_images(2))
    assert idx.shape == (2, 8, 8) and idx.max() < k
    assert model.decode_indices(idx).shape == (2, 3, 16, 16)


def test_fsq_levels_must_match_the_codebook_size():
    with pytest.raises(ValueError, match="levels"):
        build_quantizer("fsq", 2, 16, 0.25, levels=[4, 5])


def test_validation_usage_matches_the_quantizers_telemetry():
    from fastvq import VectorQuantizer

    vq = VectorQuantizer(4, 32, accept_image_fmap=True).train()
    out = vq(torch.randn(3, 4, 5, 7))
    stats = usage_stats(out.indices, 32)
    assert stats["codes_used_fraction"] == pytest.approx(float(vq.codes_used_fraction))
    assert stats["perplexity"] == pytest.approx(float(vq.perplexity), rel=1e-5)


def test_ema_quantizers_keep_their_own_codebook_care():
    model = VQVAE(VQVAEConfig.preset("tiny", **SMALL, quantizer_kwargs={"ema_update": True}))
    before = model.quantizer.embed.detach().clone()
    model.training_losses(_images())
    assert not torch.equal(before, model.quantizer.embed.detach())  # the EMA update did move it


def test_vqvae_quantizer_pins_its_training_choices():
    """VectorQuantizer's defaults are vector-quantize-pytorch's; the VQ-VAE keeps what it trains with."""
    vq = build_quantizer("vq", 4, 16, 0.25)
    assert not vq.ema_update and vq.learnable_codebook and not vq.rotation_trick
    assert (vq.commitment_weight, vq.codebook_weight, vq.codebook_dim, vq.eval_loss) == (0.25, 1.0, 4, True)
    assert [name for name, _ in vq.named_parameters()] == ["_codebook.embed"]
    ema = build_quantizer("vq", 4, 16, 0.25, ema_update=True)
    assert ema.ema_update and not ema.learnable_codebook and ema.codebook_weight == 0.0
