"""The generic residual stack over stages that are not VectorQuantizers: FSQ stages against a
greedy fp64 reference written from the paper's formula, and a mixed VQ / FSQ / LFQ stack against
the stages run by hand."""

import math

import pytest
import torch

from fastvq import FSQ, LFQ, VectorQuantizer
from fastvq.quantizers.residual import ResidualStack, ResidualVQ

LEVELS = [5, 4, 3]  # odd, even, odd


def _fsq_reference(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """FSQ codes per element in fp64 with Python's math module (Mentzer et al. 2023, App. A.1)."""
    out = torch.empty(z.shape, dtype=torch.float64)
    flat, res = z.reshape(-1, len(levels)).tolist(), out.view(-1, len(levels))
    for n, row in enumerate(flat):
        for i, (value, level) in enumerate(zip(row, levels, strict=True)):
            half_l = (level - 1) * (1 + 1e-3) / 2
            offset = 0.5 if level % 2 == 0 else 0.0
            bounded = math.tanh(value + math.atanh(offset / half_l)) * half_l - offset
            res[n, i] = math.floor(bounded + 0.5) / (level // 2)
    return out


def test_fsq_stages_follow_the_greedy_reference():
    torch.manual_seed(0)
    stack = ResidualStack([FSQ(LEVELS) for _ in range(3)])
    x = 2 * torch.randn(2, 13, 3)
    q, idx, loss = stack(x)
    assert q.shape == x.shape and idx.shape == (2, 13, 3) and loss.shape == (3,) and bool((loss == 0).all())
    residual, total = x.double(), torch.zeros_like(x, dtype=torch.float64)
    for stage in range(3):
        codes = _fsq_reference(residual, LEVELS)
        assert torch.equal(stack.layers[stage].codes_to_indices(codes), idx[..., stage])
        residual, total = residual - codes, total + codes
    torch.testing.assert_close(q.double(), total, rtol=0, atol=1e-6)
    torch.testing.assert_close(stack.get_output_from_indices(idx).double(), total, rtol=0, atol=1e-6)
    # each stage can only reduce the error: FSQ of a residual in the grid's range is at most half a step off
    first = stack.get_output_from_indices(idx[..., :1])
    assert (q - x).abs().max() < (first - x).abs().max()


def test_mixed_stages_match_the_stages_run_by_hand_and_project():
    torch.manual_seed(1)
    stages = [VectorQuantizer(3, 7, backend="torch"), FSQ([5, 5, 5]), LFQ(dim=3, codebook_scale=0.1)]
    stack = ResidualStack(stages, dim=6, channel_last=False).eval()
    assert stack.codebook_dim == 3 and isinstance(stack.project_in, torch.nn.Linear)
    z = torch.randn(2, 6, 9, requires_grad=True)  # (B, dim, N), channel-first
    q, idx, loss = stack(z)
    assert q.shape == z.shape and idx.shape == (2, 9, 3)
    residual, total, losses = stack.project_in(z.detach().movedim(1, -1)), 0, []
    for stage, layer in enumerate(stages):
        e, i, *stage_loss = layer(residual)  # FSQ returns (quantized, indices), as the peer's
        assert torch.equal(i.long(), idx[..., stage])
        residual, total = residual - e, total + e
        losses.append(stage_loss[0] if stage_loss else torch.zeros(()))
    torch.testing.assert_close(q, stack.project_out(total).movedim(-1, 1))
    torch.testing.assert_close(loss, torch.stack(losses))  # per stage
    torch.testing.assert_close(stack.last_losses, torch.stack(losses).detach())
    torch.testing.assert_close(stack.get_output_from_indices(idx), q)


def test_default_sums_each_stages_own_estimator():
    stack = ResidualStack([FSQ(LEVELS) for _ in range(4)])
    z = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    (gz,) = torch.autograd.grad(stack(z).quantized, z, g)
    # by hand: stage q's straight-through rounding of its bounded residual, the residual detached
    # from the earlier codes (Jacobian I to z), summed over the stages
    residual, expected = z.detach(), torch.zeros_like(z)
    for layer in stack.layers:
        r = residual.clone().requires_grad_()
        e = layer(r)[0]
        expected += torch.autograd.grad(e, r, g)[0]
        residual = residual - e.detach()
    torch.testing.assert_close(gz, expected)
    assert not torch.allclose(gz, g)


def test_one_straight_through_estimator_for_the_sum():
    stack = ResidualStack([FSQ(LEVELS) for _ in range(4)], stack_estimator="straight_through")
    z = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    (gz,) = torch.autograd.grad(stack(z).quantized, z, g)
    assert torch.equal(gz, g)  # not 4 x g, not FSQ's tanh derivative


def test_quantize_dropout_with_fsq_stages():
    stack = ResidualStack([FSQ(LEVELS) for _ in range(4)], quantize_dropout=True, quantize_dropout_cutoff_index=2)
    x = torch.randn(6, 3)
    generator = torch.Generator().manual_seed(4)
    seen = set()
    for _ in range(30):
        q, idx, _ = stack(x, generator=generator)
        active = int((idx[0] >= 0).sum())
        assert bool((idx[:, active:] == -1).all()) and bool((idx[:, :active] >= 0).all())
        torch.testing.assert_close(stack.get_output_from_indices(idx), q)
        seen.add(active)
    assert seen == {3, 4}
    stack.eval()
    assert bool((stack(x).indices >= 0).all())


def test_residual_vq_is_the_stack_of_vector_quantizers():
    rvq = ResidualVQ(4, 8, 3, backend="torch")
    assert isinstance(rvq, ResidualStack) and all(isinstance(layer, VectorQuantizer) for layer in rvq.layers)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ResidualStack([]), "at least one quantizer"),
        (lambda: ResidualStack([FSQ([5, 5]), FSQ([5, 5, 5])]), "same input size dim, got \\[2, 3\\]"),
        (lambda: ResidualStack([FSQ([5, 5])], dim=0), "dim must be a positive int"),
        (lambda: ResidualStack([FSQ([5, 5])] * 2, quantize_dropout_cutoff_index=2), "quantize_dropout_cutoff"),
        (lambda: ResidualStack([FSQ([5, 5])], quantize_dropout_cutoff_index=-1), "must be an int >= 0"),
        (lambda: ResidualStack([FSQ([5, 5])], accept_image_fmap=True, channel_last=True), "accept_image_fmap"),
        (lambda: ResidualStack([FSQ([5, 5])], stack_estimator=True), "stack_estimator must be one of"),
    ],
)
def test_bad_constructions(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    stack = ResidualStack([FSQ(LEVELS) for _ in range(3)], dim=5)
    twin = ResidualStack([FSQ(LEVELS) for _ in range(3)], dim=5)
    twin.load_state_dict(stack.state_dict())
    z = torch.randn(2, 9, 5)
    out = torch.compile(stack, fullgraph=True, backend="aot_eager")(z)
    ref = twin(z)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized)
