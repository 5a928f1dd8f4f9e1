"""VectorQuantizer: the drop-in nn.Module (keyword names follow vector-quantize-pytorch).

A composition of parts: layouts (layout.py), assignment (assignment.py: nearest code through the
fused op), gradient estimators (gradients.py), and the codebook's training-time state and
updates (codebook.py: EMA, k-means init, dead codes, DDP sync, telemetry). This file holds the
options, the heads and projections, and the order in which the parts run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, check_weight, positive_int
from fastvq.quantizers import assignment, codebook
from fastvq.quantizers.gradients import rotate_to
from fastvq.quantizers.layout import from_channel_last, projections, resolve_channel_last, to_channel_last
from fastvq.quantizers.output import QuantizerOutput


class VectorQuantizer(codebook.CodebookBuffers):
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

    Under torch.distributed (> 1 rank) codebook statistics are synchronised so that ranks never
    diverge (``codebook.CodebookUpdater``); every rank must run every training forward.

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
        self.dim = positive_int(dim, "dim")
        self.codebook_size = positive_int(codebook_size, "codebook_size")
        self.heads = positive_int(heads, "heads")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when codebook_dim is not given")
            codebook_dim = dim // heads
        self.codebook_dim = positive_int(codebook_dim, "codebook_dim")
        learnable_codebook, codebook_weight = codebook.resolve_training_mode(
            ema_update, learnable_codebook, codebook_weight
        )
        self.updater = codebook.CodebookUpdater(
            codebook_size, ema_update, decay, eps, threshold_ema_dead_code, kmeans_iters, use_cosine_sim, backend
        )
        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
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

        self.project_in, self.project_out = projections(dim, heads * codebook_dim)
        num_books = heads if separate_codebook_per_head else 1
        # Standard-normal init like vector-quantize-pytorch; VQ-VAE's U(-1/K, 1/K) starts every
        # code at the origin, far from typical encoder outputs, and most codes then never win.
        init = torch.randn(num_books, codebook_size, codebook_dim)
        if use_cosine_sim:
            init = F.normalize(init, dim=-1)
        # One book keeps the peer's (K, D) parameter shape (and checkpoint shape).
        self.embed = nn.Parameter(init if separate_codebook_per_head else init[0], requires_grad=learnable_codebook)
        self.register_codebook_state(init, initted=not kmeans_init)

    # -- codebook views ---------------------------------------------------------------------------

    def _books(self) -> Tensor:
        """(num_books, K, codebook_dim) view of the codebook parameter."""
        return self.embed.view(-1, self.codebook_size, self.codebook_dim)

    def _unit(self, books: Tensor) -> Tensor:
        """The codes as the search sees them: unit vectors with use_cosine_sim."""
        return F.normalize(books, dim=-1) if self.use_cosine_sim else books

    def _book_states(self) -> list[codebook.CodebookState]:
        """Per codebook, views of its codes and EMA buffers (updated in place by the updater)."""
        books = self._books()
        return [codebook.CodebookState(books[b], self.ema_count[b], self.ema_sum[b]) for b in range(books.shape[0])]

    @property
    def codebook(self) -> Tensor:
        """The codes as they appear in the output: (codebook_size, dim) with one head;
        (codebook_size, codebook_dim) for heads sharing one codebook; (heads, codebook_size,
        codebook_dim) with separate_codebook_per_head (no projection applies with heads > 1)."""
        books = self._unit(self._books())
        if self.heads == 1:
            return self.project_out(books[0])
        return books if self.separate_codebook_per_head else books[0]

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts. Returns QuantizerOutput."""
        check_float_tensor(z, "z", min_dim=2)
        z = self.project_in(to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap))
        lead = z.shape[:-1]
        z = z.reshape(*lead, self.heads, self.codebook_dim)  # (B, ..., H, cd)
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        if self.training and not self._initted:
            self._init_codebooks(z.detach())

        books = self._books()
        if self.training and self.updater.changes_codes:
            # The op saves the codebook for backward; the codes updated in place below must not be that tensor.
            books = books.clone()
        weights = (self.commitment_weight, self.codebook_weight)
        zq, idx, loss = assignment.nearest(z, self._unit(books), *weights, self.backend)
        if self.rotation_trick:  # zq already carries the fused op's straight-through gradient otherwise
            zq = rotate_to(z, zq)
        if self.training:
            self._update_codebooks(z.detach(), idx)

        zq = self.project_out(zq.reshape(*lead, self.heads * self.codebook_dim))
        if self.heads == 1:
            idx = idx.squeeze(-1)
        return QuantizerOutput(from_channel_last(zq, self.channel_last), idx, loss)

    def _init_codebooks(self, z: Tensor) -> None:
        """k-means on the first training batch z (B, ..., H, cd), one run per codebook."""
        for state, rows in zip(self._book_states(), self._rows_per_book(z), strict=True):
            self.updater.kmeans_init_(state, rows)
        self.mark_initted()

    def _update_codebooks(self, z: Tensor, idx: Tensor) -> None:
        """EMA / revival / telemetry from the batch z (B, ..., H, cd) and its indices (B, ..., H)."""
        codes = [c.reshape(-1) for c in self._rows_per_book(idx.unsqueeze(-1))]  # (M,) per book
        books = zip(self._book_states(), self._rows_per_book(z), codes, strict=True)
        self.record_usage_([self.updater.update_(state, rows, c) for state, rows, c in books])

    def _rows_per_book(self, t: Tensor) -> list[Tensor]:
        """Per codebook, its rows of ``t`` (B, ..., H, C): (M, C), every head's rows for a shared book."""
        if self.separate_codebook_per_head:
            return [t[..., h, :].reshape(-1, t.shape[-1]) for h in range(self.heads)]
        return [t.reshape(-1, t.shape[-1])]

    # -- decoding ---------------------------------------------------------------------------------

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Quantized output for given code indices, in the forward's layout.

        Args:
            indices: int64/int32 tensor shaped like the ``indices`` forward returns
                ((B, ...), plus a trailing heads axis when heads > 1).

        Returns:
            (B, ..., dim) for channel-last layouts; (B, dim, ...) otherwise.

        Raises:
            TypeError: non-integer indices. ValueError: wrong heads axis or indices out of range (the
            range is checked on CPU only: on CUDA it would be a host synchronisation).
        """
        check_indices(indices, self.codebook_size)
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must end in a heads axis of size {self.heads}, got shape {tuple(indices.shape)}")
        idx = indices if self.heads > 1 else indices.unsqueeze(-1)  # (B, ..., H)
        codes = assignment.lookup(self._unit(self._books()), idx).flatten(-2)  # (B, ..., H * cd)
        return from_channel_last(self.project_out(codes), self.channel_last)

    def extra_repr(self) -> str:
        mode = f"ema(decay={self.decay})" if self.ema_update else "gradient"
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"heads={self.heads}, codebook={mode}, commitment_weight={self.commitment_weight}, "
            f"cosine={self.use_cosine_sim}, backend={self.backend!r}"
        )
