"""LFQ: bits and indices, sign quantization, straight-through gradient, the entropy terms (the peer's
clamped dense default and the exact opt-in) against an fp64 reference, the factorised upper bound,
num_codebooks / spherical / soft clamp / mask, layouts, projections, errors, and vector-quantize-pytorch
itself (when installed) loaded with the same state_dict.

The reference materialises all 2^d codes and the (N, 2^d) soft assignment
p_n(c) = softmax_c(-inv_temperature ||x_n - c||^2) straight from the distances (MAGVIT-v2, Yu et al.
2023): it shares no code with fastvq.quantizers.lfq.
"""

import inspect
import math

import pytest
import torch

from fastvq import LFQ
from fastvq.quantizers.lfq import LFQOutput, LossBreakdown, batch_code_distribution, batch_entropy, per_sample_entropy


def _all_codes(d: int, scale: float) -> torch.Tensor:
    """(2^d, d) fp64 codes in index order: bit i of index j is feature i, feature 0 most significant."""
    j = torch.arange(2**d)
    bits = torch.stack([(j >> (d - 1 - i)) & 1 for i in range(d)], dim=-1)
    return torch.where(bits == 1, scale, -scale).double()


def _entropy(p: torch.Tensor, clamp: bool) -> torch.Tensor:
    log_p = torch.log(p.clamp_min(1e-5)) if clamp else torch.log(torch.where(p > 0, p, 1.0))
    return -(p * log_p).sum(-1)


def _reference_terms(x, scale, inv_temperature, clamp=False, spherical=False):
    """(per-sample entropy, batch entropy, batch distribution) of tokens x (N, d) (or (N, c, d): the
    terms averaged over the c codebooks) from the full fp64 softmax over the 2^d codes."""
    x = x.double()
    x = x.reshape(-1, 1, x.shape[-1]) if x.dim() == 2 else x
    codes = _all_codes(x.shape[-1], scale)
    if spherical:
        codes = codes / codes.norm(dim=-1, keepdim=True) * scale
    logits = -inv_temperature * ((x[:, :, None, :] - codes) ** 2).sum(-1)  # (N, c, 2^d)
    p = torch.softmax(logits, dim=-1)
    avg = p.mean(0)  # (c, 2^d)
    return _entropy(p, clamp).mean(), _entropy(avg, clamp).mean(), avg.squeeze(0)


def _reference_forward(z, *, scale=1.0, inv_t=100.0, w_entropy=0.1, w_commit=0.0, gamma=1.0, clamp=True,
                       num_codebooks=1, spherical=False, soft_clamp=None):
    """fp64 (quantized codes, indices, loss) of channel-last z (..., c * d) without projections."""
    x = z.double()
    if soft_clamp is not None:
        x = soft_clamp * torch.tanh(x / soft_clamp)
    x = x.reshape(*x.shape[:-1], num_codebooks, -1)  # (..., c, d)
    d = x.shape[-1]
    if spherical:
        x = x / x.norm(dim=-1, keepdim=True) * scale
    q = torch.where(x > 0, scale, -scale).double()
    idx = sum((x[..., i] > 0).long() << (d - 1 - i) for i in range(d))
    if spherical:
        q = torch.sign(q) / math.sqrt(d) * scale  # the l2-normalised code, times the scale
    sample, batch, _ = _reference_terms(x.reshape(-1, num_codebooks, d), scale, inv_t, clamp, spherical)
    loss = w_entropy * (sample - gamma * batch) + w_commit * ((x - q) ** 2).mean()
    return q.flatten(-2), idx, loss


def _lfq64(**kwargs) -> LFQ:
    return LFQ(force_quantization_f32=False, **kwargs).double()


# ------------------------------------------------------------------------------------------------
# the peer's keywords, defaults and returns


PEER_DEFAULTS = dict(
    dim=None, codebook_size=None, entropy_loss_weight=0.1, commitment_loss_weight=0.0, diversity_gamma=1.0,
    num_codebooks=1, keep_num_codebooks_dim=None, codebook_scale=1.0, frac_per_sample_entropy=1.0,
    has_projections=None, projection_has_bias=True, soft_clamp_input_value=None, cosine_sim_project_in=False,
    cosine_sim_project_in_scale=None, channel_first=None, experimental_softplus_entropy_loss=False,
    entropy_loss_offset=5.0, spherical=False, force_quantization_f32=True, orthogonal_rotation=False,
)


def test_constructor_and_forward_keywords_and_defaults_are_the_peers():
    params = inspect.signature(LFQ.__init__).parameters
    for name, default in PEER_DEFAULTS.items():
        assert params[name].default == default, name
        assert params[name].kind == inspect.Parameter.KEYWORD_ONLY
    assert params["exact_entropy"].default is False  # fastvq's choice is opt-in
    fwd = inspect.signature(LFQ.forward).parameters
    assert list(fwd)[1:] == ["x", "inv_temperature", "return_loss_breakdown", "mask"]
    assert fwd["inv_temperature"].default == 100.0 and fwd["return_loss_breakdown"].default is False


def test_defaults_match_the_clamped_reference_in_fp64():
    lfq = _lfq64(dim=5)
    z = torch.randn(3, 11, 5, dtype=torch.float64)
    for inv_t in (100.0, 0.4):
        out = lfq(z, inv_temperature=inv_t)
        assert isinstance(out, LFQOutput) and out._fields == ("quantized", "indices", "entropy_aux_loss")
        q, idx, loss = _reference_forward(z, inv_t=inv_t)
        assert torch.equal(out.quantized, q) and torch.equal(out.indices, idx.squeeze(-1))
        assert out.indices.dtype == torch.int64
        torch.testing.assert_close(out.entropy_aux_loss, loss, rtol=1e-10, atol=1e-12)
        assert out.loss is out.entropy_aux_loss
    # the clamp at 1e-5 is what makes the default differ from the exact entropy
    _, _, exact = _reference_forward(z, inv_t=2.0, clamp=False)
    assert abs(float(lfq(z, inv_temperature=2.0).loss - exact)) > 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_codebooks=2, codebook_size=8, commitment_loss_weight=0.5),
        dict(spherical=True, codebook_scale=1.5, commitment_loss_weight=1.0),
        dict(soft_clamp_input_value=1.5, commitment_loss_weight=0.25, diversity_gamma=0.7),
        dict(exact_entropy=True, num_codebooks=2, codebook_size=8),
        dict(exact_entropy=True, spherical=True, commitment_loss_weight=1.0),
    ],
)
def test_options_match_the_reference_in_fp64(kwargs):
    c = kwargs.get("num_codebooks", 1)
    dim = 3 * c if "codebook_size" in kwargs else 6
    lfq = _lfq64(dim=dim, **kwargs)
    z = torch.randn(4, 9, dim, dtype=torch.float64)
    (q, idx, loss), breakdown = lfq(z, inv_temperature=0.8, return_loss_breakdown=True)
    ref_q, ref_idx, ref_loss = _reference_forward(
        z, scale=kwargs.get("codebook_scale", 1.0), inv_t=0.8, w_commit=kwargs.get("commitment_loss_weight", 0.0),
        gamma=kwargs.get("diversity_gamma", 1.0), clamp=not kwargs.get("exact_entropy", False), num_codebooks=c,
        spherical=kwargs.get("spherical", False), soft_clamp=kwargs.get("soft_clamp_input_value"),
    )
    torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-15)
    assert torch.equal(idx, ref_idx if c > 1 else ref_idx.squeeze(-1))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert isinstance(breakdown, LossBreakdown)
    entropy = breakdown.per_sample_entropy - kwargs.get("diversity_gamma", 1.0) * breakdown.batch_entropy
    torch.testing.assert_close(loss, 0.1 * entropy + kwargs.get("commitment_loss_weight", 0.0) * breakdown.commitment)


def test_eval_mode_loss_is_zero_and_output_is_the_code():
    lfq = LFQ(dim=6, commitment_loss_weight=1.0).eval()
    z = torch.randn(8, 3, 6, requires_grad=True)
    (q, idx, loss), breakdown = lfq(z, return_loss_breakdown=True)
    assert loss.item() == 0.0 and all(t.item() == 0.0 for t in breakdown)
    assert torch.equal(q, torch.where(z > 0, 1.0, -1.0)) and not q.requires_grad  # as the peer: no estimator


def test_mask_restricts_both_losses_to_the_kept_tokens():
    lfq = _lfq64(dim=4, commitment_loss_weight=0.5)
    z = torch.randn(2, 7, 4, dtype=torch.float64)
    mask = torch.rand(2, 7) > 0.4
    mask[0, 0] = True
    loss = lfq(z, inv_temperature=0.5, mask=mask).loss
    _, _, ref = _reference_forward(z[mask], inv_t=0.5, w_commit=0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_frac_per_sample_entropy_uses_a_random_subset_of_tokens():
    lfq = _lfq64(dim=4, frac_per_sample_entropy=0.5)
    z = torch.randn(2, 10, 4, dtype=torch.float64)
    torch.manual_seed(3)
    loss = lfq(z, inv_temperature=0.5).loss
    torch.manual_seed(3)
    keep = torch.randn(20).argsort(dim=-1) < 10  # the peer's draw from the global CPU generator
    _, _, ref = _reference_forward(z.reshape(20, 4)[keep], inv_t=0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# bits, quantization, gradients


def test_bits_indices_and_codes_round_trip():
    lfq = LFQ(codebook_size=2**7, codebook_scale=0.5)
    all_idx = torch.arange(lfq.codebook_size)
    bits = lfq.indices_to_bits(all_idx)
    assert bits.dtype == torch.bool and bits.shape == (128, 7)
    assert torch.equal(lfq.bits_to_indices(bits), all_idx)
    codes = lfq.indices_to_codes(all_idx)
    assert torch.equal(codes, _all_codes(7, 0.5).float())
    assert torch.equal(lfq.codes_to_indices(codes), all_idx)
    assert torch.equal(lfq.codebook, codes) and torch.equal(lfq.bits_to_codes(bits.float()), codes)


@pytest.mark.parametrize("d", [1, 5, 8])
def test_forward_is_sign_quantization_with_bit_indices(d):
    lfq = LFQ(dim=d, codebook_scale=0.75)
    z = torch.randn(3, 41, d)
    z[0, 0] = 0.0  # zero goes to the negative code (bit 0), as x > 0 defines the bit
    q, idx, loss = lfq(z)
    assert lfq.codebook_size == 2**d and q.shape == z.shape and idx.shape == (3, 41) and idx.dtype == torch.int64
    assert torch.equal(q, torch.where(z > 0, 0.75, -0.75))
    expected = sum(((z[..., i] > 0).long() << (d - 1 - i)) for i in range(d))
    assert torch.equal(idx, expected)
    assert idx[0, 0] == 0
    assert torch.equal(lfq.indices_to_codes(idx), q) and torch.equal(lfq.get_output_from_indices(idx), q)
    assert loss.shape == () and loss.dtype == torch.float32


def test_straight_through_gradient_is_identity_or_the_activation():
    lfq = LFQ(dim=6, entropy_loss_weight=0.0)
    z = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(10, 6)
    q, _, loss = lfq(z)
    (q * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert loss.item() == 0.0
    tanh = LFQ(dim=6, straight_through_activation=torch.nn.Tanh())
    (gz,) = torch.autograd.grad((tanh(z).quantized * w).sum(), z)
    torch.testing.assert_close(gz, w * (1 - torch.tanh(z.detach()) ** 2))


# ------------------------------------------------------------------------------------------------
# the exact entropies (exact_entropy=True)


@pytest.mark.parametrize("d,inv_t,scale", [(1, 1.0, 1.0), (2, 0.3, 1.0), (5, 0.7, 0.5), (8, 100.0, 1.0), (8, 0.2, 2.0)])
def test_entropy_terms_match_the_exact_2_pow_d_computation(d, inv_t, scale):
    lfq = _lfq64(dim=d, codebook_scale=scale, exact_entropy=True)
    x = torch.randn(37, d, dtype=torch.float64)
    ref_sample, ref_batch, ref_avg = _reference_terms(x, scale, inv_t)
    assert lfq.batch_entropy_is_exact
    sample, batch = lfq.entropy_terms(x[:, None], inv_t)
    torch.testing.assert_close(sample, ref_sample, rtol=1e-10, atol=1e-12)  # factorised == exact
    torch.testing.assert_close(batch, ref_batch, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batch_code_distribution(4 * inv_t * scale * x), ref_avg, rtol=1e-10, atol=1e-14)
    # the default entropy_terms give the peer's clamped numbers
    clamped_sample, clamped_batch, _ = _reference_terms(x, scale, inv_t, clamp=True)
    default = _lfq64(dim=d, codebook_scale=scale).entropy_terms(x[:, None], inv_t)
    torch.testing.assert_close(default, (clamped_sample, clamped_batch), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [3, 6, 9])
def test_factorised_batch_entropy_is_an_upper_bound(d):
    x = torch.randn(50, d, dtype=torch.float64)
    logits = 4 * 0.5 * x  # inv_temperature 0.5, scale 1
    exact, bound = batch_entropy(logits, exact=True), batch_entropy(logits, exact=False)
    _, ref_batch, _ = _reference_terms(x, 1.0, 0.5)
    torch.testing.assert_close(exact, ref_batch, rtol=1e-10, atol=1e-12)
    assert bound >= exact - 1e-12
    assert bound <= d * math.log(2) + 1e-12
    # one sample: the batch distribution is a product, and the bound is exact
    torch.testing.assert_close(batch_entropy(logits[:1], False), batch_entropy(logits[:1], True))
    # two equal, hard bits: the batch distribution puts mass on 2 of 4 codes (entropy h(bit 0)),
    # and the bound counts h(bit 0) twice
    hard = torch.tensor([[40.0, 40.0], [-40.0, -40.0]], dtype=torch.float64).repeat(5, 1)
    torch.testing.assert_close(batch_entropy(hard, True), torch.tensor(math.log(2), dtype=torch.float64))
    torch.testing.assert_close(batch_entropy(hard, False), torch.tensor(2 * math.log(2), dtype=torch.float64))


def test_large_codebooks_use_the_factorised_bound_with_exact_entropy():
    lfq = _lfq64(codebook_size=2**14, exact_entropy=True)  # 14 > max_exact_entropy_dim = 12
    assert not lfq.batch_entropy_is_exact
    x = torch.randn(6, 14, dtype=torch.float64)
    sample, batch = lfq.entropy_terms(x[:, None], 0.5)
    ref_sample, ref_batch, _ = _reference_terms(x, 1.0, 0.5)  # 6 x 16384: still small enough here
    torch.testing.assert_close(sample, ref_sample, rtol=1e-10, atol=1e-12)
    q = torch.sigmoid(2.0 * x).mean(0)
    expected_bound = -(q * q.log() + (1 - q) * (1 - q).log()).sum()
    torch.testing.assert_close(batch, expected_bound)
    assert batch >= ref_batch
    # the threshold is an option: forcing the bound at small d, or the exact path at larger d
    assert not LFQ(dim=4, exact_entropy=True, max_exact_entropy_dim=3).batch_entropy_is_exact
    assert LFQ(codebook_size=2**14, exact_entropy=True, max_exact_entropy_dim=14).batch_entropy_is_exact


@pytest.mark.parametrize("exact", [True, False])
def test_exact_entropy_loss_and_its_gradient_match_the_reference(exact):
    d, inv_t, scale, w_e, w_c, gamma = 5, 0.4, 1.0, 0.3, 0.25, 0.8
    lfq = _lfq64(
        dim=d,
        entropy_loss_weight=w_e,
        commitment_loss_weight=w_c,
        diversity_gamma=gamma,
        exact_entropy=True,
        max_exact_entropy_dim=12 if exact else 0,
    )
    z = torch.randn(4, 9, d, dtype=torch.float64, requires_grad=True)
    (_, _, loss), breakdown = lfq(z, inv_temperature=inv_t, return_loss_breakdown=True)
    loss.backward()
    z_ref = z.detach().clone().requires_grad_()
    if exact:
        _, _, ref = _reference_forward(z_ref, scale=scale, inv_t=inv_t, w_entropy=w_e, w_commit=w_c, gamma=gamma,
                                       clamp=False)
    else:
        logits = 4 * inv_t * scale * z_ref.reshape(-1, d)
        ref_sample, _, _ = _reference_terms(z_ref.reshape(-1, d), scale, inv_t)
        q = torch.sigmoid(logits).mean(0)
        bound = -(q * q.log() + (1 - q) * (1 - q).log()).sum()
        commit = ((z_ref - torch.where(z_ref > 0, scale, -scale).double()) ** 2).mean()
        ref = w_e * (ref_sample - gamma * bound) + w_c * commit
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-8, atol=1e-12)
    assert z.grad.abs().sum() > 0
    entropy_part = breakdown.per_sample_entropy - gamma * breakdown.batch_entropy
    torch.testing.assert_close(loss.detach(), w_e * entropy_part + w_c * breakdown.commitment)
    assert torch.equal(lfq.last_loss_breakdown.batch_entropy, breakdown.batch_entropy.detach())


@pytest.mark.parametrize("exact_entropy", [True, False])
def test_entropy_is_finite_with_saturated_probabilities(exact_entropy):
    lfq = LFQ(dim=10, exact_entropy=exact_entropy)  # fp32, sigmoid tails underflow to exactly 0
    z = torch.randn(64, 10, requires_grad=True)
    (_, _, loss), breakdown = lfq(z, inv_temperature=1e4, return_loss_breakdown=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    _, ref_batch, _ = _reference_terms(z.detach(), 1.0, 1e4, clamp=not exact_entropy)
    torch.testing.assert_close(breakdown.batch_entropy.double(), ref_batch, rtol=1e-4, atol=1e-5)


def test_entropy_weight_zero_leaves_the_commitment():
    lfq = LFQ(dim=4, entropy_loss_weight=0.0, commitment_loss_weight=1.0)
    z = torch.randn(5, 4)
    _, _, loss = lfq(z)
    torch.testing.assert_close(loss, ((z - torch.where(z > 0, 1.0, -1.0)) ** 2).mean())


def test_half_precision_input():
    lfq = LFQ(dim=6)
    z = torch.randn(4, 6).to(torch.bfloat16)
    q, idx, loss = lfq(z, inv_temperature=1.0)
    q32, idx32, loss32 = lfq(z.float(), inv_temperature=1.0)
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(idx, idx32) and torch.equal(q.float(), q32) and torch.equal(loss, loss32)


# ------------------------------------------------------------------------------------------------
# layouts, projections, state_dict, errors


def test_projections_layouts_and_state_dict():
    lfq = LFQ(dim=16, codebook_size=2**5)
    assert lfq.codebook_dim == 5 and lfq.codebook.shape == (32, 5) and lfq.has_projections
    z = torch.randn(2, 7, 16, requires_grad=True)
    q, idx, loss = lfq(z)
    assert q.shape == z.shape and idx.shape == (2, 7)
    torch.testing.assert_close(lfq.indices_to_codes(idx), q)
    torch.testing.assert_close(lfq.project_out(lfq.codebook)[idx], q)
    assert torch.equal(lfq.indices_to_codes(idx, project_out=False), lfq.codebook[idx])
    (q.square().sum() + loss).backward()
    assert lfq.project_in.weight.grad.abs().sum() > 0

    assert set(lfq.state_dict()) == {"mask", "project_in.weight", "project_in.bias", "project_out.weight",
                                     "project_out.bias"}
    other = LFQ(dim=16, codebook_size=2**5)
    other.load_state_dict(lfq.state_dict(), strict=True)
    q2, idx2, loss2 = other(z)
    assert torch.equal(q2, q) and torch.equal(idx2, idx) and torch.equal(loss2, loss)

    # 4-D and 5-D inputs are channel-first by default, as the peer's; indices lose the feature axis
    fmap = LFQ(dim=4)
    z = torch.randn(2, 4, 5, 3)
    q, idx, loss = fmap(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 3)
    assert torch.equal(fmap.indices_to_codes(idx), q)
    q_last, idx_last, loss_last = LFQ(dim=4, channel_first=False)(z.permute(0, 2, 3, 1))
    assert torch.equal(idx_last, idx) and torch.equal(q_last.permute(0, 3, 1, 2), q)
    torch.testing.assert_close(loss_last, loss)
    video = torch.randn(1, 4, 2, 3, 3)
    assert fmap(video).quantized.shape == video.shape and fmap(video).indices.shape == (1, 2, 3, 3)

    seq = LFQ(dim=3, channel_first=True)
    q, idx, _ = seq(torch.randn(2, 3, 9))
    assert q.shape == (2, 3, 9) and idx.shape == (2, 9)
    assert torch.equal(seq.indices_to_codes(idx), q)

    multi = LFQ(dim=16, codebook_size=2**4, num_codebooks=2)  # projected: 16 -> 2 x 4
    q, idx, _ = multi(torch.randn(2, 16, 3, 5))
    assert q.shape == (2, 16, 3, 5) and idx.shape == (2, 3, 5, 2)
    torch.testing.assert_close(multi.indices_to_codes(idx), q)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "needs dim or codebook_size"),
        (dict(codebook_size=12), "codebook_size must be a power of two, got 12"),
        (dict(codebook_size=1), "codebook_size must be an int power of two >= 2"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(dim=4, entropy_loss_weight=-1.0), "entropy_loss_weight"),
        (dict(dim=4, commitment_loss_weight=float("nan")), "commitment_loss_weight"),
        (dict(dim=4, diversity_gamma=-0.5), "diversity_gamma"),
        (dict(dim=4, max_exact_entropy_dim=-1), "max_exact_entropy_dim"),
        (dict(dim=4, codebook_scale=-1.0), "codebook_scale"),
        (dict(dim=4, num_codebooks=0), "num_codebooks"),
        (dict(dim=4, codebook_size=4, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
        (dict(dim=6, codebook_size=4, has_projections=False), "has_projections"),
        (dict(dim=4, frac_per_sample_entropy=0.0), "frac_per_sample_entropy"),
        (dict(dim=4, codebook_scale=2.0, soft_clamp_input_value=1.0), "soft_clamp_input_value"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LFQ(**kwargs)


def test_bad_inputs():
    lfq = LFQ(dim=4)
    with pytest.raises(ValueError, match=r"\(B, \.\.\., dim\) with dim = 4"):
        lfq(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        lfq.indices_to_codes(torch.tensor([16]))
    with pytest.raises(TypeError, match="indices must be an int64"):
        lfq.indices_to_codes(torch.tensor([0.5]))


def test_per_sample_entropy_of_uniform_bits_is_d_log_2():
    logits = torch.zeros(3, 7, dtype=torch.float64)
    torch.testing.assert_close(per_sample_entropy(logits), torch.tensor(7 * math.log(2), dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# vector-quantize-pytorch itself, with the same state_dict


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(dim=6), (3, 17, 6)),
        (dict(dim=12, codebook_size=2**4, num_codebooks=2, commitment_loss_weight=0.3), (2, 9, 12)),
        (dict(dim=10, codebook_size=2**5, commitment_loss_weight=1.0), (2, 10, 5, 3)),  # projected, channel-first
        (dict(dim=6, spherical=True, codebook_scale=1.5, commitment_loss_weight=1.0), (2, 6, 4, 3)),
        (dict(dim=5, soft_clamp_input_value=2.0, commitment_loss_weight=0.5), (3, 13, 5)),
        (dict(dim=8, codebook_size=2**4, num_codebooks=2, experimental_softplus_entropy_loss=True), (1, 8, 2, 3, 3)),
        (dict(dim=8, codebook_size=2**5, cosine_sim_project_in=True, orthogonal_rotation=True), (2, 7, 8)),
    ],
)
def test_same_outputs_as_vector_quantize_pytorch(kwargs, shape):
    peer = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs, ours = peer.LFQ(**kwargs), LFQ(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {n for n, _ in ours.named_buffers()} == {n for n, _ in theirs.named_buffers()}
    x = torch.randn(shape)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        for inv_t in (100.0, 2.0):
            (ref, ref_breakdown) = theirs(x, inv_temperature=inv_t, return_loss_breakdown=True)
            out, breakdown = ours(x, inv_temperature=inv_t, return_loss_breakdown=True)
            assert tuple(out._fields) == tuple(ref._fields) and tuple(breakdown._fields) == tuple(ref_breakdown._fields)
            torch.testing.assert_close(out.quantized, ref.quantized, rtol=1e-6, atol=1e-6)
            assert torch.equal(out.indices, ref.indices) and out.indices.dtype == ref.indices.dtype
            torch.testing.assert_close(out.entropy_aux_loss, ref.entropy_aux_loss, rtol=1e-5, atol=1e-6)
            for ours_term, ref_term in zip(breakdown, ref_breakdown, strict=True):
                torch.testing.assert_close(ours_term, ref_term, rtol=1e-5, atol=1e-6)
        idx = ref.indices
        torch.testing.assert_close(ours.indices_to_codes(idx), theirs.indices_to_codes(idx), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.indices_to_codes(idx, project_out=False),
                                   theirs.indices_to_codes(idx, project_out=False), rtol=1e-6, atol=1e-6)


def test_lfq_stages_in_residual_and_grouped_wrappers_on_feature_maps():
    from fastvq.quantizers.grouped import GroupedQuantizer
    from fastvq.quantizers.residual import ResidualStack

    z = torch.randn(2, 8, 3, 5)  # (B, dim, H, W): the wrappers run their LFQ stages channel-last
    stack = ResidualStack([LFQ(dim=8, codebook_scale=s) for s in (1.0, 0.5)], accept_image_fmap=True).eval()
    q, idx, _ = stack(z)
    assert q.shape == z.shape and idx.shape == (2, 3, 5, 2)
    expected = (torch.where(z > 0, 1.0, -1.0) + torch.where(z - torch.where(z > 0, 1.0, -1.0) > 0, 0.5, -0.5))
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(stack.get_output_from_indices(idx), q)
    grouped = GroupedQuantizer([LFQ(dim=4), LFQ(dim=4)], accept_image_fmap=True).eval()
    q, idx, _ = grouped(z)
    assert idx.shape == (2, 2, 3, 5) and torch.equal(q, torch.where(z > 0, 1.0, -1.0))
    torch.testing.assert_close(grouped.get_output_from_indices(idx), q)


def test_masked_batch_entropy_differs_from_the_peer_by_design():
    """Theirs flattens the masked tokens into the codebook axis, so their masked 'batch entropy' is
    the mean per-sample entropy; ours is the entropy of the masked tokens' mean (docs/quantizers.md)."""
    peer = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs, ours = peer.LFQ(dim=4, commitment_loss_weight=0.5), LFQ(dim=4, commitment_loss_weight=0.5)
    x, mask = torch.randn(2, 7, 4), torch.rand(2, 7) > 0.3
    _, ref = theirs(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    _, got = ours(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    torch.testing.assert_close(ref.batch_entropy, ref.per_sample_entropy)
    torch.testing.assert_close(got.per_sample_entropy, ref.per_sample_entropy)
    torch.testing.assert_close(got.commitment, ref.commitment)
    _, ref_batch, _ = _reference_terms(x[mask], 1.0, 1.0, clamp=True)
    torch.testing.assert_close(got.batch_entropy.double(), ref_batch, rtol=1e-5, atol=1e-6)
