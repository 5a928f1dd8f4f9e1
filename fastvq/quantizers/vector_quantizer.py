"""VectorQuantizer: the drop-in nn.Module (keyword names follow vector-quantize-pytorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import metrics
from fastvq.checks import check_float_tensor, check_weight
from fastvq.distributed import all_gather_rows, broadcast_
from fastvq.functional import BACKENDS, code_stats, vector_quantize
from fastvq.quantizers import codebook_ema
from fastvq.quantizers.kmeans import kmeans
from fastvq.quantizers.layout import from_channel_last, resolve_channel_last, to_channel_last
from fastvq.quantizers.output import QuantizerOutput


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def rotate_to(z: Tensor, e: Tensor) -> Tensor:
    """The rotation trick (Fifty et al. 2024): e's value in forward, a rotation-scaling of the
    gradient in backward.

    f(z) = s R z with s = ||e|| / ||z|| and R the rotation taking z^ to e^, both held constant
    (Householder form R = I - 2 r r^T + 2 e^ z^T, r = (z^ + e^) / ||z^ + e^||). Forward returns
    e + (f(z) - sg(f(z))), which is e bitwise; backward gives dz = s R^T dq instead of the
    straight-through dz = dq, so the gradient keeps the angle between z and its code.
    """
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        e_norm = e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u, q = z / z_norm, e / e_norm
        r = F.normalize(u + q, dim=-1, eps=1e-12)
        scale = e_norm / z_norm
    rz = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * q * (u * z).sum(-1, keepdim=True)
    f = scale * rz
    return e.detach() + (f - f.detach())


class VectorQuantizer(nn.Module):
    """Vector quantizer with the VQ-VAE losses, a gradient- or EMA-trained codebook.

    Args:
        dim: feature size of the input.
        codebook_size: number of codes K.
        codebook_dim: size of each code (per head); the input is projected in (Linear
            dim -> heads * codebook_dim) and out again when that differs from ``dim``.
            Default: dim // heads.
        heads: split each vector into ``heads`` sub-vectors quantized separately; indices gain a
            trailing heads axis when heads > 1. Default 1.
        separate_codebook_per_head: one codebook per head instead of one shared. Default False.
        commitment_weight: beta of the VQ-VAE paper (weight of mean((z - sg(e))^2)). Default 0.25.
        codebook_weight: weight of mean((sg(z) - e)^2). Default 1.0, and 0 with ``ema_update``
            (where a non-zero value is a ValueError: the EMA, not a gradient, moves the codes).
        ema_update: update codes as EMAs of the assigned vectors (not by gradient). Default False.
        decay, eps: EMA decay (default 0.99, the paper's) and Laplace smoothing (default 1e-5).
        learnable_codebook: train codes by gradient. Default: ``not ema_update``.
        kmeans_init: the first training batch initialises the codebook by k-means (k-means++ seeds,
            ``kmeans_iters`` Lloyd steps, default 10).
        threshold_ema_dead_code: codes whose EMA usage count falls below this are replaced by
            random vectors of the current batch (0 = never). Works with both codebook modes.
        use_cosine_sim: l2-normalise inputs and codes (distances are then cosine distances).
        rotation_trick: pass gradients through the rotation trick instead of straight-through.
        channel_last: features on the last axis, (B, ..., dim). False: features on axis 1,
            (B, dim, ...). Default: True, or False when ``accept_image_fmap``.
        accept_image_fmap: input is a (B, dim, H, W) feature map; indices are (B, H, W).
        backend: "auto" | "triton" | "torch" (see fastvq.functional).

    Under torch.distributed (initialised, > 1 rank) EMA statistics and usage counts are summed
    over ranks, k-means runs on the gathered first batch and rank 0's result is broadcast, and dead
    codes are replaced by rank 0's vectors on every rank: ranks never diverge. Every rank must
    run every training forward (they are collectives).

    Telemetry buffers, refreshed by training forwards from the indices already at hand:
    ``perplexity`` and ``codes_used_fraction`` of the batch, ``dead_codes`` (codes revived in
    this forward, or with a vanished usage EMA when there is no threshold), ``ema_count`` (K,)
    usage EMA (kept in fp32 whatever the module's dtype, as is ``ema_sum``).

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float | None = None,
        ema_update: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        learnable_codebook: bool | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        use_cosine_sim: bool = False,
        rotation_trick: bool = False,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.codebook_size = _positive_int(codebook_size, "codebook_size")
        self.heads = _positive_int(heads, "heads")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when codebook_dim is not given")
            codebook_dim = dim // heads
        self.codebook_dim = _positive_int(codebook_dim, "codebook_dim")
        if learnable_codebook is None:
            learnable_codebook = not ema_update
        if ema_update and learnable_codebook:
            raise ValueError(
                "ema_update=True updates the codebook itself: it cannot be combined with learnable_codebook=True"
            )
        if not ema_update and not learnable_codebook:
            raise ValueError("learnable_codebook=False needs ema_update=True, or the codebook would never be trained")
        if ema_update and codebook_weight:
            raise ValueError(f"codebook_weight must be 0 (or None) with ema_update=True, got {codebook_weight}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
        if codebook_weight is None:
            codebook_weight = 0.0 if ema_update else 1.0
        self.codebook_weight = check_weight(codebook_weight, "codebook_weight")
        self.ema_update = ema_update
        self.decay, self.eps = float(decay), float(eps)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.use_cosine_sim, self.rotation_trick = use_cosine_sim, rotation_trick
        self.separate_codebook_per_head = separate_codebook_per_head
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)
        self.backend = backend

        inner = heads * codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        num_books = heads if separate_codebook_per_head else 1
        shape = (codebook_size, codebook_dim)
        if separate_codebook_per_head:
            shape = (num_books, *shape)
        # Standard-normal init like vector-quantize-pytorch; VQ-VAE's U(-1/K, 1/K) starts every
        # code at the origin, far from typical encoder outputs, and most codes then never win.
        init = torch.randn(shape)
        if use_cosine_sim:
            init = F.normalize(init, dim=-1)
        self.embed = nn.Parameter(init, requires_grad=learnable_codebook)
        # Every code starts as if seen once at its initial value (count 1, sum = code): the EMA
        # ratio sum / count then equals the code from the first step on, used or not.
        self.register_buffer("ema_count", torch.ones(num_books, codebook_size))
        self.register_buffer("ema_sum", init.reshape(num_books, codebook_size, codebook_dim).clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._initted = not kmeans_init  # Python mirror: no host sync per forward to read it
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)
        self.register_buffer("dead_codes", torch.zeros((), dtype=torch.int64), persistent=False)

    # -- codebook views ---------------------------------------------------------------------------

    def _books(self) -> Tensor:
        """(num_books, K, codebook_dim) view of the codebook parameter."""
        return self.embed.view(-1, self.codebook_size, self.codebook_dim)

    @property
    def codebook(self) -> Tensor:
        """The codes as they appear in the output: (codebook_size, dim) with one head;
        (codebook_size, codebook_dim) for heads sharing one codebook; (heads, codebook_size,
        codebook_dim) with separate_codebook_per_head (no projection applies with heads > 1)."""
        books = self._books()
        if self.use_cosine_sim:
            books = F.normalize(books, dim=-1)
        if self.heads == 1:
            return self.project_out(books[0])
        return books if self.separate_codebook_per_head else books[0]

    # -- layouts ----------------------------------------------------------------------------------

    def _to_channel_last(self, z: Tensor) -> Tensor:
        return to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap)

    def _from_channel_last(self, out: Tensor) -> Tensor:
        return from_channel_last(out, self.channel_last)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts. Returns QuantizerOutput."""
        check_float_tensor(z, "z", min_dim=2)
        z = self.project_in(self._to_channel_last(z))  # (B, ..., heads * codebook_dim)
        lead = z.shape[:-1]
        z = z.reshape(*lead, self.heads, self.codebook_dim)  # (B, ..., H, cd)
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        if self.training and not self._initted:
            self._kmeans_init(z)

        books = self._books()
        updates_codebook = self.training and (self.ema_update or self.threshold_ema_dead_code > 0)
        # The op saves the codebook for backward; codes updated in place below must not be that tensor.
        op_books = books.clone() if updates_codebook else books
        if self.use_cosine_sim:
            op_books = F.normalize(op_books, dim=-1)

        if self.separate_codebook_per_head:
            rows = [z[..., h, :] for h in range(self.heads)]  # heads x (B, ..., cd)
        else:
            rows = [z]  # (B, ..., H, cd): all heads share codebook 0
        zq_parts, idx_parts, losses = [], [], []
        for book, x in enumerate(rows):
            zq, idx, loss = vector_quantize(
                x, op_books[book], self.commitment_weight, self.codebook_weight, self.backend
            )
            zq_parts.append(zq)
            idx_parts.append(idx)
            losses.append(loss)
        if self.separate_codebook_per_head:
            zq, idx = torch.stack(zq_parts, dim=-2), torch.stack(idx_parts, dim=-1)  # (B, ..., H, cd), (B, ..., H)
        else:
            zq, idx = zq_parts[0], idx_parts[0]
        loss = torch.stack(losses).mean()  # every codebook sees the same number of elements
        if self.rotation_trick:
            zq = rotate_to(z, zq)

        if self.training:
            self._update_codebook(z.detach(), idx)
        zq = self.project_out(zq.reshape(*lead, self.heads * self.codebook_dim))
        if self.heads == 1:
            idx = idx.squeeze(-1)
        return QuantizerOutput(self._from_channel_last(zq), idx, loss)

    # -- training-time state ----------------------------------------------------------------------

    def _rows_per_book(self, z: Tensor, idx: Tensor | None = None):
        """Yield (book, rows (M, cd), indices (M,) or None) for every codebook."""
        if self.separate_codebook_per_head:
            for h in range(self.heads):
                yield h, z[..., h, :].reshape(-1, self.codebook_dim), None if idx is None else idx[..., h].reshape(-1)
        else:
            yield 0, z.reshape(-1, self.codebook_dim), None if idx is None else idx.reshape(-1)

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        metric = "cosine" if self.use_cosine_sim else "l2"
        books = self._books()
        for book, rows, _ in self._rows_per_book(z.detach()):
            rows = all_gather_rows(rows.float().contiguous())
            centroids, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, metric, backend=self.backend)
            broadcast_(centroids)
            counts = broadcast_(counts).clamp_min(1.0)  # an empty cluster keeps its centroid as a code
            books[book].copy_(centroids.to(books.dtype))
            self.ema_sum[book].copy_(centroids * counts[:, None])
            self.ema_count[book].copy_(counts)
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def _update_codebook(self, z: Tensor, idx: Tensor) -> None:
        books = self._books()
        used_fraction, perplexity, dead = [], [], []
        for book, rows, codes in self._rows_per_book(z, idx):
            if self.ema_update:
                counts, sums = code_stats(rows, codes, self.codebook_size, backend=self.backend)
                codebook_ema.synced_batch_stats(counts, sums)
            else:  # a gradient-trained codebook needs usage counts only: O(N), no (K, D) all-reduce
                counts = metrics.code_counts(codes, self.codebook_size)
                codebook_ema.synced_batch_stats(counts)
            perplexity.append(metrics.perplexity(counts))
            used_fraction.append(metrics.used_fraction(counts))

            codebook_ema.ema_inplace_(self.ema_count[book], counts, self.decay)
            if self.ema_update:
                codebook_ema.ema_inplace_(self.ema_sum[book], sums, self.decay)
                smoothed = codebook_ema.laplace_smoothed(self.ema_count[book], self.eps)
                updated = self.ema_sum[book] / smoothed[:, None]
                if self.use_cosine_sim:
                    updated = F.normalize(updated, dim=-1)
                books[book].copy_(updated.to(books.dtype))
            if self.threshold_ema_dead_code > 0:
                revived = codebook_ema.revive_dead_codes_(
                    books[book], self.ema_count[book], self.ema_sum[book] if self.ema_update else None,
                    rows, self.threshold_ema_dead_code,
                )
                if self.use_cosine_sim:
                    books[book].copy_(F.normalize(books[book], dim=-1))
                dead.append(revived.sum())
            else:  # no revival: report codes whose usage EMA has all but vanished
                dead.append((self.ema_count[book] < 1e-3).sum())
        self.perplexity.copy_(torch.stack(perplexity).mean())
        self.codes_used_fraction.copy_(torch.stack(used_fraction).mean())
        self.dead_codes.copy_(torch.stack(dead).sum())

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() would round the EMA accumulators to 8 or 11 bits, after which small
        # (1 - decay) updates vanish and the EMA freezes: they follow the device, never the dtype.
        kept = {name: getattr(self, name) for name in ("ema_count", "ema_sum")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(device=after.device, dtype=torch.float32))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)

    # -- decoding ---------------------------------------------------------------------------------

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Quantized output for given code indices, in the forward's layout.

        Args:
            indices: int64/int32 tensor shaped like the ``indices`` forward returns
                ((B, ...), plus a trailing heads axis when heads > 1).

        Returns:
            (B, ..., dim) for channel-last layouts; (B, dim, ...) otherwise.

        Raises:
            TypeError: non-integer indices. ValueError: wrong heads axis or indices out of range.
        """
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = getattr(indices, "dtype", type(indices).__name__)
            raise TypeError(f"indices must be an int64/int32 tensor, got {got}")
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must end in a heads axis of size {self.heads}, got shape {tuple(indices.shape)}")
        # Range-checked on CPU only: on CUDA the check would be a host synchronisation.
        if indices.device.type == "cpu" and indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")
        books = self._books()
        if self.use_cosine_sim:
            books = F.normalize(books, dim=-1)
        if self.heads == 1:
            codes = books[0][indices]  # (B, ..., cd)
        elif self.separate_codebook_per_head:
            head = torch.arange(self.heads, device=indices.device)
            codes = books[head, indices].flatten(-2)  # (B, ..., H * cd)
        else:
            codes = books[0][indices].flatten(-2)
        return self._from_channel_last(self.project_out(codes))

    def extra_repr(self) -> str:
        mode = f"ema(decay={self.decay})" if self.ema_update else "gradient"
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"heads={self.heads}, codebook={mode}, commitment_weight={self.commitment_weight}, "
            f"cosine={self.use_cosine_sim}, backend={self.backend!r}"
        )
