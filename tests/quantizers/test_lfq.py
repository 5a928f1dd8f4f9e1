"""LFQ: bits and indices, sign quantization, straight-through gradient, entropy terms against the
exact 2^d computation (fp64), the factorised upper bound, layouts, projections, errors.

The reference materialises all 2^d codes and the (N, 2^d) soft assignment
p_n(c) = softmax_c(-inv_temperature ||x_n - c||^2) straight from the distances: it shares no code
with fastvq.quantizers.lfq's factorisation.
"""

import math

import pytest
import torch

from fastvq.quantizers.lfq import LFQ, batch_code_distribution, batch_entropy, per_sample_entropy
from fastvq.quantizers.output import QuantizerOutput


def _all_codes(d: int, scale: float) -> torch.Tensor:
    """(2^d, d) fp64 codes in index order: bit i of index j is feature i, feature 0 most significant."""
    j = torch.arange(2**d)
    bits = torch.stack([(j >> (d - 1 - i)) & 1 for i in range(d)], dim=-1)
    return torch.where(bits == 1, scale, -scale).double()


def _reference_terms(x: torch.Tensor, scale: float, inv_temperature: float):
    """(per-sample entropy, batch entropy, batch distribution) from the full (N, 2^d) softmax, fp64."""
    x = x.reshape(-1, x.shape[-1]).double()
    codes = _all_codes(x.shape[-1], scale)
    logits = -inv_temperature * ((x[:, None, :] - codes[None]) ** 2).sum(-1)  # (N, 2^d)
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(-1).mean()
    avg = p.mean(0)
    batch = -(avg * torch.log(avg.clamp_min(1e-300))).sum()
    return per_sample, batch, avg


def _reference_loss(x, scale, inv_t, w_entropy, w_commit, gamma):
    per_sample, batch, _ = _reference_terms(x, scale, inv_t)
    q = torch.where(x > 0, scale, -scale).double()
    return w_entropy * (per_sample - gamma * batch) + w_commit * ((x.double() - q) ** 2).mean()


def test_bits_indices_and_codes_round_trip():
    lfq = LFQ(codebook_size=2**7, codebook_scale=0.5)
    all_idx = torch.arange(lfq.codebook_size)
    bits = lfq.indices_to_bits(all_idx)
    assert bits.dtype == torch.bool and bits.shape == (128, 7)
    assert torch.equal(lfq.bits_to_indices(bits), all_idx)
    codes = lfq.indices_to_codes(all_idx)
    assert torch.equal(codes, _all_codes(7, 0.5).float())
    assert torch.equal(lfq.codes_to_indices(codes), all_idx)
    assert torch.equal(lfq.implicit_codebook, codes)


@pytest.mark.parametrize("d", [1, 5, 8])
def test_forward_is_sign_quantization_with_bit_indices(d):
    lfq = LFQ(dim=d, codebook_scale=0.75)
    z = torch.randn(3, 41, d)
    z[0, 0] = 0.0  # zero goes to the negative code (bit 0), as x > 0 defines the bit
    out = lfq(z)
    assert isinstance(out, QuantizerOutput)
    q, idx, loss = out
    assert lfq.codebook_size == 2**d and q.shape == z.shape and idx.shape == (3, 41) and idx.dtype == torch.int64
    assert torch.equal(q, torch.where(z > 0, 0.75, -0.75))
    expected = sum(((z[..., i] > 0).long() << (d - 1 - i)) for i in range(d))
    assert torch.equal(idx, expected)
    assert idx[0, 0] == 0
    assert torch.equal(lfq.get_output_from_indices(idx), q)
    assert loss.shape == () and loss.dtype == torch.float32


def test_straight_through_gradient_is_identity():
    lfq = LFQ(dim=6, entropy_loss_weight=0.0, commitment_loss_weight=0.0)
    z = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(10, 6)
    q, _, loss = lfq(z)
    (q * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert loss.item() == 0.0


@pytest.mark.parametrize("d,inv_t,scale", [(1, 1.0, 1.0), (2, 0.3, 1.0), (5, 0.7, 0.5), (8, 100.0, 1.0), (8, 0.2, 2.0)])
def test_entropy_terms_match_the_exact_2_pow_d_computation(d, inv_t, scale):
    lfq = LFQ(dim=d, inv_temperature=inv_t, codebook_scale=scale).double()
    x = torch.randn(37, d, dtype=torch.float64)
    ref_sample, ref_batch, ref_avg = _reference_terms(x, scale, inv_t)
    assert lfq.exact_entropy
    sample, batch = lfq.entropy_terms(x)
    torch.testing.assert_close(sample, ref_sample, rtol=1e-10, atol=1e-12)  # factorised == exact
    torch.testing.assert_close(batch, ref_batch, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batch_code_distribution(lfq.bit_logits(x)), ref_avg, rtol=1e-10, atol=1e-14)


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


def test_large_codebooks_use_the_factorised_bound_automatically():
    lfq = LFQ(codebook_size=2**14, inv_temperature=0.5).double()  # 14 > max_exact_entropy_dim = 12
    assert not lfq.exact_entropy
    x = torch.randn(6, 14, dtype=torch.float64)
    sample, batch = lfq.entropy_terms(x)
    ref_sample, ref_batch, _ = _reference_terms(x, 1.0, 0.5)  # 6 x 16384: still small enough here
    torch.testing.assert_close(sample, ref_sample, rtol=1e-10, atol=1e-12)
    q = torch.sigmoid(2.0 * x).mean(0)
    expected_bound = -(q * q.log() + (1 - q) * (1 - q).log()).sum()
    torch.testing.assert_close(batch, expected_bound)
    assert batch >= ref_batch
    # the threshold is an option: forcing the bound at small d, or the exact path at larger d
    small = LFQ(dim=4, max_exact_entropy_dim=3).double()
    assert not small.exact_entropy
    assert LFQ(codebook_size=2**14, max_exact_entropy_dim=14).exact_entropy


@pytest.mark.parametrize("exact", [True, False])
def test_loss_and_its_gradient_match_the_reference(exact):
    d, inv_t, scale, w_e, w_c, gamma = 5, 0.4, 1.0, 0.3, 0.25, 0.8
    lfq = LFQ(
        dim=d,
        inv_temperature=inv_t,
        entropy_loss_weight=w_e,
        commitment_loss_weight=w_c,
        diversity_gamma=gamma,
        max_exact_entropy_dim=12 if exact else 0,
    ).double()
    z = torch.randn(4, 9, d, dtype=torch.float64, requires_grad=True)
    _, _, loss = lfq(z)
    loss.backward()
    z_ref = z.detach().clone().requires_grad_()
    if exact:
        ref = _reference_loss(z_ref, scale, inv_t, w_e, w_c, gamma)
    else:
        logits = 4 * inv_t * scale * z_ref.reshape(-1, d)
        ref_sample, _, _ = _reference_terms(z_ref, scale, inv_t)
        q = torch.sigmoid(logits).mean(0)
        bound = -(q * q.log() + (1 - q) * (1 - q).log()).sum()
        commit = ((z_ref - torch.where(z_ref > 0, scale, -scale).double()) ** 2).mean()
        ref = w_e * (ref_sample - gamma * bound) + w_c * commit
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-8, atol=1e-12)
    assert z.grad.abs().sum() > 0
    breakdown = lfq.last_loss_breakdown
    entropy_part = breakdown.per_sample_entropy - gamma * breakdown.batch_entropy
    torch.testing.assert_close(loss.detach(), w_e * entropy_part + w_c * breakdown.commitment)


def test_entropy_is_finite_with_saturated_probabilities():
    lfq = LFQ(dim=10, inv_temperature=1e4)  # fp32, sigmoid tails underflow to exactly 0
    z = torch.randn(64, 10, requires_grad=True)
    _, _, loss = lfq(z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    ref_sample, ref_batch, _ = _reference_terms(z.detach(), 1.0, 1e4)
    torch.testing.assert_close(lfq.last_loss_breakdown.batch_entropy.double(), ref_batch, rtol=1e-4, atol=1e-5)


def test_eval_mode_returns_the_same_loss():
    lfq = LFQ(dim=6, inv_temperature=1.0)
    z = torch.randn(8, 6)
    train_out = lfq.train()(z)
    eval_out = lfq.eval()(z)
    assert torch.equal(train_out.quantized, eval_out.quantized) and torch.equal(train_out.loss, eval_out.loss)


def test_entropy_weight_zero_skips_the_entropy_terms():
    lfq = LFQ(dim=4, entropy_loss_weight=0.0, commitment_loss_weight=1.0)
    z = torch.randn(5, 4)
    _, _, loss = lfq(z)
    torch.testing.assert_close(loss, ((z - torch.where(z > 0, 1.0, -1.0)) ** 2).mean())
    assert lfq.last_loss_breakdown.batch_entropy.item() == 0.0


def test_half_precision_input():
    lfq = LFQ(dim=6, inv_temperature=1.0)
    z = torch.randn(4, 6).to(torch.bfloat16)
    q, idx, loss = lfq(z)
    q32, idx32, loss32 = lfq(z.float())
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(idx, idx32) and torch.equal(q.float(), q32) and torch.equal(loss, loss32)


def test_projections_layouts_and_state_dict():
    lfq = LFQ(dim=16, codebook_size=2**5)
    assert lfq.codebook_dim == 5 and lfq.codebook.shape == (32, 16)
    z = torch.randn(2, 7, 16, requires_grad=True)
    q, idx, loss = lfq(z)
    assert q.shape == z.shape and idx.shape == (2, 7)
    torch.testing.assert_close(lfq.get_output_from_indices(idx), q)
    torch.testing.assert_close(lfq.codebook[idx], q)
    (q.square().sum() + loss).backward()
    assert lfq.project_in.weight.grad.abs().sum() > 0

    other = LFQ(dim=16, codebook_size=2**5)
    other.load_state_dict(lfq.state_dict())
    q2, idx2, loss2 = other(z)
    assert torch.equal(q2, q) and torch.equal(idx2, idx) and torch.equal(loss2, loss)

    fmap = LFQ(dim=4, accept_image_fmap=True)
    z = torch.randn(2, 4, 5, 3)
    q, idx, loss = fmap(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 3)
    assert torch.equal(fmap.get_output_from_indices(idx), q)
    q_last, idx_last, loss_last = LFQ(dim=4)(z.permute(0, 2, 3, 1))
    assert torch.equal(idx_last, idx) and torch.equal(q_last.permute(0, 3, 1, 2), q)
    torch.testing.assert_close(loss_last, loss)

    seq = LFQ(dim=3, channel_last=False)
    q, idx, _ = seq(torch.randn(2, 3, 9))
    assert q.shape == (2, 3, 9) and idx.shape == (2, 9)
    assert torch.equal(seq.get_output_from_indices(idx), q)


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
        (dict(dim=4, inv_temperature=0.0), "inv_temperature"),
        (dict(dim=4, codebook_scale=-1.0), "codebook_scale"),
        (dict(dim=4, max_exact_entropy_dim=-1), "max_exact_entropy_dim"),
        (dict(dim=4, accept_image_fmap=True, channel_last=True), "accept_image_fmap"),
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
        lfq.get_output_from_indices(torch.tensor([0.5]))


def test_per_sample_entropy_of_uniform_bits_is_d_log_2():
    logits = torch.zeros(3, 7, dtype=torch.float64)
    torch.testing.assert_close(per_sample_entropy(logits), torch.tensor(7 * math.log(2), dtype=torch.float64))
