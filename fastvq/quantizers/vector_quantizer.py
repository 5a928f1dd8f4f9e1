"""VectorQuantizer (alias VectorQuantize): vector-quantize-pytorch's VectorQuantize, drop-in.

The same constructor and forward keywords, defaults, returns and state_dict keys as the peer's
release 1.32 for the options implemented here; every other peer keyword is accepted at its
default value and raises NotImplementedError (naming it) at any other value.

A composition of parts: layouts and masks (layout.py), assignment and the peer's loss
(assignment.py: nearest code through the fused op), gradient estimators (gradients.py), the
codebook's state, initial codes and updates (codebook.py: the ``_codebook`` submodule, EMA, k-means
init, dead codes, DDP sync, telemetry), the peer's unimplemented keywords (peer_options.py), old
checkpoint keys (checkpoints.py) and the result types (output.py). This file holds the options,
the heads and projections, and the order the parts run in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, check_weight, positive_int
from fastvq.quantizers import assignment, codebook
from fastvq.quantizers.checkpoints import remap_old_codebook_keys
from fastvq.quantizers.gradients import rotate_to
from fastvq.quantizers.layout import (
    fill_padding,
    fmap_to_channel_last,
    from_channel_last,
    projections,
    scatter_valid,
    sequence_mask,
    with_heads_axis,
)
from fastvq.quantizers.output import LossBreakdown, QuantizerOutput, QuantizerOutputWithBreakdown
from fastvq.quantizers.peer_options import (
    UNSUPPORTED_FORWARD_OPTIONS,
    UNSUPPORTED_OPTIONS,
    check_unsupported,
    skips_ema_update,
)

# Re-exported: the names this module defined before they moved to their parts.
__all__ = [
    "UNSUPPORTED_OPTIONS", "LossBreakdown", "QuantizerOutputWithBreakdown", "VectorQuantize", "VectorQuantizer",
    "check_unsupported",
]


class VectorQuantizer(nn.Module):
    """Vector quantizer with vector-quantize-pytorch's VectorQuantize keywords and defaults.

    Args (the peer's meaning and default unless said):
        dim: feature size of the input.
        codebook_size: number of codes K.
        codebook_dim: size of each code (per head). Default ``dim``; when ``heads * codebook_dim``
            differs from ``dim`` the input is projected (Linear) in and out.
        heads: split each (projected) vector into ``heads`` sub-vectors quantized separately;
            indices gain a trailing heads axis when heads > 1. Default 1.
        separate_codebook_per_head: one codebook per head instead of one shared. Default False.
        decay, eps: EMA decay (default 0.8) and Laplace smoothing (default 1e-5).
        freeze_codebook: no codebook update and no codebook gradient (also per forward). Default False.
        kmeans_init, kmeans_iters: the first training batch initialises the codebook by k-means
            (fastvq: k-means++ seeds, then ``kmeans_iters`` Lloyd steps; default 10).
        use_cosine_sim: l2-normalise inputs and codes (cosine distances). Default False.
        threshold_ema_dead_code: codes whose usage EMA falls below this are replaced by rows of
            the batch (0 = never, the default).
        channel_last: features on the last axis (B, ..., dim); False: (B, dim, N). Default True;
            ignored with ``accept_image_fmap`` / ``accept_3d_fmap`` (channel-first maps).
        accept_image_fmap, accept_3d_fmap: (B, dim, H, W) / (B, dim, D, H, W) input; indices
            drop the dim axis.
        commitment_weight: weight of the commitment loss mean((z - sg(e))^2). Default 1.0.
        rotation_trick: gradients through the rotation trick (training). Default ``dim > 1``.
        ema_update: codes as EMAs of their assigned rows. Default True (False with
            ``learnable_codebook=True``). ``ema_update=False`` alone freezes the codebook, as in the peer.
        learnable_codebook: codes trained by gradient. Default False.
        return_zeros_for_masked_padding: masked positions output zeros (else the input). Default True.
        codebook_weight (fastvq): weight of mean((sg(z) - e)^2) for a learnable codebook, a separate
            term of the loss (VQ-VAE uses 1.0). Default None: the peer's single term
            commitment_weight * mean((z - e)^2), with that weight on both gradients.
        codebook_init (fastvq): "kaiming_uniform" (the peer's, default) or "normal" (standard
            normal: codes start at the scale of typical encoder outputs).
        eval_loss (fastvq): compute the loss in eval mode too. Default False (the peer returns 0).
        backend (fastvq): "auto" | "triton" | "torch" (see fastvq.functional).
        **peer_options: the peer's other keywords (``UNSUPPORTED_OPTIONS``), accepted at their
            defaults only.

    Forward ``x`` -> ``(quantized, indices, loss)`` (a QuantizerOutput): quantized like x; indices
    int64; loss 0-d (0 in eval mode unless ``eval_loss``). Masked (``mask`` / ``lens``) positions
    are excluded from the loss, k-means and the EMA, and get index -1.

    Under torch.distributed (> 1 rank) codebook statistics are synchronised (``codebook.CodebookUpdater``).
    Telemetry of training forwards: ``perplexity``, ``codes_used_fraction``, ``dead_codes``.

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``); input of the wrong shape.
        NotImplementedError: a peer option not implemented, at a non-default value.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        *,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool | None = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        rotation_trick: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        codebook_weight: float | None = None,
        codebook_init: str = "kaiming_uniform",
        eval_loss: bool = False,
        backend: str = "auto",
        **peer_options: Any,
    ) -> None:
        super().__init__()
        check_unsupported(type(self).__name__, peer_options, UNSUPPORTED_OPTIONS)
        self.dim = positive_int(dim, "dim")
        self.codebook_size = positive_int(codebook_size, "codebook_size")
        self.heads = positive_int(heads, "heads")
        self.codebook_dim = positive_int(dim if codebook_dim is None else codebook_dim, "codebook_dim")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
        # The peer's loss is ONE term, commitment_weight * mse(z, e), with gradients to z and (learnable)
        # to e: fastvq's two terms with equal weights give the same gradients, and count the value once.
        self._one_term = codebook_weight is None
        ema_update, learnable_codebook, codebook_weight = codebook.resolve_training_mode(
            ema_update, learnable_codebook, codebook_weight, self.commitment_weight
        )
        self.codebook_weight = check_weight(codebook_weight, "codebook_weight")
        self.updater = codebook.CodebookUpdater(
            codebook_size, ema_update, decay, eps, threshold_ema_dead_code, kmeans_iters, use_cosine_sim, backend
        )
        self.ema_update, self.learnable_codebook = ema_update, learnable_codebook
        self.decay, self.eps = float(decay), float(eps)
        self.freeze_codebook = bool(freeze_codebook)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.use_cosine_sim = use_cosine_sim
        self.rotation_trick = (dim > 1) if rotation_trick is None else bool(rotation_trick)
        self.separate_codebook_per_head = separate_codebook_per_head
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.channel_last = channel_last is not False and not (accept_image_fmap or accept_3d_fmap)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.eval_loss = eval_loss
        self.backend = backend

        self.project_in, self.project_out = projections(dim, heads * self.codebook_dim)
        shape = (heads if separate_codebook_per_head else 1, codebook_size, self.codebook_dim)
        init = codebook.initial_codes(shape, codebook_init, kmeans_init, use_cosine_sim)
        self._codebook = codebook.Codebook(init, learnable=learnable_codebook, initted=not kmeans_init)

    # -- codebook views ---------------------------------------------------------------------------

    def _unit(self, books: Tensor) -> Tensor:
        """The codes as the search sees them: unit vectors with use_cosine_sim."""
        return F.normalize(books, dim=-1) if self.use_cosine_sim else books

    @property
    def codebook(self) -> Tensor:
        """The codes as stored, as the peer's: (codebook_size, codebook_dim), or (heads,
        codebook_size, codebook_dim) with separate_codebook_per_head (no projection applied)."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    @property
    def embed(self) -> Tensor:
        """fastvq's earlier name of ``codebook`` (a view of ``_codebook.embed``)."""
        return self.codebook

    @property
    def _initted(self) -> bool:
        """Whether the codes are initialised (``_codebook``'s host-side mirror of ``initted``)."""
        return self._codebook._initted

    @_initted.setter
    def _initted(self, value: bool) -> None:
        self._codebook._initted = bool(value)

    @property
    def perplexity(self) -> Tensor:
        return self._codebook.perplexity

    @property
    def codes_used_fraction(self) -> Tensor:
        return self._codebook.codes_used_fraction

    @property
    def dead_codes(self) -> Tensor:
        return self._codebook.dead_codes

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Any = None,
        ema_update_weight: Any = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> QuantizerOutput | QuantizerOutputWithBreakdown:
        """Quantize ``x``; see the class docstring for layouts and returns.

        ``mask`` (B, N) bool (True = keep) or ``lens`` (B,) lengths, for (B, N, dim) sequences;
        ``freeze_codebook`` overrides the constructor's for this call; ``ema_update=False`` skips
        this call's EMA update (without dead-code revival); ``sample_codebook_temp`` has no effect
        without stochastic sampling (as in the peer). ``indices``, ``topk``, ``codebook_transform_fn``,
        ``ema_update_weight`` and ``accum_ema_update`` raise NotImplementedError at a non-default value.
        """
        where = f"{type(self).__name__}.forward"
        given = {"indices": indices, "topk": topk, "codebook_transform_fn": codebook_transform_fn,
                 "ema_update_weight": ema_update_weight, "accum_ema_update": accum_ema_update}
        check_unsupported(where, given, UNSUPPORTED_FORWARD_OPTIONS)
        skip_ema = skips_ema_update(where, ema_update, self.ema_update, bool(self.threshold_ema_dead_code))
        check_float_tensor(x, "x", min_dim=2)
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        mask = sequence_mask(x, mask, lens, self.channel_last, fmap)
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        x_last = fmap_to_channel_last(x, self.dim, self.channel_last, self.accept_image_fmap, self.accept_3d_fmap)
        z = self.project_in(x_last)
        lead = z.shape[:-1]
        z = z.reshape(*lead, self.heads, self.codebook_dim)  # (B, ..., H, cd)
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        rows = z if mask is None else z[mask]  # (M, H, cd) with a mask: only the valid positions
        if self.training and not self._codebook._initted:
            codebook.kmeans_init_books_(self._codebook, self.updater, rows.detach())

        books = self._codebook.embed
        update = self.training and not freeze and not skip_ema
        if update and self.updater.changes_codes:
            # The op saves the codebook for backward; the codes updated in place below must not be that tensor.
            books = books.clone()
        codebook_weight = self.codebook_weight
        if freeze:
            books, codebook_weight = books.detach(), 0.0
        weights = (self.commitment_weight, codebook_weight)
        zq, idx, loss = assignment.nearest(rows, self._unit(books), *weights, self.backend)
        if self.rotation_trick:  # zq already carries the fused op's straight-through gradient otherwise
            zq = rotate_to(rows, zq)
        if update:
            codebook.update_books_(self._codebook, self.updater, rows.detach(), idx)
        loss, commitment = assignment.peer_loss(loss, *weights, self._one_term)
        if not (self.training or self.eval_loss):
            loss = commitment = torch.zeros((), device=x.device)

        if mask is not None:
            zq, idx = scatter_valid(zq, mask, 0.0), scatter_valid(idx, mask, -1)  # (B, N, H, cd), (B, N, H)
        zq = self.project_out(zq.reshape(*lead, self.heads * self.codebook_dim))
        if mask is not None:
            zq = fill_padding(zq, x_last, mask, self.return_zeros_for_masked_padding)
        if self.heads == 1:
            idx = idx.squeeze(-1)
        out = QuantizerOutput(from_channel_last(zq.to(x.dtype), self.channel_last), idx, loss)  # x's dtype, as theirs
        if not return_loss_breakdown:
            return out
        zero = torch.zeros((), device=x.device)
        return QuantizerOutputWithBreakdown(*out, LossBreakdown(commitment, zero, zero, zero))

    # -- checkpoints ------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        remap_old_codebook_keys(state_dict, prefix)  # old fastvq checkpoints still load
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- decoding ---------------------------------------------------------------------------------

    def _codes(self, indices: Tensor) -> Tensor:
        """(B, ..., heads * codebook_dim) codes of indices (the forward's index shape), channel-last."""
        check_indices(indices, self.codebook_size)
        idx = with_heads_axis(indices, self.heads)  # (B, ..., H)
        return assignment.lookup(self._unit(self._codebook.embed), idx).flatten(-2)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codes of ``indices`` before the output projection, in the forward's layout."""
        return from_channel_last(self._codes(indices), self.channel_last)

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
        return from_channel_last(self.project_out(self._codes(indices)), self.channel_last)

    def extra_repr(self) -> str:
        mode = f"ema(decay={self.decay})" if self.ema_update else ("gradient" if self.learnable_codebook else "frozen")
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"heads={self.heads}, codebook={mode}, commitment_weight={self.commitment_weight}, "
            f"rotation_trick={self.rotation_trick}, cosine={self.use_cosine_sim}, backend={self.backend!r}"
        )


VectorQuantize = VectorQuantizer
