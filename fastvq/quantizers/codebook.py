"""Codebook state and its training-time updates: EMA, k-means init, dead codes, DDP sync, telemetry.

EMA formulas: the VQ-VAE paper's appendix (van den Oord et al. 2017) as in Sonnet's
VectorQuantizerEMA. With n_k the rows assigned to code k in the batch and s_k their sum,
    N_k <- decay N_k + (1 - decay) n_k,        m_k <- decay m_k + (1 - decay) s_k,
    e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)
so that a code that is never used does not divide by zero. The per-step update is tensor code
with no host synchronisation (no .item(), no Python branch on values): it compiles and never
stalls a GPU. Only the one-time k-means initialisation synchronises (it gathers rows over ranks).

Who owns what. The tensors (codes, EMA buffers, ``initted`` and the telemetry buffers) live on
``Codebook``, the quantizer's ``_codebook`` submodule, so state_dict keys are
vector-quantize-pytorch's (``_codebook.embed``, ``_codebook.cluster_size``, ...) and ``.to()``
moves them with the module; it keeps the EMA in fp32. ``CodebookUpdater`` holds only the
hyper-parameters and is handed the tensors of one codebook (a ``CodebookState``) on every call,
so it can never keep a stale tensor after ``.to()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import metrics
from fastvq.checks import nonnegative_int, positive_int
from fastvq.distributed import all_gather_rows, all_reduce_sum_, broadcast_
from fastvq.functional import BACKENDS, code_stats
from fastvq.quantizers.kmeans import kmeans

# EMA accumulators that stay float32 whatever the module's dtype (Codebook._apply).
FP32_BUFFERS = ("cluster_size", "embed_avg")


def ema_inplace_(average: Tensor, new: Tensor, decay: float) -> None:
    """average <- decay * average + (1 - decay) * new, in place (any matching shapes)."""
    average.mul_(decay).add_(new, alpha=1.0 - decay)


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """Counts (..., K) with Laplace smoothing along the last axis; same total as ``counts``."""
    total = counts.sum(dim=-1, keepdim=True)
    return (counts + eps) / (total + counts.shape[-1] * eps) * total


def synced_batch_stats(*stats: Tensor) -> None:
    """Sum per-code statistics (counts (K,), sums (K, D)) over ranks in place; no-op in one process."""
    all_reduce_sum_(*stats)


def revive_dead_codes_(
    codebook: Tensor, ema_count: Tensor, ema_sum: Tensor | None, batch: Tensor, threshold: float
) -> Tensor:
    """Replace codes whose EMA count is below ``threshold`` by random rows of ``batch``.

    Args:
        codebook: (K, D) updated in place. ema_count: (K,) updated in place (revived codes restart
            at ``threshold``). ema_sum: (K, D) or None, kept consistent with the new codes.
        batch: (N, D) rows of the current batch (N >= 0).

    Returns:
        dead: (K,) bool, the codes that were replaced. Candidates are drawn on rank 0 and
        broadcast, so every rank replaces the same codes with the same vectors.
    """
    num_codes = codebook.shape[0]
    dead = ema_count < threshold  # (K,)
    if batch.shape[0] > 0:  # a static shape: no host sync
        pick = torch.randint(0, batch.shape[0], (num_codes,), device=batch.device)
        candidates = batch[pick].to(codebook.dtype).contiguous()  # (K, D)
    else:  # an empty batch on this rank: rank 0's broadcast decides (or nothing changes)
        candidates = codebook.clone()
    candidates = broadcast_(candidates)
    codebook.copy_(torch.where(dead[:, None], candidates, codebook))
    ema_count.copy_(torch.where(dead, torch.full_like(ema_count, threshold), ema_count))
    if ema_sum is not None:
        ema_sum.copy_(torch.where(dead[:, None], candidates.float() * threshold, ema_sum))
    return dead


class CodebookState(NamedTuple):
    """The tensors of ONE codebook, updated in place (views into the module's buffers)."""

    codes: Tensor  # (K, D) the codebook, in the module's dtype
    ema_count: Tensor  # (K,) float32 usage EMA
    ema_sum: Tensor  # (K, D) float32 EMA of the assigned rows' sums (used with ema_update only)


class CodeUsage(NamedTuple):
    """Telemetry of one codebook in one training forward (0-d tensors, no host sync)."""

    perplexity: Tensor  # exp(entropy) of the batch's code counts, in [1, K]
    used_fraction: Tensor  # fraction of codes used by the batch
    dead: Tensor  # int64: codes revived now, or (no revival) codes whose usage EMA has vanished


class Codebook(nn.Module):
    """The codebook state of one quantizer, registered as its ``_codebook`` submodule.

    Its state_dict keys are vector-quantize-pytorch's: ``embed`` (books, K, D), a Parameter when
    the codebook is trained by gradient and a buffer otherwise; ``initted`` (0-d bool);
    ``cluster_size`` (books, K) the usage EMA and ``embed_avg`` (books, K, D) the EMA of the
    assigned rows' sums, both kept float32 whatever the module's dtype. As in the peer every code
    starts as if seen once at its initial value (count 1, sum = code), so the EMA ratio
    ``embed_avg / cluster_size`` equals the code from the first step on. Telemetry buffers
    (``perplexity``, ``codes_used_fraction``, ``dead_codes``, 0-d) are not saved.

    Args:
        init: (books, K, D) the initial codes.
        learnable: register ``embed`` as a Parameter (gradient-trained) or a buffer.
        initted: False when the first training batch is still to initialise the codes (k-means).
    """

    def __init__(self, init: Tensor, *, learnable: bool, initted: bool) -> None:
        super().__init__()
        init = init.detach().clone()
        if learnable:
            self.embed = nn.Parameter(init)
        else:
            self.register_buffer("embed", init)
        self.register_buffer("initted", torch.tensor(initted))
        self.register_buffer("cluster_size", torch.ones(init.shape[:2]))
        self.register_buffer("embed_avg", init.float().clone())
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)
        self.register_buffer("dead_codes", torch.zeros((), dtype=torch.int64), persistent=False)
        self._initted = initted

    def states(self) -> list[CodebookState]:
        """Per codebook, views of its codes and EMA buffers (updated in place by the updater)."""
        books = range(self.embed.shape[0])
        return [CodebookState(self.embed[b], self.cluster_size[b], self.embed_avg[b]) for b in books]

    def mark_initted(self) -> None:
        """Record that the codes have been initialised (buffer and Python mirror)."""
        self.initted.fill_(True)
        self._initted = True

    def record_usage_(self, usages: list[CodeUsage]) -> None:
        """Write a forward's telemetry: perplexity and used fraction averaged over the codebooks,
        dead codes summed."""
        self.perplexity.copy_(torch.stack([u.perplexity for u in usages]).mean())
        self.codes_used_fraction.copy_(torch.stack([u.used_fraction for u in usages]).mean())
        self.dead_codes.copy_(torch.stack([u.dead for u in usages]).sum())

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() would round the EMA accumulators to 8 or 11 bits, after which small
        # (1 - decay) updates vanish and the EMA freezes: they follow the device, never the dtype.
        before = {name: self._buffers[name] for name in FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)


def resolve_training_mode(
    ema_update: bool | None, learnable_codebook: bool | None, codebook_weight: float | None, commitment_weight: float
) -> tuple[bool, bool, float]:
    """(ema_update, learnable_codebook, codebook_weight) with vector-quantize-pytorch's defaults.

    ``ema_update`` defaults to True (False when ``learnable_codebook=True`` is asked for, where the
    peer would fail), ``learnable_codebook`` to False. Neither (ema_update=False alone) is the
    peer's frozen codebook (only dead-code revival, if any, changes it). ``codebook_weight``, the
    weight of mean((sg(z) - e)^2), defaults as the peer's single loss mean((z - e)^2) *
    commitment_weight implies: ``commitment_weight`` for a learnable codebook, else 0.

    Raises:
        ValueError: a combination that would train the codes twice (EMA and gradient), or a
        codebook weight on a codebook that has no gradient.
    """
    if learnable_codebook is None:
        learnable_codebook = False
    if ema_update is None:
        ema_update = not learnable_codebook
    if ema_update and learnable_codebook:
        raise ValueError(
            "ema_update=True updates the codebook itself: it cannot be combined with learnable_codebook=True"
        )
    if not learnable_codebook and codebook_weight:
        raise ValueError(
            f"codebook_weight must be 0 (or None) without learnable_codebook=True, got {codebook_weight}"
        )
    if codebook_weight is None:
        codebook_weight = commitment_weight if learnable_codebook else 0.0
    return bool(ema_update), bool(learnable_codebook), codebook_weight


def rows_per_book(t: Tensor, books: int) -> list[Tensor]:
    """Per codebook, its rows of ``t`` (..., H, C): ``books`` tensors (M, C).

    ``books == 1``: one codebook shared by the heads, so every head's rows (M = rows * H);
    otherwise ``books == H``, one codebook per head and its head's rows.
    """
    if books == 1:
        return [t.reshape(-1, t.shape[-1])]
    return [t[..., h, :].reshape(-1, t.shape[-1]) for h in range(books)]


def kmeans_init_books_(book: Codebook, updater: CodebookUpdater, z: Tensor) -> None:
    """k-means on the first training batch ``z`` (..., H, D) (detached), one run per codebook of ``book``."""
    states = book.states()
    for state, rows in zip(states, rows_per_book(z, len(states)), strict=True):
        updater.kmeans_init_(state, rows)
    book.mark_initted()


def update_books_(book: Codebook, updater: CodebookUpdater, z: Tensor, idx: Tensor) -> None:
    """EMA / dead-code revival / telemetry of every codebook of ``book`` from one training batch.

    Args:
        z: (..., H, D) the batch's (detached) rows. idx: (..., H) int64 their codes.
    """
    states = book.states()
    codes = [c.reshape(-1) for c in rows_per_book(idx.unsqueeze(-1), len(states))]  # (M,) per book
    batches = zip(states, rows_per_book(z, len(states)), codes, strict=True)
    book.record_usage_([updater.update_(state, rows, c) for state, rows, c in batches])


CODEBOOK_INITS = ("kaiming_uniform", "normal")


def initial_codes(shape: tuple[int, int, int], init: str, kmeans_init: bool, use_cosine_sim: bool) -> Tensor:
    """The starting codes, a (books, K, D) float32 tensor (random draws from torch's global RNG).

    ``init="normal"``: standard normal (drawn even with ``kmeans_init``, then overwritten by the
    k-means, as fastvq always did, so the RNG stream is unchanged). Otherwise the peer's: zeros with
    ``kmeans_init`` (until the first training batch), else kaiming-uniform over the whole tensor
    (bound sqrt(6 / (K D))). Random codes are l2-normalised along D with ``use_cosine_sim``.

    Raises:
        ValueError: ``init`` not one of ``CODEBOOK_INITS``.
    """
    if init not in CODEBOOK_INITS:
        raise ValueError(f"codebook_init must be 'kaiming_uniform' or 'normal', got {init!r}")
    if init == "normal":
        codes = torch.randn(shape)
    elif kmeans_init:
        return torch.zeros(shape)
    else:
        codes = nn.init.kaiming_uniform_(torch.empty(shape))
    return F.normalize(codes, dim=-1) if use_cosine_sim else codes


@dataclass(frozen=True)
class CodebookUpdater:
    """How a codebook changes in training forwards: the hyper-parameters, applied to given tensors.

    A plain frozen object, not an nn.Module: it owns no tensors (the quantizer does, see the
    module docstring), so checkpoints keep their keys, a Parameter shared between quantizers stays
    one Parameter, and ``torch.compile`` sees constants. One updater serves any number of codebooks.

    Args:
        codebook_size: K.
        ema_update: move the codes to the EMA of their assigned rows (else only usage is tracked).
        decay, eps: EMA decay in [0, 1) and Laplace smoothing > 0.
        threshold_ema_dead_code: codes whose usage EMA falls below this are replaced by random
            rows of the batch (0 = never).
        kmeans_iters: Lloyd steps of the k-means initialisation (int >= 0).
        use_cosine_sim: codes live on the unit sphere (k-means is spherical, updates re-normalise).
        backend: "auto" | "triton" | "torch" for the statistics and k-means ops.

    Under torch.distributed (initialised, > 1 rank) batch statistics are summed over ranks,
    k-means runs on the gathered rows and rank 0's result is broadcast, and dead codes are replaced
    by rank 0's rows: ranks never diverge. Every rank must make the same calls (collectives).

    Raises:
        ValueError: a value out of its range (in construction).
    """

    codebook_size: int
    ema_update: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    threshold_ema_dead_code: float = 0.0
    kmeans_iters: int = 10
    use_cosine_sim: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        positive_int(self.codebook_size, "codebook_size")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        nonnegative_int(self.kmeans_iters, "kmeans_iters")
        if self.threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {self.threshold_ema_dead_code}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def changes_codes(self) -> bool:
        """Whether ``update_`` writes the codes (so a forward must not hand them to autograd as is)."""
        return self.ema_update or self.threshold_ema_dead_code > 0

    def _normalized(self, codes: Tensor) -> Tensor:
        return F.normalize(codes, dim=-1) if self.use_cosine_sim else codes

    @torch.no_grad()
    def kmeans_init_(self, state: CodebookState, rows: Tensor) -> None:
        """Set the codes to the k-means centroids of ``rows`` (N, D), gathered over ranks; the EMA
        restarts from the clusters (count = cluster size, at least 1; sum = centroid x count)."""
        rows = all_gather_rows(rows.detach().float().contiguous())
        metric = "cosine" if self.use_cosine_sim else "l2"
        centroids, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, metric, backend=self.backend)
        broadcast_(centroids)
        counts = broadcast_(counts).clamp_min(1.0)  # an empty cluster keeps its centroid as a code
        state.codes.copy_(centroids.to(state.codes.dtype))
        state.ema_sum.copy_(centroids * counts[:, None])
        state.ema_count.copy_(counts)

    @torch.no_grad()
    def update_(self, state: CodebookState, rows: Tensor, codes: Tensor) -> CodeUsage:
        """One training step of one codebook: usage EMA, code EMA, dead-code revival.

        Args:
            state: the codebook's tensors, updated in place.
            rows: (N, D) the (detached) vectors that were quantized. codes: (N,) int64, their indices.

        Returns:
            CodeUsage of this batch (summed over ranks).
        """
        if self.ema_update:
            counts, sums = code_stats(rows, codes, self.codebook_size, backend=self.backend)
            synced_batch_stats(counts, sums)
        else:  # a gradient-trained codebook needs usage counts only: O(N), no (K, D) all-reduce
            counts, sums = metrics.code_counts(codes, self.codebook_size), None
            synced_batch_stats(counts)
        usage_perplexity, used = metrics.perplexity(counts), metrics.used_fraction(counts)

        ema_inplace_(state.ema_count, counts, self.decay)
        if self.ema_update:
            ema_inplace_(state.ema_sum, sums, self.decay)
            smoothed = laplace_smoothed(state.ema_count, self.eps)
            state.codes.copy_(self._normalized(state.ema_sum / smoothed[:, None]).to(state.codes.dtype))
        if self.threshold_ema_dead_code > 0:
            ema_sum = state.ema_sum if self.ema_update else None
            revived = revive_dead_codes_(state.codes, state.ema_count, ema_sum, rows, self.threshold_ema_dead_code)
            if self.use_cosine_sim:
                state.codes.copy_(F.normalize(state.codes, dim=-1))
            dead = revived.sum()
        else:  # no revival: report codes whose usage EMA has all but vanished
            dead = (state.ema_count < 1e-3).sum()
        return CodeUsage(usage_perplexity, used, dead)
