"""ResidualVQ beam search against an independent fp64 beam search written per position from the
peer's rule (score = minus the weighted sum of the stages' per-vector losses, the beam_size best
continuations kept, one after the last stage), an exhaustive search, greedy search, masks,
quantize dropout and the codebook updates of the chosen codes."""

import copy
import itertools

import pytest
import torch

from fastvq.quantizers.residual import ResidualVQ

GRADIENT = dict(ema_update=False, learnable_codebook=True)


def _rvq(seed: int = 0, **kwargs) -> ResidualVQ:
    """A ResidualVQ with standard-normal codes (away from ties) on the torch backend."""
    torch.manual_seed(seed)
    kwargs = dict(dim=3, codebook_size=7, num_quantizers=3) | kwargs
    return ResidualVQ(**kwargs, codebook_init="normal", backend="torch")


def _beam_reference(x: torch.Tensor, books: list[torch.Tensor], beam: int, weights, commitment: float = 1.0):
    """Beam search in fp64, one position at a time: (indices (P, Q), final residual (P, D), losses (P, Q)).

    A candidate is (score, residual, codes, losses); each stage extends every candidate by every
    code (keeping each candidate's best ``beam`` codes first changes nothing: a continuation among
    the best ``beam`` overall is among its parent's best ``beam``).
    """
    indices, finals, losses = [], [], []
    for row in x.double().reshape(-1, x.shape[-1]):
        beams = [(0.0, row, [], [])]
        for q, book in enumerate(books):
            grown = []
            for score, residual, codes, stage_losses in beams:
                per_code = commitment * (residual - book.double()).pow(2).mean(-1)  # (K,)
                for k in range(book.shape[0]):
                    loss = float(per_code[k])
                    grown.append((score - weights[q] * loss, residual - book.double()[k], codes + [k],
                                  stage_losses + [loss]))
            grown.sort(key=lambda c: -c[0])
            beams = grown[: 1 if q == len(books) - 1 else beam]
        _, residual, codes, stage_losses = beams[0]
        indices.append(codes), finals.append(residual), losses.append(stage_losses)
    return torch.tensor(indices), torch.stack(finals), torch.tensor(losses, dtype=torch.float64)


def _books(rvq: ResidualVQ) -> list[torch.Tensor]:
    return [layer.codebook.detach() for layer in rvq.layers]


@pytest.mark.parametrize("beam,weights", [(2, None), (3, None), (4, [0.5, 2.0, 1.0])])
def test_beam_search_matches_fp64_reference(beam, weights):
    rvq = _rvq(commitment_weight=0.7, beam_score_quantizer_weights=weights).eval()
    x = torch.randn(2, 5, 3)
    q, idx, losses = rvq(x, beam_size=beam)
    ref_idx, ref_final, ref_losses = _beam_reference(x, _books(rvq), beam, weights or [1.0] * 3, 0.7)
    assert torch.equal(idx.reshape(-1, 3), ref_idx)
    torch.testing.assert_close(q.double(), x.double() - ref_final.reshape(x.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(losses.double(), ref_losses.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q, rtol=0, atol=1e-6)


def test_constructor_beam_sizes_pick_training_and_eval_widths():
    rvq = _rvq(beam_size=2, eval_beam_size=3, **GRADIENT)
    x = torch.randn(4, 3)  # (B, D): each row is one position
    ref3, _, _ = _beam_reference(x, _books(rvq), 3, [1.0] * 3)
    ref2, _, _ = _beam_reference(x, _books(rvq), 2, [1.0] * 3)
    assert torch.equal(rvq.eval()(x).indices, ref3)
    assert torch.equal(rvq.train()(x).indices, ref2)
    assert torch.equal(rvq.eval()(x, beam_size=2).indices, ref2)


def test_beam_of_one_is_greedy():
    rvq = _rvq(**GRADIENT).eval()
    x = torch.randn(3, 11, 3)
    greedy = rvq(x)
    quantized, indices, losses, _ = rvq._beam_stages(x, 3, 1, None, {})
    assert torch.equal(torch.stack(indices, -1), greedy.indices)
    torch.testing.assert_close(quantized, greedy.quantized, rtol=0, atol=0)
    ref_idx, _, _ = _beam_reference(x, _books(rvq), 1, [1.0] * 3)
    assert torch.equal(greedy.indices.reshape(-1, 3), ref_idx)


def test_exhaustive_beam_on_the_final_error_finds_the_best_path():
    # Weights (0, 0, 1) score only the final error; a beam of K^(Q-1) keeps every path to the last stage.
    rvq = _rvq(codebook_size=5, beam_score_quantizer_weights=[0.0, 0.0, 1.0]).eval()
    x = torch.randn(2, 9, 3)
    q, idx, _ = rvq(x, beam_size=25)
    books = [b.double() for b in _books(rvq)]
    paths = torch.tensor(list(itertools.product(range(5), repeat=3)))  # (125, 3)
    sums = sum(book[paths[:, s]] for s, book in enumerate(books))  # (125, D)
    errors = torch.cdist(x.double().reshape(-1, 3), sums)  # (P, 125)
    best = errors.min(-1).values
    ours = (x.double() - q.double()).norm(dim=-1).reshape(-1)
    torch.testing.assert_close(ours, best, rtol=0, atol=1e-5)
    greedy_error = (x.double() - rvq(x).quantized.double()).norm(dim=-1).reshape(-1)
    assert bool((ours <= greedy_error + 1e-6).all())


def test_larger_beams_do_not_reconstruct_worse_than_greedy_on_average():
    # Beam search optimises the summed stage losses, not the final error alone: per position it can lose
    # to greedy, so this checks the average over many positions on fixed seeds.
    for seed in range(3):
        rvq = _rvq(seed, dim=4, codebook_size=16, num_quantizers=4).eval()
        x = torch.randn(512, 4)
        errors = [(x - rvq(x, beam_size=b).quantized).pow(2).sum(-1).mean() for b in (1, 2, 4, 8)]
        assert errors[1] <= errors[0] and errors[3] <= errors[0], errors


def test_mask_excludes_padding_from_search_losses_and_outputs():
    rvq = _rvq(beam_size=3).eval()
    x = torch.randn(3, 6, 3)
    mask = torch.rand(3, 6) > 0.4
    mask[0, 0] = True
    q, idx, losses = rvq(x, mask=mask)
    valid_q, valid_idx, valid_losses = rvq(x[mask].unsqueeze(0))  # the valid positions alone, as one sequence
    assert torch.equal(idx[mask], valid_idx[0])
    assert bool((idx[~mask] == -1).all()) and bool((q[~mask] == 0).all())
    torch.testing.assert_close(q[mask], valid_q[0], rtol=0, atol=0)
    torch.testing.assert_close(losses, valid_losses, rtol=1e-6, atol=1e-7)


def test_training_updates_every_stage_with_the_chosen_codes():
    rvq = _rvq(beam_size=2, decay=0.5).train()
    twin = copy.deepcopy(rvq)
    x = torch.randn(2, 9, 3)
    idx = rvq(x).indices  # one training step: search, then update_indices per stage
    # The twin searches without updating (eval), then applies each stage's update to the residual the
    # chosen path left for it, computed here from the codes.
    twin.eval()
    assert torch.equal(twin(x).indices, idx)
    residual = x.clone()
    twin.train()
    for q, layer in enumerate(twin.layers):
        codes = layer.codebook.detach()[idx[..., q]]
        layer.update_indices(residual, idx[..., q])
        residual = residual - codes
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(rvq.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(rvq.layers[2].codebook, _rvq(beam_size=2, decay=0.5).layers[2].codebook)


def test_frozen_codebooks_do_not_move_under_beam_training():
    rvq = _rvq(beam_size=2).train()
    before = copy.deepcopy(rvq.state_dict())
    rvq(torch.randn(2, 5, 3), freeze_codebook=True)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_quantize_dropout_with_beam_search():
    rvq = _rvq(num_quantizers=4, beam_size=3, quantize_dropout=True, **GRADIENT).train()
    x = torch.randn(2, 7, 3)
    out = rvq(x, rand_quantize_dropout_fixed_seed=3)
    active = int((out.indices[0, 0] >= 0).sum())
    assert active < 4 and bool((out.indices[..., active:] == -1).all()) and bool((out.losses[active:] == 0).all())
    books = _books(rvq)[:active]
    ref_idx, ref_final, _ = _beam_reference(x, books, 3, [1.0] * active)
    assert torch.equal(out.indices[..., :active].reshape(-1, active), ref_idx)
    torch.testing.assert_close(out.quantized.double(), x.double() - ref_final.reshape(x.shape), rtol=0, atol=1e-5)


def test_gradients_reach_input_and_codebooks_through_the_chosen_path():
    rvq = _rvq(beam_size=2, **GRADIENT).train()
    x = torch.randn(2, 5, 3, requires_grad=True)
    q, idx, losses = rvq(x)
    (q.square().sum() + losses.sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    for layer in rvq.layers:
        grad = layer._codebook.embed.grad
        assert grad is not None and bool(grad.abs().sum() > 0)


def test_bad_beam_sizes():
    rvq = _rvq()
    with pytest.raises(ValueError, match="beam_size"):
        rvq(torch.randn(2, 3, 3), beam_size=0)
    with pytest.raises(ValueError, match="eval_beam_size=2 needs beam_size"):
        _rvq(eval_beam_size=2)
