"""Stochastic code choice, the Gumbel straight-through estimator, the cross-entropy to codes and the
diversity loss, each against a dense fp64 computation written from vector-quantize-pytorch's
formulas (values and gradients), chunked with tiny budgets, and never holding an M x K block."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastvq.quantizers import sampling
from fastvq.quantizers.entropy import clamped_entropy
from fastvq.quantizers.sampling import (
    code_logits,
    cross_entropy_to_codes,
    diversity_loss,
    gumbel_straight_through,
    row_chunk,
    sample_codes,
)

M, K, D = 37, 13, 5
FOUR_ROWS = 4 * K * 4  # a budget of four float32 rows of K logits: ten chunks for M = 37
FOUR_ROWS_64 = 4 * K * 8  # the same for float64 logits


def _inputs(cos, dtype=torch.float64, m=M, k=K, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, dtype=dtype)
    books = torch.randn(k, d, generator=g, dtype=dtype)
    if cos:  # the peer scores l2-normalised rows and codes
        z, books = F.normalize(z, dim=-1), F.normalize(books, dim=-1)
    return z, books


def _ref_logits(z, books, cos):
    """fp64 logits from the definitions: z.e, or minus the distance from the difference (no expansion)."""
    z, books = z.double(), books.double()
    if cos:
        return z @ books.t()
    return -((z[:, None] - books[None]) ** 2).sum(-1).clamp(min=1e-8).sqrt()


@pytest.fixture
def spy(monkeypatch):
    """Record the rows of every code_logits call the module makes (forward and recomputation)."""
    calls = []
    real = sampling.code_logits

    def recording(z, books, use_cosine_sim):
        calls.append(z.shape[0])
        return real(z, books, use_cosine_sim)

    monkeypatch.setattr(sampling, "code_logits", recording)
    return calls


# ------------------------------------------------------------------------------------------------
# logits and chunking


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, None)])
def test_code_logits_match_the_definition(cos, dtype, tol):
    z, books = _inputs(cos, dtype)
    got = code_logits(z, books, cos)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _ref_logits(z, books, cos)  # from the same stored (possibly bf16) values
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol or 2e-6)


def test_code_logits_match_the_peers_cdist():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    z, books = _inputs(False, torch.float32)
    torch.testing.assert_close(code_logits(z, books, False), -peer.cdist(z[None], books[None])[0])


def test_row_chunk():
    assert row_chunk(13, FOUR_ROWS) == 4
    assert row_chunk(13, 1) == 1  # one row even when it alone exceeds the budget
    assert row_chunk(4096, 64 << 20) == 4096
    with pytest.raises(ValueError, match="budget_bytes"):
        row_chunk(13, 0)


# ------------------------------------------------------------------------------------------------
# sample_codes


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("temperature, stochastic", [(0.0, True), (1.0, False), (0.3, False)])
def test_deterministic_choice_is_the_argmax(cos, temperature, stochastic, spy):
    z, books = _inputs(cos)
    got = sample_codes(z, books, temperature, stochastic=stochastic, use_cosine_sim=cos, budget_bytes=FOUR_ROWS_64)
    assert max(spy) == 4 and len(spy) == math.ceil(M / 4)
    torch.testing.assert_close(got, _ref_logits(z, books, cos).argmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("stochastic", [False, True])
def test_topk_is_ordered_best_first(stochastic):
    z, books = _inputs(False)
    got = sample_codes(z, books, 0.5, stochastic=stochastic, use_cosine_sim=False, topk=4, budget_bytes=FOUR_ROWS_64)
    assert got.shape == (M, 4)
    logits = _ref_logits(z, books, False)
    if not stochastic:
        torch.testing.assert_close(got, logits.topk(4, dim=-1).indices, rtol=0, atol=0)
    assert (got.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct codes per row
    with pytest.raises(ValueError, match="topk"):
        sample_codes(z, books, 0.5, stochastic=stochastic, use_cosine_sim=False, topk=K + 1)


def test_topk_with_noise_orders_the_noisy_scores():
    z, books = _inputs(False, m=5)
    logits = _ref_logits(z, books, False)
    got = sample_codes(
        z, books, 0.5, stochastic=True, use_cosine_sim=False, topk=K, generator=torch.Generator().manual_seed(3)
    )
    noise = sampling.gumbel_noise(logits.shape, logits, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, (logits / 0.5 + noise).argsort(dim=-1, descending=True), rtol=0, atol=0)


def test_a_generator_makes_draws_reproducible():
    z, books = _inputs(False)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample_codes(
            z, books, 2.0, stochastic=True, use_cosine_sim=False, generator=gen, budget_bytes=FOUR_ROWS_64
        )

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize("temperature", [0.4, 1.7])
def test_sampling_frequencies_follow_the_tempered_softmax(temperature):
    # Three distinct rows, each repeated: per row, counts over many draws against softmax(logits / T).
    z, books = _inputs(False, k=6, m=3, seed=1)
    draws = 6000
    rows = z.repeat_interleave(draws, dim=0)
    gen = torch.Generator().manual_seed(11)
    idx = sample_codes(
        rows, books, temperature, stochastic=True, use_cosine_sim=False, generator=gen, budget_bytes=1 << 16
    )
    counts = F.one_hot(idx, 6).view(3, draws, 6).sum(1).double()  # (3, K)
    expected = draws * (_ref_logits(z, books, False) / temperature).softmax(-1)
    chi2 = ((counts - expected) ** 2 / expected).sum(-1)
    # 5 degrees of freedom per row: P(chi2 > 25) ~ 1.4e-4; the seed is fixed, so this cannot flake.
    assert (chi2 < 25).all(), chi2


def test_noise_matches_the_peers_gumbel_sample():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    z, books = _inputs(False, torch.float32)
    logits = code_logits(z, books, False)
    torch.manual_seed(7)
    want, _ = peer.gumbel_sample(logits, temperature=0.6, stochastic=True, training=True)
    torch.manual_seed(7)  # one chunk: the noise is drawn once, from the global generator as the peer's
    got = sample_codes(z, books, 0.6, stochastic=True, use_cosine_sim=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# gumbel_straight_through


def _ref_straight_through(z, books, idx, temperature, cos):
    """The peer's (one_hot + p - sg(p)) @ books, densely in fp64."""
    one_hot = F.one_hot(idx, books.shape[0]).double()
    if temperature > 0:
        p = (_ref_logits(z, books, cos) / temperature).softmax(-1)
        one_hot = one_hot + p - p.detach()
    return one_hot @ books.double()


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_straight_through_value_and_gradients(cos, dtype, tol, temperature, spy):
    z, books = _inputs(cos, dtype)
    z.requires_grad_(), books.requires_grad_()
    idx = torch.randint(0, K, (M,), generator=torch.Generator().manual_seed(2))
    budget = FOUR_ROWS_64 if dtype == torch.float64 else FOUR_ROWS
    out = gumbel_straight_through(z, books, idx, temperature, cos, budget_bytes=budget)
    assert out.dtype == dtype and torch.equal(out, books[idx])  # bitwise the chosen codes
    upstream = torch.randn(M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(out, (z, books), upstream.to(dtype))
    if temperature > 0:
        assert max(spy) == 4 and len(spy) == math.ceil(M / 4)  # the backward ran chunk by chunk
    z64, b64 = z.detach().double().requires_grad_(), books.detach().double().requires_grad_()
    want = torch.autograd.grad(
        _ref_straight_through(z64, b64, idx, temperature, cos), (z64, b64), upstream, allow_unused=True
    )
    want = [torch.zeros_like(z64) if w is None else w for w in want]  # at T = 0 z is out of the graph
    for got_g, want_g in zip(grads, want, strict=True):
        assert got_g.dtype == dtype
        torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol)


def test_straight_through_matches_the_peers_gumbel_sample():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    z, books = _inputs(False)
    z.requires_grad_(), books.requires_grad_()
    idx, one_hot = peer.gumbel_sample(_ref_logits(z, books, False), temperature=1.3, straight_through=True)
    upstream = torch.randn(M, D, dtype=torch.float64)
    want = torch.autograd.grad(one_hot @ books, (z, books), upstream)
    got = torch.autograd.grad(gumbel_straight_through(z, books, idx, 1.3, False, FOUR_ROWS_64), (z, books), upstream)
    for got_g, want_g in zip(got, want, strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)


def test_straight_through_only_to_what_needs_it():
    z, books = _inputs(False)
    z.requires_grad_()
    idx = torch.randint(0, K, (M,))
    upstream = torch.randn(M, D, dtype=torch.float64)
    (gz,) = torch.autograd.grad(gumbel_straight_through(z, books, idx, 0.5, False), z, upstream)
    z64 = z.detach().requires_grad_()
    (want,) = torch.autograd.grad(_ref_straight_through(z64, books, idx, 0.5, False), z64, upstream)
    torch.testing.assert_close(gz, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# cross_entropy_to_codes


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cross_entropy_with_ignored_rows(cos, dtype, tol, spy):
    z, books = _inputs(cos, dtype)
    z.requires_grad_(), books.requires_grad_()
    target = torch.randint(0, K, (M,), generator=torch.Generator().manual_seed(3))
    target[::3] = -1  # a third of the rows left out
    budget = FOUR_ROWS_64 if dtype == torch.float64 else FOUR_ROWS
    got = cross_entropy_to_codes(z, books, target, cos, budget_bytes=budget)
    got_grads = torch.autograd.grad(got, (z, books))
    assert max(spy) == 4 and len(spy) == 2 * math.ceil(M / 4)  # chunked forward, chunked recomputation
    z64, b64 = z.detach().double().requires_grad_(), books.detach().double().requires_grad_()
    logits = _ref_logits(z64, b64, cos)
    kept = target != -1
    # written out: mean over kept rows of logsumexp - the target's logit
    want = (logits[kept].logsumexp(-1) - logits[kept].gather(1, target[kept, None])[:, 0]).mean()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for got_g, want_g in zip(got_grads, torch.autograd.grad(want, (z64, b64)), strict=True):
        torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol)


def test_cross_entropy_matches_the_peers_call():
    z, books = _inputs(False)
    target = torch.randint(-1, K, (M,), generator=torch.Generator().manual_seed(8))
    want = F.cross_entropy(_ref_logits(z, books, False), target, ignore_index=-1)
    torch.testing.assert_close(cross_entropy_to_codes(z, books, target, False, FOUR_ROWS_64), want)


def test_cross_entropy_with_every_row_ignored_is_zero_with_a_gradient():
    z, books = _inputs(False)
    z.requires_grad_(), books.requires_grad_()
    loss = cross_entropy_to_codes(z, books, torch.full((M,), -1), False, FOUR_ROWS_64)
    assert loss.item() == 0.0
    gz, gb = torch.autograd.grad(loss, (z, books))
    assert torch.equal(gz, torch.zeros_like(z)) and torch.equal(gb, torch.zeros_like(books))


# ------------------------------------------------------------------------------------------------
# diversity_loss


def _ref_diversity(z, books, temperature, cos):
    """-mean_n H(mean over batch and heads of softmax(T * logits)), densely in fp64."""
    b, n, h, d = z.shape
    per_head = books.expand(h, -1, -1)
    logits = torch.stack([_ref_logits(z[:, :, i].reshape(b * n, d), per_head[i], cos) for i in range(h)], 1)
    prob = (logits * temperature).softmax(-1).view(b, n, h, -1)  # (B, N, H, K)
    avg = prob.mean(dim=(0, 2))  # (N, K)
    return -(-avg * avg.clamp(min=1e-5).log()).sum(-1).mean()


@pytest.mark.parametrize("cos", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("budget_rows", [2, 7, 1000])  # batch rows split; positions blocked; one block
def test_diversity_loss_value_and_gradients(cos, per_head, dtype, tol, budget_rows):
    b, n, h = 3, 7, 2
    g = torch.Generator().manual_seed(9)
    z = torch.randn(b, n, h, D, generator=g, dtype=dtype)
    books = torch.randn(h if per_head else 1, K, D, generator=g, dtype=dtype)
    if cos:
        z, books = F.normalize(z, dim=-1), F.normalize(books, dim=-1)
    z.requires_grad_(), books.requires_grad_()
    budget = budget_rows * K * (8 if dtype == torch.float64 else 4)
    got = diversity_loss(z, books, 3.0, cos, budget_bytes=budget)
    got_grads = torch.autograd.grad(got, (z, books))
    z64, b64 = z.detach().double().requires_grad_(), books.detach().double().requires_grad_()
    want = _ref_diversity(z64, b64, 3.0, cos)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for got_g, want_g in zip(got_grads, torch.autograd.grad(want, (z64, b64)), strict=True):
        torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol)


@pytest.mark.parametrize("per_head", [False, True])
def test_diversity_loss_follows_the_peers_layout(per_head):
    # The peer's own expression on its own (heads, batch, positions, K) distances.
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    b, n, h = 2, 5, 3
    z = torch.randn(b, n, h, D, dtype=torch.float64)
    books = torch.randn(h if per_head else 1, K, D, dtype=torch.float64)
    if per_head:  # 'h b n d' against one codebook each
        flat = z.permute(2, 0, 1, 3).reshape(h, b * n, D)
    else:  # '1 (b h) n d' against the one codebook
        flat = z.permute(0, 2, 1, 3).reshape(1, b * h * n, D)
    distances = -peer.cdist(flat, books).view(books.shape[0], -1, n, K)
    prob = (distances * 2.5).softmax(dim=-1)
    want = -peer.entropy(prob.flatten(0, 1).mean(0)).mean()
    torch.testing.assert_close(diversity_loss(z, books, 2.5, False, 3 * K * 8), want, rtol=1e-12, atol=1e-12)


def test_clamped_entropy_is_the_peers():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    p = torch.rand(7, K, dtype=torch.float64) ** 8  # many entries below the 1e-5 clamp
    torch.testing.assert_close(clamped_entropy(p), peer.entropy(p), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# memory: no call ever scores more rows than the budget allows, forward or backward


class _LargestTensor(TorchDispatchMode):
    """Record the largest storage any op (forward or backward, autograd's included) returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_no_m_by_k_block_on_a_large_problem(spy):
    big_m, big_k, d = 2048, 1024, 4
    budget = 1 << 18  # 64 float32 rows of 1024 logits; the dense (M, K) matrix would be 8 MiB
    rows = row_chunk(big_k, budget)
    assert rows == 64
    g = torch.Generator().manual_seed(0)
    z = torch.randn(big_m, d, generator=g, requires_grad=True)
    books = torch.randn(big_k, d, generator=g, requires_grad=True)
    with _LargestTensor() as seen:
        idx = sample_codes(z, books, 1.0, stochastic=True, use_cosine_sim=False, budget_bytes=budget)
        out = gumbel_straight_through(z, books, idx, 1.0, False, budget)
        target = idx.clone()
        target[::2] = -1
        ce = cross_entropy_to_codes(z, books, target, False, budget)
        div = diversity_loss(z.view(128, 16, 1, d), books[None], 10.0, False, budget)  # B > rows: split
        (out.sum() + ce + div).backward()
    assert seen.largest <= budget  # no tensor at all, forward or backward, above one chunk's block
    assert max(spy) <= rows
    # three forward passes, three chunked recomputations (straight-through, cross-entropy, diversity)
    # and the diversity's nested recomputation: 7 passes of 32 chunks
    assert len(spy) == 7 * big_m // rows
    assert torch.isfinite(z.grad).all() and torch.isfinite(books.grad).all()


def test_the_largest_tensor_probe_sees_a_dense_matrix():
    z, books = torch.randn(256, 4), torch.randn(128, 4)
    with _LargestTensor() as seen:
        code_logits(z, books, False)
    assert seen.largest == 256 * 128 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_peak_cuda_memory_stays_far_below_the_dense_matrix():
    big_m, big_k, d = 32768, 8192, 16
    dense = big_m * big_k * 4  # 1 GiB of float32 logits
    budget = 8 << 20
    z = torch.randn(big_m, d, device="cuda", requires_grad=True)
    books = torch.randn(big_k, d, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    idx = sample_codes(z, books, 1.0, stochastic=True, use_cosine_sim=False, budget_bytes=budget)
    out = gumbel_straight_through(z, books, idx, 1.0, False, budget)
    ce = cross_entropy_to_codes(z, books, idx, False, budget)
    div = diversity_loss(z.view(32, 1024, 1, d), books[None], 10.0, False, budget)
    (out.sum() + ce + div).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # a handful of live (rows, K) blocks (logits, softmax, their gradients) and O(M D) tensors
    assert peak < 16 * budget < dense / 4, peak


# ------------------------------------------------------------------------------------------------
# argument checks


def _calls(z, books, t=1.0, topk=None, idx=None, **_):
    idx = torch.zeros(M, dtype=torch.int64) if idx is None else idx
    return {
        "sample": lambda: sample_codes(z, books, t, stochastic=True, use_cosine_sim=False, topk=topk),
        "straight": lambda: gumbel_straight_through(z, books, idx, t, False),
        "ce": lambda: cross_entropy_to_codes(z, books, idx, False),
    }


@pytest.mark.parametrize("which", ["sample", "straight", "ce"])
@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"z": torch.randn(M, D + 1)}, ValueError, "last dimension"),
        ({"z": torch.randn(2, M, D)}, ValueError, "z must be 2-D"),
        ({"books": torch.randn(K, D).double()}, TypeError, "one dtype"),
        ({"books": torch.randn(0, D)}, ValueError, "at least one code"),
        ({"z": torch.zeros(M, D, dtype=torch.int64)}, TypeError, "floating"),
    ],
)
def test_bad_arguments_raise_naming_them(which, change, error, words):
    z = change.get("z", torch.randn(M, D))
    books = change.get("books", torch.randn(K, D))
    with pytest.raises(error, match=words):
        _calls(z, books)[which]()


@pytest.mark.parametrize("which", ["sample", "straight"])
@pytest.mark.parametrize("t", [-0.5, float("nan"), float("inf")])
def test_bad_temperature_raises(which, t):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        _calls(torch.randn(M, D), torch.randn(K, D), t=t)[which]()


@pytest.mark.parametrize(
    "which, idx, words",
    [
        ("straight", torch.full((M,), K), r"idx values must lie in \[0, 13\)"),
        ("straight", torch.full((M,), -1), "idx values"),
        ("ce", torch.full((M,), -2), r"target values must lie in \[-1, 13\)"),
        ("ce", torch.zeros(M, dtype=torch.int32), "target must be int64"),
        ("ce", torch.zeros(M + 1, dtype=torch.int64), r"target must have shape \(37,\)"),
    ],
)
def test_bad_indices_raise(which, idx, words):
    with pytest.raises((ValueError, TypeError), match=words):
        _calls(torch.randn(M, D), torch.randn(K, D), idx=idx)[which]()


@pytest.mark.parametrize("topk", [0, K + 1, 2.0])
def test_bad_topk_raises(topk):
    with pytest.raises(ValueError, match="topk"):
        _calls(torch.randn(M, D), torch.randn(K, D), topk=topk)["sample"]()


def test_diversity_loss_checks_its_shapes():
    z = torch.randn(2, 3, 4, D)
    with pytest.raises(ValueError, match=r"\(1, K, D\) or \(H = 4, K, D\)"):
        diversity_loss(z, torch.randn(2, K, D), 1.0, False)
    with pytest.raises(ValueError, match="z must be 4-D"):
        diversity_loss(z[0], torch.randn(1, K, D), 1.0, False)
    with pytest.raises(ValueError, match="B, N, H >= 1"):
        diversity_loss(z[:, :0], torch.randn(1, K, D), 1.0, False)
    with pytest.raises(ValueError, match="codebook_diversity_temperature|temperature"):
        diversity_loss(z, torch.randn(1, K, D), -1.0, False)
