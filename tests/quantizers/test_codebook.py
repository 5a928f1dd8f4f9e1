"""The codebook part alone: CodebookUpdater's EMA, revival, k-means init and telemetry against fp64
references written from the formulas (bincount / index_add, not fastvq's ops), and the ``Codebook``
submodule (a quantizer's ``_codebook``) with vector-quantize-pytorch's keys."""

import math

import pytest
import torch
from torch import nn

from fastvq.quantizers.codebook import (
    Codebook,
    CodebookState,
    CodebookUpdater,
    CodeUsage,
    laplace_smoothed,
)

K, D = 7, 3  # odd sizes on purpose


def _state(codes: torch.Tensor) -> CodebookState:
    return CodebookState(codes.clone(), torch.ones(codes.shape[0]), codes.float().clone())


def _reference_stats(rows: torch.Tensor, codes: torch.Tensor, k: int):
    counts = torch.bincount(codes, minlength=k).double()
    sums = torch.zeros(k, rows.shape[1], dtype=torch.float64).index_add_(0, codes, rows.double())
    return counts, sums


def test_laplace_smoothing_keeps_the_total_and_lifts_zeros():
    counts = torch.tensor([[0.0, 3.0, 5.0, 0.0, 1.0], [2.0, 2.0, 0.0, 0.0, 0.0]])
    eps = 0.1
    smoothed = laplace_smoothed(counts, eps)
    total = counts.sum(-1, keepdim=True)
    expected = (counts.double() + eps) / (total.double() + 5 * eps) * total.double()
    torch.testing.assert_close(smoothed.double(), expected)
    torch.testing.assert_close(smoothed.sum(-1), total[:, 0])
    assert bool((smoothed > 0).all())


@pytest.mark.parametrize("decay,eps", [(0.0, 1e-5), (0.6, 1e-3), (0.99, 1e-5)])
def test_ema_update_follows_the_formula_over_three_steps(decay, eps):
    torch.manual_seed(0)
    updater = CodebookUpdater(K, ema_update=True, decay=decay, eps=eps, backend="torch")
    state = _state(torch.randn(K, D))
    count = torch.ones(K, dtype=torch.float64)
    total = state.codes.double().clone()
    for n in (41, 5, 100):
        rows = torch.randn(n, D)
        codes = torch.randint(0, K, (n,))
        counts, sums = _reference_stats(rows, codes, K)
        count = decay * count + (1 - decay) * counts
        total = decay * total + (1 - decay) * sums
        smoothed = (count + eps) / (count.sum() + K * eps) * count.sum()
        usage = updater.update_(state, rows, codes)
        torch.testing.assert_close(state.ema_count.double(), count, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state.ema_sum.double(), total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.codes.double(), total / smoothed[:, None], rtol=1e-5, atol=1e-6)
        p = counts / counts.sum()
        nonzero = p[p > 0]
        assert usage.perplexity.item() == pytest.approx(math.exp(-(nonzero * nonzero.log()).sum().item()), rel=1e-5)
        assert usage.used_fraction.item() == pytest.approx(codes.unique().numel() / K)


def test_gradient_codebook_tracks_usage_only():
    updater = CodebookUpdater(K, ema_update=False, decay=0.5, backend="torch")
    codes_before = torch.randn(K, D)
    state = _state(codes_before)
    sum_before = state.ema_sum.clone()
    codes = torch.tensor([1, 1, 4, 6, 1])
    usage = updater.update_(state, torch.randn(5, D), codes)
    expected = 0.5 * torch.ones(K) + 0.5 * torch.bincount(codes, minlength=K).float()
    torch.testing.assert_close(state.ema_count, expected)
    assert torch.equal(state.codes, codes_before) and torch.equal(state.ema_sum, sum_before)
    assert usage.dead.item() == 0  # no revival: "dead" counts vanished usage EMAs only
    for _ in range(30):  # codes 0, 2, 3, 5 unused: 0.5 ** 31 < 1e-3
        usage = updater.update_(state, torch.randn(5, D), codes)
    assert usage.dead.item() == 4 and usage.dead.dtype == torch.int64


@pytest.mark.parametrize("ema_update", [False, True])
def test_dead_codes_are_replaced_by_batch_rows(ema_update):
    torch.manual_seed(1)
    threshold = 0.8
    updater = CodebookUpdater(K, ema_update=ema_update, decay=0.5, threshold_ema_dead_code=threshold, backend="torch")
    state = _state(torch.randn(K, D) + 50.0)
    rows = torch.randn(9, D)
    codes = torch.tensor([0, 0, 0, 3, 3, 3, 3, 0, 0])  # codes 0 and 3 used; their EMA count > 0.8
    usage = updater.update_(state, rows, codes)
    # counts after the EMA step: 0.5 + 0.5 n_k, so the unused five fall to 0.5 < threshold
    dead = torch.tensor([k not in (0, 3) for k in range(K)])
    assert usage.dead.item() == 5
    for k in range(K):
        on_a_row = bool((state.codes[k] == rows).all(-1).any())
        assert on_a_row == bool(dead[k]), k
    torch.testing.assert_close(state.ema_count[dead], torch.full((5,), threshold))
    torch.testing.assert_close(state.ema_count[~dead], torch.tensor([3.0, 2.5]))
    if ema_update:  # the sums restart consistent with the new codes: sum / count = code
        torch.testing.assert_close(state.ema_sum[dead], state.codes[dead] * threshold)


def test_cosine_updates_stay_on_the_sphere():
    torch.manual_seed(2)
    updater = CodebookUpdater(K, ema_update=True, decay=0.3, use_cosine_sim=True, threshold_ema_dead_code=0.9,
                              backend="torch")
    state = _state(nn.functional.normalize(torch.randn(K, D), dim=-1))
    rows = nn.functional.normalize(torch.randn(30, D), dim=-1)
    updater.update_(state, rows, torch.randint(0, 2, (30,)))
    torch.testing.assert_close(state.codes.norm(dim=-1), torch.ones(K))
    smoothed = laplace_smoothed(state.ema_count, updater.eps)
    alive = state.ema_count > 0.9
    expected = nn.functional.normalize(state.ema_sum / smoothed[:, None], dim=-1)
    torch.testing.assert_close(state.codes[alive], expected[alive])


def test_kmeans_init_finds_the_clusters_and_restarts_the_ema():
    torch.manual_seed(3)
    centers = 10 * torch.randn(K, D)
    sizes = [7, 11, 13, 5, 9, 3, 17]
    rows = torch.cat([c + 0.01 * torch.randn(n, D) for c, n in zip(centers, sizes, strict=True)])
    updater = CodebookUpdater(K, kmeans_iters=10, backend="torch")
    state = _state(torch.zeros(K, D))
    updater.kmeans_init_(state, rows[torch.randperm(rows.shape[0])])
    match = torch.cdist(centers, state.codes).argmin(1)  # code nearest to each true center
    assert match.unique().numel() == K
    torch.testing.assert_close(state.codes[match], centers, atol=0.02, rtol=0)
    torch.testing.assert_close(state.ema_count[match], torch.tensor(sizes, dtype=torch.float32))
    torch.testing.assert_close(state.ema_sum, state.codes * state.ema_count[:, None])


def test_changes_codes_flag():
    assert not CodebookUpdater(K).changes_codes
    assert CodebookUpdater(K, ema_update=True).changes_codes
    assert CodebookUpdater(K, threshold_ema_dead_code=0.1).changes_codes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(codebook_size=0), "codebook_size must be a positive int"),
        (dict(codebook_size=True), "codebook_size must be a positive int"),
        (dict(codebook_size=4, decay=1.0), "decay must lie in"),
        (dict(codebook_size=4, eps=0.0), "eps must be > 0"),
        (dict(codebook_size=4, kmeans_iters=-1), "kmeans_iters must be an int >= 0"),
        (dict(codebook_size=4, kmeans_iters=2.0), "kmeans_iters must be an int >= 0"),
        (dict(codebook_size=4, threshold_ema_dead_code=-0.5), "threshold_ema_dead_code"),
        (dict(codebook_size=4, backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookUpdater(**kwargs)


def _module_with_state(books: int = 2, learnable: bool = False) -> Codebook:
    return Codebook(torch.randn(books, K, D), learnable=learnable, initted=False)


@pytest.mark.parametrize("learnable", [False, True])
def test_registered_state_and_its_keys(learnable):
    init = torch.randn(2, K, D)
    module = Codebook(init, learnable=learnable, initted=False)
    # the peer's keys and order of the state; telemetry is not saved
    assert sorted(module.state_dict()) == ["cluster_size", "embed", "embed_avg", "initted"]
    assert torch.equal(module.cluster_size, torch.ones(2, K)) and torch.equal(module.embed_avg, init)
    assert torch.equal(module.embed, init) and module.embed.data_ptr() != init.data_ptr()
    assert module.embed_avg.data_ptr() != module.embed.data_ptr()
    assert isinstance(module.embed, nn.Parameter) == learnable
    assert [name for name, _ in module.named_parameters()] == (["embed"] if learnable else [])
    assert not bool(module.initted) and not module._initted
    assert {name for name, _ in module.named_buffers()} >= {
        "cluster_size", "embed_avg", "initted", "perplexity", "codes_used_fraction", "dead_codes"
    }
    module.mark_initted()
    assert bool(module.initted) and module._initted
    states = module.states()
    assert len(states) == 2 and states[1].codes.data_ptr() == module.embed[1].data_ptr()


def test_the_init_flag_mirror_follows_a_loaded_state_dict():
    done = _module_with_state()
    done.mark_initted()
    fresh = _module_with_state()
    fresh.load_state_dict(done.state_dict())
    assert fresh._initted


def test_record_usage_averages_and_sums():
    module = _module_with_state()
    usages = [
        CodeUsage(torch.tensor(2.0), torch.tensor(0.25), torch.tensor(3)),
        CodeUsage(torch.tensor(5.0), torch.tensor(0.75), torch.tensor(4)),
    ]
    module.record_usage_(usages)
    assert module.perplexity.item() == 3.5 and module.codes_used_fraction.item() == 0.5
    assert module.dead_codes.item() == 7


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_ema_buffers_stay_fp32_without_rounding_under_casts(cast):
    module = _module_with_state()
    module.cluster_size.fill_(1 + 2**-20)  # not representable in fp16 / bf16
    before = {name: getattr(module, name).clone() for name in ("cluster_size", "embed_avg")}
    cast(module)
    assert module.cluster_size.dtype == module.embed_avg.dtype == torch.float32
    assert torch.equal(module.cluster_size, before["cluster_size"])
    assert torch.equal(module.embed_avg, before["embed_avg"])
    assert module.perplexity.dtype != torch.float32  # the telemetry follows the cast like any buffer


def test_initial_codes_choices():
    from fastvq.quantizers.codebook import initial_codes

    assert torch.equal(initial_codes((1, 4, 3), "kaiming_uniform", True, False), torch.zeros(1, 4, 3))
    torch.manual_seed(0)
    normal = initial_codes((2, 4, 3), "normal", True, True)  # normal is drawn even with kmeans_init
    torch.testing.assert_close(normal.norm(dim=-1), torch.ones(2, 4))
    codes = initial_codes((1, 8, 5), "kaiming_uniform", False, False)
    assert codes.abs().max() <= math.sqrt(6 / (8 * 5))  # the peer's bound over (books, K, D)
    with pytest.raises(ValueError, match="codebook_init"):
        initial_codes((1, 4, 3), "uniform", False, False)


def test_remap_old_codebook_keys_adds_books_axis():
    from fastvq.quantizers.checkpoints import remap_old_codebook_keys

    sd = {"q.embed": torch.zeros(4, 3), "q.ema_count": torch.zeros(4), "q.ema_sum": torch.zeros(4, 3),
          "q.initted": torch.tensor(True), "q._codebook.embed": torch.ones(1, 4, 3)}
    sd_embed_kept = dict(sd)
    remap_old_codebook_keys(sd, "q.")
    assert sd["q._codebook.cluster_size"].shape == (1, 4) and sd["q._codebook.embed_avg"].shape == (1, 4, 3)
    assert torch.equal(sd["q._codebook.embed"], sd_embed_kept["q._codebook.embed"])  # a new key wins
    assert "q.embed" in sd and "q.ema_count" not in sd
