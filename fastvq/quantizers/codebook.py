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

vector-quantize-pytorch's codebook-update controls, with its meaning:
- a per-code weight w (the peer's ``ema_update_weight``): both EMAs become
  N_k <- N_k + (1 - decay) w_k (n_k - N_k) (the peer's ``lerp(new, (1 - decay) * w)``);
- ``accumulate`` (the peer's ``accum_ema_update``): n_k and s_k are added to accumulators and
  nothing else changes; the next plain update uses its own batch's statistics plus the
  accumulated ones, then clears them (the peer keeps them in the buffers' ``.grad``; fastvq in
  non-persistent fp32 buffers, so state_dict keys are unchanged);
- ``manual_ema_update``: the EMAs are tracked but the codes are written only by
  ``Codebook.update_ema()``; dead-code revival still runs every step (``expire_codes_`` alone
  runs only the revival);
- ``sync=False`` (the peer's ``sync_codebook=False``): no collective at all, each rank keeps its
  own codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import metrics
from fastvq.checks import check_float_tensor, nonnegative_int, positive_int
from fastvq.distributed import all_gather_rows, all_reduce_sum_, broadcast_
from fastvq.functional import BACKENDS, code_stats
from fastvq.quantizers.kmeans import kmeans

# EMA state and accumulators that stay float32 whatever the module's dtype (Codebook._apply).
FP32_BUFFERS = ("cluster_size", "embed_avg", "cluster_size_accum", "embed_avg_accum")

# The peer's ema_update_weight: None, a number, a (K,) / (books, K) tensor, or a callable
# (embed_sum (books, K, D), cluster_size (books, K)) -> such a tensor.
EmaWeight = float | Tensor | Callable[[Tensor, Tensor], Tensor] | None


def ema_inplace_(average: Tensor, new: Tensor, decay: float, weight: Tensor | None = None) -> None:
    """average <- average + (1 - decay) * weight * (new - average), in place.

    Args:
        average: (K, ...) float32 EMA. new: same shape, this step's value.
        decay: in [0, 1). weight: None (1 everywhere), or a float32 tensor 0-d or (K,) per code,
            broadcast over ``average``'s trailing axes.
    """
    if weight is None:  # the historical form: bitwise as before
        average.mul_(decay).add_(new, alpha=1.0 - decay)
        return
    rate = (1.0 - decay) * weight
    average.lerp_(new, rate.reshape(rate.shape + (1,) * (average.ndim - rate.ndim)))


def ema_codes(ema_count: Tensor, ema_sum: Tensor, eps: float, use_cosine_sim: bool) -> Tensor:
    """The codes the EMA statistics give: ``ema_sum / laplace_smoothed(ema_count)``.

    Args:
        ema_count: (..., K) float usage EMA. ema_sum: (..., K, D) float EMA of the rows' sums.
        eps: Laplace smoothing > 0. use_cosine_sim: l2-normalise the codes along D.

    Returns:
        (..., K, D) codes in ``ema_sum``'s dtype.
    """
    codes = ema_sum / laplace_smoothed(ema_count, eps).unsqueeze(-1)
    return F.normalize(codes, dim=-1) if use_cosine_sim else codes


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """Counts (..., K) with Laplace smoothing along the last axis; same total as ``counts``."""
    total = counts.sum(dim=-1, keepdim=True)
    return (counts + eps) / (total + counts.shape[-1] * eps) * total


def synced_batch_stats(*stats: Tensor) -> None:
    """Sum per-code statistics (counts (K,), sums (K, D)) over ranks in place; no-op in one process."""
    all_reduce_sum_(*stats)


def revive_dead_codes_(
    codebook: Tensor, ema_count: Tensor, ema_sum: Tensor | None, batch: Tensor, threshold: float, *, sync: bool = True
) -> Tensor:
    """Replace codes whose EMA count is below ``threshold`` by random rows of ``batch``.

    Args:
        codebook: (K, D) updated in place. ema_count: (K,) updated in place (revived codes restart
            at ``threshold``). ema_sum: (K, D) or None, kept consistent with the new codes.
        batch: (N, D) rows of the current batch (N >= 0).
        sync: under torch.distributed, draw the candidates on rank 0 and broadcast them, so every
            rank replaces the same codes with the same vectors (False: each rank draws its own).

    Returns:
        dead: (K,) bool, the codes that were replaced.
    """
    num_codes = codebook.shape[0]
    dead = ema_count < threshold  # (K,)
    if batch.shape[0] > 0:  # a static shape: no host sync
        pick = torch.randint(0, batch.shape[0], (num_codes,), device=batch.device)
        candidates = batch[pick].to(codebook.dtype).contiguous()  # (K, D)
    else:  # an empty batch on this rank: rank 0's broadcast decides (or nothing changes)
        candidates = codebook.clone()
    if sync:
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
    count_accum: Tensor | None = None  # (K,) float32 counts of accumulating steps not yet applied
    sum_accum: Tensor | None = None  # (K, D) float32 their sums (with ema_update only)


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
    (``perplexity``, ``codes_used_fraction``, ``dead_codes``, 0-d) and the accumulators of
    ``accumulate=True`` steps (``cluster_size_accum`` (books, K), ``embed_avg_accum``
    (books, K, D), fp32) are not saved.

    Args:
        init: (books, K, D) the initial codes.
        learnable: register ``embed`` as a Parameter (gradient-trained) or a buffer.
        initted: False when the first training batch is still to initialise the codes (k-means).
        updater: the quantizer's hyper-parameters, kept as a plain attribute (not a submodule);
            ``update_ema`` needs its ``eps`` and ``use_cosine_sim``.

    Raises:
        TypeError: ``updater`` neither None nor a CodebookUpdater.
    """

    def __init__(
        self, init: Tensor, *, learnable: bool, initted: bool, updater: CodebookUpdater | None = None
    ) -> None:
        super().__init__()
        if updater is not None and not isinstance(updater, CodebookUpdater):
            raise TypeError(f"updater must be a CodebookUpdater or None, got {type(updater).__name__}")
        self.updater = updater
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
        # Always allocated (not on first use) so a compiled step sees a fixed set of buffers.
        self.register_buffer("cluster_size_accum", torch.zeros(init.shape[:2]), persistent=False)
        self.register_buffer("embed_avg_accum", torch.zeros(init.shape, dtype=torch.float32), persistent=False)
        self._initted = initted

    def states(self) -> list[CodebookState]:
        """Per codebook, views of its codes, EMA buffers and accumulators (updated in place)."""
        return [
            CodebookState(self.embed[b], self.cluster_size[b], self.embed_avg[b],
                          self.cluster_size_accum[b], self.embed_avg_accum[b])
            for b in range(self.embed.shape[0])
        ]

    @torch.no_grad()
    def update_ema(self) -> None:
        """Write every codebook's codes from its EMA statistics (the peer's ``update_ema``).

        codes <- embed_avg / laplace_smoothed(cluster_size) (l2-normalised with use_cosine_sim).
        With ``manual_ema_update=True`` training forwards only track the statistics and this call
        moves the codes; call it after ``backward()`` (it writes the codes in place, which the
        forward's autograd graph may have saved).

        Raises:
            RuntimeError: the Codebook was built without ``updater``.
        """
        if self.updater is None:
            raise RuntimeError(
                "Codebook.update_ema() needs eps and use_cosine_sim: "
                "build the Codebook with updater=CodebookUpdater(...)"
            )
        codes = ema_codes(self.cluster_size, self.embed_avg, self.updater.eps, self.updater.use_cosine_sim)
        self.embed.copy_(codes.to(self.embed.dtype))

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


def per_book_weights(weight: Tensor | float | None, books: int, num_codes: int, device: torch.device) -> list:
    """Split an EMA weight into one per codebook: ``books`` float32 tensors (K,) or 0-d, or Nones.

    Args:
        weight: None, a number, or a tensor (K,) (every codebook) or (books, K).

    Raises:
        TypeError: ``weight`` of another type (a bool included). ValueError: another shape.
    """
    if weight is None:
        return [None] * books
    if isinstance(weight, bool) or not isinstance(weight, (Tensor, int, float)):
        raise TypeError(
            f"ema_update_weight must be None, a number, a tensor or a callable, got {type(weight).__name__}"
        )
    if not isinstance(weight, Tensor):
        return [torch.tensor(float(weight), device=device)] * books
    if tuple(weight.shape) not in ((num_codes,), (books, num_codes)):
        raise ValueError(
            f"ema_update_weight must have shape ({num_codes},) or ({books}, {num_codes}), got {tuple(weight.shape)}"
        )
    weight = weight.detach().to(device=device, dtype=torch.float32)
    return [weight] * books if weight.ndim == 1 else list(weight.unbind(0))


def update_books_(
    book: Codebook,
    updater: CodebookUpdater,
    z: Tensor,
    idx: Tensor,
    *,
    weight: EmaWeight = None,
    accumulate: bool = False,
) -> None:
    """EMA / dead-code revival / telemetry of every codebook of ``book`` from one training batch.

    Args:
        z: (..., H, D) the batch's (detached) rows. idx: (..., H) int64 their codes.
        weight: the peer's ``ema_update_weight``: None; a number or a tensor (K,) or (books, K)
            that multiplies (1 - decay) per code in both EMAs; or a callable
            ``(embed_sum (books, K, D), cluster_size (books, K)) -> such a tensor``, given this
            batch's statistics (summed over ranks, before any accumulated ones are added).
        accumulate: the peer's ``accum_ema_update``: only add this batch's statistics to the
            accumulators (no EMA, no code write, no revival); the next plain update applies them.
            Telemetry is recorded either way.

    Raises:
        TypeError / ValueError: a ``weight`` (or a callable's result) of another type or shape.
    """
    states = book.states()
    rows = rows_per_book(z, len(states))
    codes = [c.reshape(-1) for c in rows_per_book(idx.unsqueeze(-1), len(states))]  # (M,) per book
    weighted_by_stats = callable(weight) and not isinstance(weight, Tensor)
    with torch.no_grad():
        stats = [updater.batch_stats_(r, c, with_sums=updater.ema_update or weighted_by_stats)
                 for r, c in zip(rows, codes, strict=True)]
        if weighted_by_stats:
            counts = torch.stack([n for n, _ in stats])  # (books, K)
            sums = torch.stack([s for _, s in stats])  # (books, K, D)
            weight = weight(sums, counts)
        weights = per_book_weights(weight, len(states), updater.codebook_size, z.device)
        usages = [
            updater.apply_(state, r, n, s, weight=w, accumulate=accumulate)
            for state, r, (n, s), w in zip(states, rows, stats, weights, strict=True)
        ]
    book.record_usage_(usages)


def expire_codes_(book: Codebook, updater: CodebookUpdater, z: Tensor) -> Tensor:
    """Dead-code revival alone (the peer's ``expire_codes_``): every code of ``book`` whose usage
    EMA is below ``threshold_ema_dead_code`` is replaced by a random row of ``z``.

    Args:
        z: (..., H, D) float rows (detached), as for ``update_books_``.

    Returns:
        (books, K) bool, the codes that were replaced (none when ``threshold_ema_dead_code == 0``).

    Raises:
        TypeError / ValueError: ``z`` not a float tensor (..., H, D) with the codebook's D.
    """
    check_float_tensor(z, "z", min_dim=2)
    books, num_codes, dim = book.embed.shape
    if z.shape[-1] != dim or (books > 1 and z.shape[-2] != books):
        raise ValueError(f"z must have shape (..., H, {dim}) with H = {books} codebooks or one shared, "
                         f"got {tuple(z.shape)}")
    if updater.threshold_ema_dead_code == 0:
        return torch.zeros(books, num_codes, dtype=torch.bool, device=book.embed.device)
    with torch.no_grad():
        rows = rows_per_book(z.detach(), books)
        return torch.stack([updater.revive_(state, r) for state, r in zip(book.states(), rows, strict=True)])


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
        manual_ema_update: with ema_update, track the EMA statistics every step but write the
            codes only in ``Codebook.update_ema()`` (dead-code revival still runs every step).
        sync: None or True: under torch.distributed (initialised, > 1 rank) batch statistics are
            summed over ranks, k-means runs on the gathered rows and rank 0's result is broadcast,
            and dead codes are replaced by rank 0's rows: ranks never diverge. Every rank must then
            make the same calls (collectives). False (the peer's ``sync_codebook=False``): no
            collective at all, each rank updates its own codebook from its own rows.
        sync_kmeans: False (the peer's): each rank's k-means runs on its own rows only (ranks start
            from different codes even when their statistics are synced afterwards).

    Raises:
        ValueError: a value out of its range. TypeError: ``manual_ema_update`` not a bool,
        ``sync`` neither None nor a bool (in construction).
    """

    codebook_size: int
    ema_update: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    threshold_ema_dead_code: float = 0.0
    kmeans_iters: int = 10
    use_cosine_sim: bool = False
    backend: str = "auto"
    manual_ema_update: bool = False
    sync: bool | None = None
    sync_kmeans: bool = True

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
        if not isinstance(self.manual_ema_update, bool):
            raise TypeError(f"manual_ema_update must be a bool, got {self.manual_ema_update!r}")
        if self.sync is not None and not isinstance(self.sync, bool):
            raise TypeError(f"sync must be None or a bool, got {self.sync!r}")

    @property
    def changes_codes(self) -> bool:
        """Whether ``update_`` writes the codes (so a forward must not hand them to autograd as is)."""
        return (self.ema_update and not self.manual_ema_update) or self.threshold_ema_dead_code > 0

    @property
    def syncs(self) -> bool:
        """Whether the updates use collectives (they are no-ops anyway without > 1 rank)."""
        return self.sync is not False

    @torch.no_grad()
    def kmeans_init_(self, state: CodebookState, rows: Tensor) -> None:
        """Set the codes to the k-means centroids of ``rows`` (N, D), gathered over ranks; the EMA
        restarts from the clusters (count = cluster size, at least 1; sum = centroid x count)."""
        rows = rows.detach().float().contiguous()
        together = self.syncs and self.sync_kmeans  # sync_kmeans=False: each rank clusters its own rows
        if together:
            rows = all_gather_rows(rows)
        metric = "cosine" if self.use_cosine_sim else "l2"
        centroids, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, metric, backend=self.backend)
        if together:
            broadcast_(centroids)
            broadcast_(counts)
        counts = counts.clamp_min(1.0)  # an empty cluster keeps its centroid as a code
        state.codes.copy_(centroids.to(state.codes.dtype))
        state.ema_sum.copy_(centroids * counts[:, None])
        state.ema_count.copy_(counts)

    @torch.no_grad()
    def update_(
        self, state: CodebookState, rows: Tensor, codes: Tensor, *, weight: Tensor | None = None,
        accumulate: bool = False,
    ) -> CodeUsage:
        """One training step of one codebook: usage EMA, code EMA, dead-code revival.

        Args:
            state: the codebook's tensors, updated in place.
            rows: (N, D) the (detached) vectors that were quantized. codes: (N,) int64, their indices.
            weight, accumulate: as in ``apply_``.

        Returns:
            CodeUsage of this batch (summed over ranks).
        """
        counts, sums = self.batch_stats_(rows, codes, with_sums=self.ema_update)
        return self.apply_(state, rows, counts, sums, weight=weight, accumulate=accumulate)

    @torch.no_grad()
    def batch_stats_(self, rows: Tensor, codes: Tensor, *, with_sums: bool) -> tuple[Tensor, Tensor | None]:
        """This batch's per-code statistics of one codebook, summed over ranks (with ``sync``).

        Args:
            rows: (N, D) float. codes: (N,) int64 in [0, K). with_sums: also the rows' sums.

        Returns:
            counts (K,) float32 and sums (K, D) float32, or None without ``with_sums``.
        """
        if with_sums:
            counts, sums = code_stats(rows, codes, self.codebook_size, backend=self.backend)
        else:  # a gradient-trained codebook needs usage counts only: O(N), no (K, D) all-reduce
            counts, sums = metrics.code_counts(codes, self.codebook_size), None
        if self.syncs:
            synced_batch_stats(*(t for t in (counts, sums) if t is not None))
        return counts, sums

    @torch.no_grad()
    def apply_(
        self, state: CodebookState, rows: Tensor, counts: Tensor, sums: Tensor | None, *,
        weight: Tensor | None = None, accumulate: bool = False,
    ) -> CodeUsage:
        """Apply one batch's statistics (from ``batch_stats_``) to one codebook.

        Args:
            state: the codebook's tensors, updated in place. rows: (N, D) the batch's rows (revival).
            counts: (K,) float32. sums: (K, D) float32 (required with ema_update) or None.
            weight: None, or a float32 tensor 0-d or (K,) multiplying (1 - decay) per code in both EMAs.
            accumulate: only add counts / sums to the state's accumulators; the next plain call adds
                them to its own statistics before the EMA and clears them.

        Returns:
            CodeUsage of this batch: perplexity and used fraction of ``counts``; dead = codes revived
            now (none while accumulating), or without revival the codes whose usage EMA has vanished.

        Raises:
            ValueError: ``accumulate`` on a state without accumulators, or ema_update without sums.
        """
        track_sums = self.ema_update  # the sums EMA is tracked only when the codes follow it
        if track_sums and sums is None:
            raise ValueError("sums is required when ema_update=True")
        usage_perplexity, used = metrics.perplexity(counts), metrics.used_fraction(counts)
        revives = self.threshold_ema_dead_code > 0
        if accumulate:
            if state.count_accum is None or (track_sums and state.sum_accum is None):
                raise ValueError("accumulate=True needs a CodebookState with accumulators (from Codebook.states())")
            state.count_accum.add_(counts)
            if track_sums:
                state.sum_accum.add_(sums)
            dead = torch.zeros((), dtype=torch.int64, device=counts.device) if revives else self._vanished(state)
            return CodeUsage(usage_perplexity, used, dead)

        # Adding the accumulators unconditionally (zeros when nothing was accumulated) keeps the
        # step free of a host-side branch on their values.
        if state.count_accum is not None:
            counts = counts + state.count_accum
            state.count_accum.zero_()
        if track_sums and state.sum_accum is not None:
            sums = sums + state.sum_accum
            state.sum_accum.zero_()
        ema_inplace_(state.ema_count, counts, self.decay, weight)
        if track_sums:
            ema_inplace_(state.ema_sum, sums, self.decay, weight)
            if not self.manual_ema_update:
                codes = ema_codes(state.ema_count, state.ema_sum, self.eps, self.use_cosine_sim)
                state.codes.copy_(codes.to(state.codes.dtype))
        dead = self.revive_(state, rows).sum() if revives else self._vanished(state)
        return CodeUsage(usage_perplexity, used, dead)

    @staticmethod
    def _vanished(state: CodebookState) -> Tensor:
        """Codes whose usage EMA has all but vanished (the dead-code report without revival)."""
        return (state.ema_count < 1e-3).sum()

    @torch.no_grad()
    def revive_(self, state: CodebookState, rows: Tensor) -> Tensor:
        """Dead-code revival of one codebook from ``rows`` (N, D); returns the (K,) bool mask of the
        replaced codes (all False when ``threshold_ema_dead_code == 0``)."""
        if self.threshold_ema_dead_code == 0:
            return torch.zeros(state.codes.shape[0], dtype=torch.bool, device=state.codes.device)
        ema_sum = state.ema_sum if self.ema_update else None
        revived = revive_dead_codes_(
            state.codes, state.ema_count, ema_sum, rows, self.threshold_ema_dead_code, sync=self.syncs
        )
        if self.use_cosine_sim:
            state.codes.copy_(F.normalize(state.codes, dim=-1))
        return revived
