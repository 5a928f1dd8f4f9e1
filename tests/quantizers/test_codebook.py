"""The codebook part alone: CodebookUpdater's EMA, revival, k-means init and telemetry against fp64
references written from the formulas (bincount / index_add, not fastvq's ops), and the ``Codebook``
submodule (a quantizer's ``_codebook``) with vector-quantize-pytorch's keys."""

import math

import pytest
import torch
from torch import nn

from fastvq.quantizers import codebook
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


# ---- the peer's codebook-update controls: weights, accumulation, manual EMA, expiry, sync -------

BOOKS = 2


def _book(ema_update: bool = True, learnable: bool = False, **kwargs) -> tuple[Codebook, CodebookUpdater]:
    """A two-codebook ``_codebook`` with an updater (fp32 state from a fresh draw)."""
    updater = CodebookUpdater(K, ema_update=ema_update, backend="torch", **kwargs)
    book = Codebook(torch.randn(BOOKS, K, D), learnable=learnable, initted=True, updater=updater)
    book.cluster_size.uniform_(0.5, 3.0)  # not the all-ones start: the weights must matter
    book.embed_avg.copy_(book.embed * book.cluster_size[..., None])
    return book, updater


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (n, 1, H, D) rows and idx (n, 1, H) codes, one head per codebook (odd sizes)."""
    return torch.randn(n, 1, BOOKS, D), torch.randint(0, K, (n, 1, BOOKS))


def _book_stats(z: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 per-codebook counts (books, K) and sums (books, K, D) by bincount / index_add."""
    pairs = [_reference_stats(z[..., b, :].reshape(-1, D), idx[..., b].reshape(-1), K) for b in range(BOOKS)]
    return torch.stack([n for n, _ in pairs]), torch.stack([s for _, s in pairs])


def _reference_ema(book: Codebook, counts, sums, decay, eps, weight=None, cosine=False):
    """fp64 (cluster_size, embed_avg, codes) after the peer's lerp(new, (1 - decay) * weight)."""
    rate = torch.full((BOOKS, K), 1.0 - decay, dtype=torch.float64)
    if weight is not None:
        rate = rate * weight.double().expand(BOOKS, K)
    count = book.cluster_size.double() + rate * (counts - book.cluster_size.double())
    total = book.embed_avg.double() + rate[..., None] * (sums - book.embed_avg.double())
    smoothed = (count + eps) / (count.sum(-1, keepdim=True) + K * eps) * count.sum(-1, keepdim=True)
    codes = total / smoothed[..., None]
    return count, total, (nn.functional.normalize(codes, dim=-1) if cosine else codes)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["per_code", "per_book", "callable", "number"])
def test_ema_weight_scales_the_rate_per_code(kind):
    torch.manual_seed(10)
    decay, eps = 0.7, 1e-3
    book, updater = _book(decay=decay, eps=eps)
    z, idx = _batch(41)
    counts, sums = _book_stats(z, idx)
    seen = []
    if kind == "per_code":
        weight = expected_w = torch.rand(K) * 2
    elif kind == "per_book":
        weight = expected_w = torch.rand(BOOKS, K) * 2
    elif kind == "number":
        weight, expected_w = 0.3, torch.tensor(0.3)
    else:  # a weight computed from the statistics it is handed: wrong statistics give a wrong EMA
        expected_w = torch.sigmoid(counts - sums.sum(-1)).float()

        def weight(embed_sum, cluster_size):
            seen.append((embed_sum.clone(), cluster_size.clone()))
            return torch.sigmoid(cluster_size - embed_sum.sum(-1))

    before = _reference_ema(book, counts, sums, decay, eps, expected_w)
    codebook.update_books_(book, updater, z, idx, weight=weight)
    for actual, expected in zip((book.cluster_size, book.embed_avg, book.embed), before, strict=True):
        _close(actual, expected)
    if kind == "callable":
        (embed_sum, cluster_size), = seen
        assert embed_sum.shape == (BOOKS, K, D) and cluster_size.shape == (BOOKS, K)
        _close(embed_sum, sums)
        _close(cluster_size, counts)


def test_a_callable_weight_may_return_none_for_no_weight():
    torch.manual_seed(9)
    book, updater = _book(decay=0.5)
    plain = Codebook(book.embed, learnable=False, initted=True, updater=updater)
    plain.load_state_dict(book.state_dict())
    z, idx = _batch(21)
    codebook.update_books_(book, updater, z, idx, weight=lambda s, n: None)  # the peer's default(w, 1.)
    codebook.update_books_(plain, updater, z, idx)
    for name, value in plain.state_dict().items():
        assert torch.equal(getattr(book, name), value), name


def test_ema_weight_of_zero_freezes_those_codes():
    torch.manual_seed(11)
    book, updater = _book(decay=0.5)
    frozen = torch.tensor([True, False, True, False, False, True, False])
    before_count, before_sum = book.cluster_size.clone(), book.embed_avg.clone()
    codebook.update_books_(book, updater, *_batch(60), weight=(~frozen).float())
    assert torch.equal(book.cluster_size[:, frozen], before_count[:, frozen])
    assert torch.equal(book.embed_avg[:, frozen], before_sum[:, frozen])
    assert not torch.equal(book.cluster_size[:, ~frozen], before_count[:, ~frozen])


def test_ema_weight_applies_to_the_usage_ema_without_code_ema():
    torch.manual_seed(12)
    decay = 0.6
    book, updater = _book(ema_update=False, decay=decay, threshold_ema_dead_code=1e-4)  # nothing dies
    codes_before, sum_before = book.embed.clone(), book.embed_avg.clone()
    weight = torch.rand(BOOKS, K)
    z, idx = _batch(33)
    counts, sums = _book_stats(z, idx)
    expected_count, _, _ = _reference_ema(book, counts, sums, decay, updater.eps, weight)
    codebook.update_books_(book, updater, z, idx, weight=weight)
    _close(book.cluster_size, expected_count)
    assert torch.equal(book.embed, codes_before) and torch.equal(book.embed_avg, sum_before)


@pytest.mark.parametrize(
    "weight,error,match",
    [
        (torch.ones(K + 1), ValueError, r"shape \(7,\) or \(2, 7\)"),
        (torch.ones(BOOKS, K, 1), ValueError, "ema_update_weight must have shape"),
        (True, TypeError, "ema_update_weight must be"),
        ("1", TypeError, "got str"),
        (lambda s, n: "w", TypeError, "got str"),
        (lambda s, n: torch.ones(K, 1), ValueError, r"got \(7, 1\)"),
    ],
)
def test_bad_ema_weights(weight, error, match):
    book, updater = _book()
    with pytest.raises(error, match=match):
        codebook.update_books_(book, updater, *_batch(5), weight=weight)


@pytest.mark.parametrize("ema_update", [True, False])
def test_accumulating_twice_then_updating_equals_one_update_of_the_summed_statistics(ema_update):
    torch.manual_seed(13)
    decay, eps = 0.8, 1e-5
    # a threshold that the accumulating steps would cross if they revived
    book, updater = _book(ema_update=ema_update, decay=decay, eps=eps, threshold_ema_dead_code=0.55)
    batches = [_batch(n) for n in (17, 29, 11)]
    counts = sum(_book_stats(*b)[0] for b in batches)
    sums = sum(_book_stats(*b)[1] for b in batches)
    expected = _reference_ema(book, counts, sums, decay, eps)
    state_before = {k: v.clone() for k, v in book.state_dict().items()}
    for z, idx in batches[:2]:
        codebook.update_books_(book, updater, z, idx, accumulate=True)
        for name, value in book.state_dict().items():  # nothing moves: no EMA, no codes, no revival
            assert torch.equal(value, state_before[name]), name
        assert book.perplexity.item() > 1  # telemetry as on any training step
    _close(book.cluster_size_accum, sum(_book_stats(*b)[0] for b in batches[:2]))
    if ema_update:
        _close(book.embed_avg_accum, sum(_book_stats(*b)[1] for b in batches[:2]))
    codebook.update_books_(book, updater, *batches[2])
    assert not book.cluster_size_accum.any() and not book.embed_avg_accum.any()  # cleared
    alive = expected[0] >= 0.55  # revival only touches the others
    _close(book.cluster_size[alive], expected[0][alive])
    if ema_update:
        _close(book.embed_avg[alive], expected[1][alive])
        _close(book.embed[alive], expected[2][alive])


def test_accumulated_statistics_are_weighted_with_the_step_that_applies_them():
    torch.manual_seed(14)
    decay = 0.5
    book, updater = _book(decay=decay)
    first, second = _batch(23), _batch(19)
    counts = _book_stats(*first)[0] + _book_stats(*second)[0]
    sums = _book_stats(*first)[1] + _book_stats(*second)[1]
    weight = torch.rand(K)
    expected = _reference_ema(book, counts, sums, decay, updater.eps, weight)
    codebook.update_books_(book, updater, *first, accumulate=True, weight=torch.zeros(K))  # ignored
    codebook.update_books_(book, updater, *second, weight=weight)
    for actual, want in zip((book.cluster_size, book.embed_avg, book.embed), expected, strict=True):
        _close(actual, want)


def test_accumulators_are_fp32_buffers_outside_the_state_dict():
    book, _ = _book()
    assert sorted(book.state_dict()) == ["cluster_size", "embed", "embed_avg", "initted"]
    buffers = dict(book.named_buffers())
    assert buffers["cluster_size_accum"].shape == (BOOKS, K) and buffers["embed_avg_accum"].shape == (BOOKS, K, D)
    book.half()
    assert book.cluster_size_accum.dtype == book.embed_avg_accum.dtype == torch.float32
    state = book.states()[1]
    assert state.count_accum.data_ptr() == book.cluster_size_accum[1].data_ptr()


def test_accumulate_needs_a_state_with_accumulators():
    updater = CodebookUpdater(K, ema_update=True, backend="torch")
    with pytest.raises(ValueError, match="accumulators"):
        updater.update_(_state(torch.randn(K, D)), torch.randn(4, D), torch.tensor([0, 1, 2, 3]), accumulate=True)


@pytest.mark.parametrize("cosine", [False, True])
def test_manual_ema_update_tracks_statistics_and_writes_codes_only_on_request(cosine):
    torch.manual_seed(15)
    manual, updater = _book(decay=0.6, use_cosine_sim=cosine, manual_ema_update=True)
    auto_updater = CodebookUpdater(K, ema_update=True, decay=0.6, use_cosine_sim=cosine, backend="torch")
    auto = Codebook(manual.embed, learnable=False, initted=True, updater=auto_updater)
    auto.load_state_dict(manual.state_dict())
    codes_before = manual.embed.clone()
    for n in (31, 8, 50):
        z, idx = _batch(n)
        codebook.update_books_(manual, updater, z, idx)
        codebook.update_books_(auto, auto_updater, z, idx)
        assert torch.equal(manual.embed, codes_before)
        assert torch.equal(manual.cluster_size, auto.cluster_size)
        assert torch.equal(manual.embed_avg, auto.embed_avg)
    assert not torch.equal(auto.embed, codes_before)
    manual.update_ema()
    torch.testing.assert_close(manual.embed, auto.embed, rtol=0, atol=0)
    _close(manual.embed, _reference_ema(manual, 0, 0, 0.0, updater.eps, torch.zeros(K), cosine)[2])


def test_manual_ema_update_still_revives_dead_codes_every_step():
    torch.manual_seed(16)
    book, updater = _book(decay=0.5, manual_ema_update=True, threshold_ema_dead_code=0.8)
    book.cluster_size.fill_(1.0)
    z = torch.randn(9, 1, BOOKS, D)
    idx = torch.zeros(9, 1, BOOKS, dtype=torch.int64)  # only code 0 used: the rest fall to 0.5 < 0.8
    before = book.embed.clone()
    codebook.update_books_(book, updater, z, idx)
    assert torch.equal(book.embed[:, 0], before[:, 0])
    for b in range(BOOKS):
        for k in range(1, K):
            assert bool((book.embed[b, k] == z[:, 0, b]).all(-1).any()), (b, k)
    assert book.dead_codes.item() == BOOKS * (K - 1)


def test_update_ema_needs_the_updater():
    book = Codebook(torch.randn(1, K, D), learnable=False, initted=True)
    with pytest.raises(RuntimeError, match="updater"):
        book.update_ema()
    with pytest.raises(TypeError, match="updater must be a CodebookUpdater"):
        Codebook(torch.randn(1, K, D), learnable=False, initted=True, updater={"eps": 1e-5})


def test_update_ema_writes_a_learnable_codebook_in_its_dtype():
    torch.manual_seed(17)
    book, updater = _book(learnable=True, manual_ema_update=True)
    book.half()
    book.cluster_size.uniform_(0.0, 4.0)  # zeros included: Laplace smoothing keeps them finite
    book.embed_avg.normal_()
    book.update_ema()
    assert book.embed.dtype == torch.float16 and isinstance(book.embed, nn.Parameter)
    expected = _reference_ema(book, 0, 0, 0.0, updater.eps, torch.zeros(K))[2]
    torch.testing.assert_close(book.embed.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ema_update", [True, False])
def test_expire_codes_replaces_exactly_the_dead_codes(ema_update):
    torch.manual_seed(18)
    threshold = 1.5
    book, updater = _book(ema_update=ema_update, threshold_ema_dead_code=threshold)
    dead = torch.rand(BOOKS, K) < 0.5
    dead[0, 0], dead[1, 1] = True, False  # both kinds in every run
    book.cluster_size.copy_(torch.where(dead, 1.0, torch.where(torch.rand(BOOKS, K) < 0.5, threshold, 2.0)))  # < only
    state_before = {k: v.clone() for k, v in book.state_dict().items()}
    z = torch.randn(5, 3, BOOKS, D) + 100.0  # far from every code: a replaced code is a row of z
    replaced = codebook.expire_codes_(book, updater, z)
    assert torch.equal(replaced, dead)
    for b in range(BOOKS):
        rows = z[..., b, :].reshape(-1, D)
        for k in range(K):
            assert bool((book.embed[b, k] == rows).all(-1).any()) == bool(dead[b, k]), (b, k)
    assert torch.equal(book.embed[~dead], state_before["embed"][~dead])
    assert torch.equal(book.cluster_size[~dead], state_before["cluster_size"][~dead])
    torch.testing.assert_close(book.cluster_size[dead], torch.full((int(dead.sum()),), threshold))
    if ema_update:
        torch.testing.assert_close(book.embed_avg[dead], book.embed[dead] * threshold)
        assert torch.equal(book.embed_avg[~dead], state_before["embed_avg"][~dead])


def test_expire_codes_is_a_no_op_without_a_threshold_and_checks_z():
    book, updater = _book(threshold_ema_dead_code=0.0)
    book.cluster_size.zero_()  # everything "dead", yet no revival is configured
    before = {k: v.clone() for k, v in book.state_dict().items()}
    replaced = codebook.expire_codes_(book, updater, torch.randn(4, BOOKS, D))
    assert replaced.shape == (BOOKS, K) and not replaced.any()
    assert all(torch.equal(v, before[k]) for k, v in book.state_dict().items())
    with pytest.raises(ValueError, match="z must have shape"):
        codebook.expire_codes_(book, updater, torch.randn(4, BOOKS, D + 1))
    with pytest.raises(ValueError, match="z must have shape"):
        codebook.expire_codes_(book, updater, torch.randn(4, BOOKS + 1, D))
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        codebook.expire_codes_(book, updater, torch.ones(4, BOOKS, D, dtype=torch.int64))


def _spy_on_collectives(monkeypatch) -> list[str]:
    """Pretend to run under torch.distributed with > 1 rank; record every collective (as no-ops)."""
    import torch.distributed as dist

    import fastvq.distributed

    calls = []
    monkeypatch.setattr(fastvq.distributed, "is_distributed", lambda: True)
    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(dist, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 1)
    return calls


@pytest.mark.parametrize("sync", [None, True, False])
def test_sync_false_makes_no_collective_call(monkeypatch, sync):
    calls = _spy_on_collectives(monkeypatch)
    book, updater = _book(threshold_ema_dead_code=0.5, sync=sync)
    codebook.update_books_(book, updater, *_batch(12))
    codebook.expire_codes_(book, updater, _batch(3)[0])
    if sync is False:
        codebook.kmeans_init_books_(book, CodebookUpdater(K, kmeans_iters=1, backend="torch", sync=False),
                                    _batch(20)[0])
        assert calls == []
    else:  # counts and sums of each codebook, then rank 0's revival candidates, in both calls
        assert calls.count("all_reduce") == 2 * BOOKS and calls.count("broadcast") == 2 * BOOKS


@pytest.mark.parametrize("sync_kmeans", [True, False])
def test_sync_kmeans_false_clusters_each_ranks_own_rows(monkeypatch, sync_kmeans):
    calls = _spy_on_collectives(monkeypatch)
    gathered = []
    monkeypatch.setattr(codebook, "all_gather_rows", lambda rows: gathered.append(rows.shape) or rows)
    book, _ = _book()
    updater = CodebookUpdater(K, kmeans_iters=1, backend="torch", sync_kmeans=sync_kmeans)
    codebook.kmeans_init_books_(book, updater, _batch(20)[0])
    if sync_kmeans:  # rows gathered, centroids and counts broadcast, per codebook
        assert len(gathered) == BOOKS and calls.count("broadcast") == 2 * BOOKS
    else:
        assert gathered == [] and calls == []


def test_manual_and_sync_options_are_checked():
    with pytest.raises(TypeError, match="manual_ema_update must be a bool"):
        CodebookUpdater(K, manual_ema_update=1)
    with pytest.raises(TypeError, match="sync must be None or a bool"):
        CodebookUpdater(K, sync="yes")
    assert not CodebookUpdater(K, ema_update=True, manual_ema_update=True).changes_codes
    assert CodebookUpdater(K, ema_update=True, manual_ema_update=True, threshold_ema_dead_code=1.0).changes_codes
    assert CodebookUpdater(K, sync=True).syncs and not CodebookUpdater(K, sync=False).syncs


def test_weighted_and_accumulating_updates_compile_without_graph_breaks():
    torch.manual_seed(19)
    book, updater = _book(decay=0.7)
    twin = Codebook(book.embed, learnable=False, initted=True, updater=updater)
    twin.load_state_dict(book.state_dict())
    weight = torch.rand(BOOKS, K)

    def step(b, z, idx, accumulate):
        codebook.update_books_(b, updater, z, idx, weight=weight, accumulate=accumulate)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for z, idx in (_batch(13), _batch(13)):
        for accumulate in (True, False):
            compiled(book, z, idx, accumulate)
            step(twin, z, idx, accumulate)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(getattr(book, name), value, rtol=1e-6, atol=1e-6)


# ---- one step against vector-quantize-pytorch's Codebook ------------------------------------------


def _peer_pair(manual: bool = False, decay: float = 0.7, eps: float = 1e-4):
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    ours, updater = _book(decay=decay, eps=eps, manual_ema_update=manual)
    peer = vqp.Codebook(D, K, num_codebooks=BOOKS, decay=decay, eps=eps, threshold_ema_dead_code=0,
                        ema_update=True, manual_ema_update=manual)
    with torch.no_grad():
        for name in ("embed", "embed_avg", "cluster_size"):
            getattr(peer, name).copy_(getattr(ours, name))
    return ours, updater, peer


def _peer_step(peer, z, idx, **kwargs):
    """The peer's update from our (n, 1, H, D) rows: its x is (h, b, n, d), its indices (h, b, n)."""
    peer.update_indices(z.permute(2, 0, 1, 3), idx.permute(2, 0, 1), **kwargs)


def _assert_same_state(ours, peer):
    for name in ("cluster_size", "embed_avg", "embed"):
        torch.testing.assert_close(getattr(ours, name), getattr(peer, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [None, "per_book", "callable"])
def test_a_weighted_step_matches_the_peer(kind):
    torch.manual_seed(20)
    ours, updater, peer = _peer_pair()
    weight = {None: None, "per_book": torch.rand(BOOKS, K),
              "callable": lambda s, n: torch.sigmoid(n - s.sum(-1))}[kind]
    z, idx = _batch(37)
    codebook.update_books_(ours, updater, z, idx, weight=weight)
    _peer_step(peer, z, idx, ema_update_weight=weight)
    _assert_same_state(ours, peer)


def test_accumulation_and_manual_update_match_the_peer():
    torch.manual_seed(21)
    ours, updater, peer = _peer_pair(manual=True)
    for accumulate, n in ((True, 19), (True, 7), (False, 25)):
        z, idx = _batch(n)
        codebook.update_books_(ours, updater, z, idx, accumulate=accumulate)
        _peer_step(peer, z, idx, accum_ema_update=accumulate)
        _assert_same_state(ours, peer)
    ours.update_ema()
    peer.update_ema()
    _assert_same_state(ours, peer)
