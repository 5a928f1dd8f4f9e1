"""The option ops of `fastvq bench` (stochastic sampling, cross-entropy commitment, diversity loss):
fastvq and vector-quantize-pytorch must compute the same thing before their times are compared."""

import json

import pytest
import torch
from fastvq.benchmarks import registry
from fastvq.benchmarks.registry import OPTION_OPS, PEER, Shape, as_sequences, peer_parity

import fastvq
from fastvq.cli import main

# odd sizes; (N, K, D) with N / gcd(N, 16) tokens per sequence: 4 x 75 and 8 x 129
TINY = [Shape("tiny", 300, 37, 5), Shape("tiny2", 1032, 101, 24)]


def test_option_ops_are_registered_against_the_peer():
    for op in OPTION_OPS:
        assert op in registry.OPS
        assert registry.PROVIDERS[op][0] == PEER and "fastvq-torch" in registry.PROVIDERS[op]
        assert registry.BASELINE[op] == PEER


@pytest.mark.parametrize("shape", TINY, ids=lambda s: s.name)
@pytest.mark.parametrize("op", list(OPTION_OPS))
def test_same_loss_and_codes_as_the_peer(op, shape):
    pytest.importorskip("vector_quantize_pytorch")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh state, input and draw each run
    parity = peer_parity(op, shape, seed=seed)
    assert parity.compared  # one chunk: even the stochastic draws coincide
    assert abs(parity.fastvq_loss - parity.peer_loss) <= 1e-5 * abs(parity.peer_loss) + 1e-7, (seed, parity)
    assert parity.same_indices == 1.0, (seed, parity)
    assert parity.ok


def test_the_check_sees_a_different_option(monkeypatch):
    pytest.importorskip("vector_quantize_pytorch")
    real = fastvq.VectorQuantize

    def doubled(**kwargs):  # fastvq built with twice the peer's diversity weight
        return real(**{**kwargs, "codebook_diversity_loss_weight": 0.2})

    monkeypatch.setattr(registry.fastvq, "VectorQuantize", doubled)
    parity = peer_parity("train_step_diversity", TINY[0])
    assert not parity.ok and str(parity).startswith("MISMATCH")


def test_stochastic_draws_over_several_chunks_are_recorded_not_compared():
    pytest.importorskip("vector_quantize_pytorch")
    shape = Shape("chunks", 4112, 4096, 3)  # fastvq scores 4096 rows per chunk: two chunks
    parity = peer_parity("train_step_sample", shape)
    assert not parity.compared and parity.ok and str(parity).startswith("not compared")


def _reference_loss_fp64(op: str, z: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The peer's training loss from its formulas, in fp64, for z (B, T, D), codes (K, D), idx (B, T)."""
    rows = z.reshape(-1, z.shape[-1])
    logits = -torch.cdist(rows, codes)  # (N, K): minus the euclidean distance
    if op == "train_step_ce":  # the commitment is the cross-entropy of the logits to the chosen codes
        return torch.nn.functional.cross_entropy(logits, idx.reshape(-1))
    commitment = (rows - codes[idx.reshape(-1)]).square().mean()
    prob = (100.0 * logits).softmax(-1).view(*z.shape[:2], -1).mean(0)  # (T, K): batch average per position
    diversity = (prob * prob.clamp(min=1e-5).log()).sum(-1).mean()  # minus the entropy
    return commitment + OPTION_OPS[op]["codebook_diversity_loss_weight"] * diversity


@pytest.mark.parametrize("op", ["train_step_ce", "train_step_diversity"])
def test_input_gradient_matches_fp64_reference_and_the_peers_before_its_update(op):
    """fastvq differentiates the loss it returns (codes before this forward's EMA update) and
    matches an fp64 reference; the peer updates its codes in place inside forward, so its backward
    uses the updated codes: the comparable peer gradient is that of ema_update=False (same state),
    which is computed in fp32."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    shape = TINY[1]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    peer = vqp.VectorQuantize(dim=shape.d, codebook_size=shape.k, ema_update=False, **OPTION_OPS[op]).train()
    ours = fastvq.VectorQuantize(dim=shape.d, codebook_size=shape.k, **OPTION_OPS[op]).train()
    ours.load_state_dict(peer.state_dict(), strict=True)
    codes = ours.codebook.detach().clone().double()
    x = as_sequences(torch.randn(shape.n, shape.d, dtype=torch.float64))
    grads = []
    for layer in (peer.double(), ours.double()):
        z = x.clone().requires_grad_(True)
        _, idx, loss = layer(z)
        loss.backward()
        grads.append(z.grad)
    z = x.clone().requires_grad_(True)
    _reference_loss_fp64(op, z, codes, idx).backward()
    scale = z.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(grads[1], z.grad, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(grads[0], z.grad, rtol=0, atol=1e-4 * scale)  # the peer's fp32 logits


def test_bench_times_and_checks_the_option_ops(tmp_path, capsys):
    args = ["bench", "--nkd", "300", "37", "5", "--ops", *OPTION_OPS, "--providers", "fastvq-torch", "--repeats", "1"]
    assert main(args + ["--out", str(tmp_path), "--tag", "t"]) == 0
    records = json.loads((tmp_path / "t.json").read_text())["records"]
    ours = [r for r in records if r["provider"] == "fastvq-torch"]
    assert {r["op"] for r in ours} == set(OPTION_OPS)
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        assert all(r["check"].startswith("not checked") for r in ours)
        return
    for r in ours:
        assert r["status"] == "ok" and r["ms"] > 0 and r["speedup"] > 0
        assert r["check"].startswith("same:"), r["check"]
    assert all(r["speedup"] == 1.0 for r in records if r["provider"] == PEER)
    assert "Same loss as vector-quantize-pytorch" in (tmp_path / "t.md").read_text()


def test_rows_with_other_codes_pass_only_as_near_ties():
    assert registry.Parity(2.0, 2.0, 0.999, True, other_codes_near_ties=True).ok
    assert not registry.Parity(2.0, 2.0, 0.999, True, other_codes_near_ties=False).ok
    assert not registry.Parity(2.0, 2.001, 1.0, True).ok  # 5e-4 relative: over PARITY_RTOL
