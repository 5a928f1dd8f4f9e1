"""LFQ's entropy terms alone: the peer-compatible clamped softmax entropies chunked over rows
(value and gradients independent of the chunking, memory bounded by the budget), against a dense
fp64 computation."""

import pytest
import torch

from fastvq import LFQ
from fastvq.quantizers import entropy
from fastvq.quantizers.entropy import clamped_entropy, clamped_softmax_entropies


def _codes(d, dtype=torch.float64):
    bits = (torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1
    return (2 * bits - 1).to(dtype)  # (2^d, d), index order


def _dense(tokens, codebook, inv_t):
    prob = (2 * inv_t * tokens @ codebook.t()).softmax(dim=-1)  # (N, c, K)
    return clamped_entropy(prob).mean(), clamped_entropy(prob.mean(dim=0)).mean()


@pytest.mark.parametrize("chunk_rows", [1, 4, 40, 41, 1000])
def test_chunking_keeps_the_value_and_the_gradients(chunk_rows):
    torch.manual_seed(0)
    tokens = torch.randn(41, 2, 5, dtype=torch.float64, requires_grad=True)  # N = 41: a ragged last chunk
    codebook = _codes(5).requires_grad_()
    one = clamped_softmax_entropies(tokens, codebook, 0.7, chunk_rows=None)
    chunked = clamped_softmax_entropies(tokens, codebook, 0.7, chunk_rows=chunk_rows)
    torch.testing.assert_close(chunked, one, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(one, _dense(tokens.detach(), codebook.detach(), 0.7), rtol=1e-12, atol=1e-13)
    w = torch.tensor([0.3, -1.7], dtype=torch.float64)  # weights both terms, as entropy_aux_loss does
    grads_one = torch.autograd.grad(w @ torch.stack(one), (tokens, codebook))
    grads_chunked = torch.autograd.grad(w @ torch.stack(chunked), (tokens, codebook))
    for got, ref in zip(grads_chunked, grads_one, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_default_chunks_respect_the_memory_budget(monkeypatch):
    seen = []
    real = entropy._softmax_chunk

    def spy(tokens, codebook, inv_t):
        seen.append(tokens.shape[0] * tokens.shape[1] * codebook.shape[0] * tokens.element_size())
        return real(tokens, codebook, inv_t)

    monkeypatch.setattr(entropy, "_softmax_chunk", spy)
    monkeypatch.setattr(entropy, "PEER_CHUNK_BYTES", 3 * 2 * 64 * 8)  # three rows of (c=2, K=64) fp64
    tokens = torch.randn(10, 2, 6, dtype=torch.float64)
    clamped_softmax_entropies(tokens, _codes(6), 1.0)
    assert len(seen) == 4 and max(seen) <= entropy.PEER_CHUNK_BYTES  # rows 3 + 3 + 3 + 1


def test_reduce_sees_the_batch_distribution():
    tokens, codebook = torch.randn(7, 3, 4, dtype=torch.float64), _codes(4)
    seen = []
    _, batch = clamped_softmax_entropies(tokens, codebook, 1.0, reduce=lambda t: seen.append(t) or t, chunk_rows=2)
    (avg,) = seen
    assert avg.shape == (3, 16)
    torch.testing.assert_close(avg.sum(-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(batch, _dense(tokens, codebook, 1.0)[1])


def test_lfq_loss_and_gradients_do_not_depend_on_the_chunk_budget(monkeypatch):
    torch.manual_seed(0)
    lfq = LFQ(dim=10, codebook_size=2**4, num_codebooks=2, commitment_loss_weight=0.3, force_quantization_f32=False)
    lfq = lfq.double()  # fp64 throughout (force_quantization_f32 would quantize in fp32)
    x = torch.randn(3, 9, 10, dtype=torch.float64, requires_grad=True)
    runs = []
    for budget in (entropy.PEER_CHUNK_BYTES, 5 * 2 * 16 * 8):  # one chunk; chunks of 5 of the 27 rows
        monkeypatch.setattr(entropy, "PEER_CHUNK_BYTES", budget)
        lfq.zero_grad()
        out = lfq(x, inv_temperature=0.5, return_loss_breakdown=True)
        (x_grad,) = torch.autograd.grad(out[0].loss, x, retain_graph=True)
        out[0].loss.backward()
        runs.append((out[0].loss.detach(), *out[1][:2], x_grad, lfq.project_in.weight.grad.clone()))
    for got, ref in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
