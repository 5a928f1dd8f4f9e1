"""VectorQuantizer (alias VectorQuantize): vector-quantize-pytorch's VectorQuantize, drop-in.

The same constructor and forward keywords, defaults, returns and state_dict keys as the peer's
release 1.32. Forward ``codebook_transform_fn`` (the implicit neural codebook of ResidualVQ) gives
every position its own codebook: dense by nature, O(B N K D) memory, as the peer's.

A composition of parts: layouts and masks (layout.py); assignment (assignment.py: the nearest code
through the fused op, or the peer's stochastic sampling in bounded-memory chunks, sampling.py);
gradient estimators (gradients.py: straight-through, rotation trick, DiVeQ, the synchronous update);
the codebook's state, initial codes and updates (codebook.py: the ``_codebook`` submodule, EMA,
k-means init, dead codes, DDP sync, telemetry; affine.py: the peer's affine statistics); auxiliary
losses (aux_losses.py: cross-entropy commitment, diversity, orthogonal regularisation); the in-place
codebook optimizer (inplace.py); the peer's keyword checks (peer_options.py); old checkpoint keys
(checkpoints.py) and result types (output.py). This file holds the options and the order the parts
run in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, check_weight, positive_int
from fastvq.quantizers import affine, assignment, codebook
from fastvq.quantizers.aux_losses import AuxiliaryLosses
from fastvq.quantizers.checkpoints import remap_old_codebook_keys
from fastvq.quantizers.gradients import directional_reparam as diveq_estimator
from fastvq.quantizers.gradients import rotate_to, sync_update
from fastvq.quantizers.inplace import inplace_codebook_loss_, optimizer_step_
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
    UNSUPPORTED_OPTIONS,
    check_peer_combinations,
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

    Args (the peer's meaning and default unless said; docs/quantizers.md has the long form):
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
        sync_kmeans: k-means over all ranks' rows (default True; False: each rank's own rows).
        use_cosine_sim: l2-normalise inputs and codes (cosine distances). Default False.
        layernorm_after_project_in: LayerNorm after the input projection. Default False.
        threshold_ema_dead_code: codes whose usage EMA falls below this are replaced by rows of
            the batch (0 = never, the default).
        channel_last: features on the last axis (B, ..., dim); False: (B, dim, N). Default True;
            ignored with ``accept_image_fmap`` / ``accept_3d_fmap`` (channel-first maps).
        accept_image_fmap, accept_3d_fmap: (B, dim, H, W) / (B, dim, D, H, W) input; indices
            drop the dim axis.
        commitment_weight: weight of the commitment loss mean((z - sg(e))^2). Default 1.0.
        commitment_use_cross_entropy_loss: the commitment term is the cross-entropy of the logits
            against the chosen codes. orthogonal_reg_weight, orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes: orthogonal regularisation of the codes (Shin et al. 2021).
            codebook_diversity_loss_weight, codebook_diversity_temperature: minus the entropy of the
            batch's average code distribution. All off by default (``AuxiliaryLosses``).
        stochastic_sample_codes, sample_codebook_temp, straight_through: in training, draw codes
            from softmax(logits / temperature) (Gumbel-max; default off, temperature 1.0), with
            the Gumbel-softmax straight-through gradient for the codes.
        rotation_trick: gradients through the rotation trick (training). Default ``dim > 1``
            (False with ``directional_reparam``).
        directional_reparam, directional_reparam_variance: DiVeQ's estimator (a learnable
            codebook trained through the output, no commitment loss; needs dead-code revival).
        sync_codebook: sum codebook statistics over ranks. Default: when distributed.
        ema_update: codes as EMAs of their assigned rows. Default True (False with
            ``learnable_codebook=True``, ``directional_reparam`` or ``vq_bridge``). ``ema_update=False``
            alone freezes the codebook, as in the peer. manual_ema_update: only the statistics are
            tracked; ``_codebook.update_ema()`` writes the codes.
        vq_bridge: a module applied to the codes before the search (trained by gradient).
        learnable_codebook: codes trained by gradient. Default False (True with
            ``directional_reparam`` or ``vq_bridge``).
        in_place_codebook_optimizer, manual_in_place_optimizer_update: a callable making an
            optimizer over the codes, stepped inside each training forward on mse(e, sg(z)) (or by
            ``update_in_place_optimizer()`` when manual).
        affine_param, affine_param_batch_decay, affine_param_codebook_decay: codes shifted and scaled
            to the running statistics of the batch (euclidean only; ``sync_affine_param`` not implemented).
        sync_update_v: the synchronous update rule's v in [0, 1] (learnable codebook).
        return_zeros_for_masked_padding: masked positions output zeros (else the input). Default True.
        route_gradients_to_input: apply the estimator (else the output is the codes themselves).
        codebook_weight (fastvq): weight of mean((sg(z) - e)^2) for a learnable codebook, a separate
            term of the loss (VQ-VAE uses 1.0). Default None: the peer's single term
            commitment_weight * mean((z - e)^2), with that weight on both gradients.
        codebook_init (fastvq): "kaiming_uniform" (the peer's, default) or "normal" (standard
            normal: codes start at the scale of typical encoder outputs).
        eval_loss (fastvq): compute the loss in eval mode too. Default False (the peer returns 0).
        backend (fastvq): "auto" | "triton" | "torch" (see fastvq.functional).

    Forward ``x`` -> ``(quantized, indices, loss)`` (a QuantizerOutput): quantized like x; indices
    int64; loss 0-d (0 in eval mode unless ``eval_loss``). Masked (``mask`` / ``lens``) positions
    are excluded from the loss, k-means and the EMA, and get index -1.

    Under torch.distributed (> 1 rank) codebook statistics are synchronised (``codebook.CodebookUpdater``).
    Telemetry of training forwards: ``perplexity``, ``codes_used_fraction``, ``dead_codes``.

    Raises:
        ValueError: bad sizes or option combinations the peer refuses (in ``__init__``); input of
            the wrong shape.
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
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool | None = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: bool | None = None,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        ema_update: bool | None = None,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
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
        if learnable_codebook is None:  # the peer's defaults: DiVeQ and a bridge train the codes by gradient
            learnable_codebook = bool(directional_reparam or vq_bridge is not None)
        if rotation_trick is None:
            rotation_trick = not directional_reparam and dim > 1
        check_peer_combinations(
            straight_through=straight_through, rotation_trick=rotation_trick, directional_reparam=directional_reparam,
            threshold_ema_dead_code=threshold_ema_dead_code, learnable_codebook=learnable_codebook,
            sync_update_v=sync_update_v, vq_bridge=vq_bridge, ema_update=ema_update, affine_param=affine_param,
            use_cosine_sim=use_cosine_sim,
        )
        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
        # The peer's loss is ONE term, commitment_weight * mse(z, e), with gradients to z and (learnable)
        # to e: fastvq's two terms with equal weights give the same gradients, and count the value once.
        self._one_term = codebook_weight is None
        ema_update, learnable_codebook, codebook_weight = codebook.resolve_training_mode(
            ema_update, learnable_codebook, codebook_weight, self.commitment_weight
        )
        self.codebook_weight = check_weight(codebook_weight, "codebook_weight")
        self.updater = codebook.CodebookUpdater(
            codebook_size, ema_update, decay, eps, threshold_ema_dead_code, kmeans_iters, use_cosine_sim, backend,
            manual_ema_update=manual_ema_update, sync=sync_codebook, sync_kmeans=bool(sync_kmeans),
        )
        self.ema_update, self.learnable_codebook = ema_update, learnable_codebook
        self.decay, self.eps = float(decay), float(eps)
        self.freeze_codebook = bool(freeze_codebook)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.use_cosine_sim = use_cosine_sim
        self.stochastic_sample_codes, self.straight_through = bool(stochastic_sample_codes), bool(straight_through)
        self.sample_codebook_temp = check_weight(sample_codebook_temp, "sample_codebook_temp")
        self.rotation_trick = bool(rotation_trick)
        self.directional_reparam = bool(directional_reparam)
        self.directional_reparam_variance = check_weight(directional_reparam_variance, "directional_reparam_variance")
        self.sync_update_v = float(sync_update_v)
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.aux = AuxiliaryLosses(
            commitment_use_cross_entropy_loss, codebook_diversity_loss_weight, codebook_diversity_temperature,
            orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes,
        )
        self.separate_codebook_per_head = separate_codebook_per_head
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.channel_last = channel_last is not False and not (accept_image_fmap or accept_3d_fmap)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.eval_loss = eval_loss
        self.backend = backend

        inner = heads * self.codebook_dim
        self.project_in, self.project_out = projections(dim, inner, layernorm_after_project_in)
        self.has_projections = inner != dim
        books = heads if separate_codebook_per_head else 1
        shape = (books, codebook_size, self.codebook_dim)
        init = codebook.initial_codes(shape, codebook_init, kmeans_init, use_cosine_sim)
        self._codebook = codebook.Codebook(
            init, learnable=learnable_codebook or self.aux.needs_learnable_codes, initted=not kmeans_init,
            updater=self.updater,
        )
        self.affine_param = bool(affine_param)
        self._affine_decays = (affine_param_batch_decay, affine_param_codebook_decay)
        if affine_param:
            affine.register_affine_buffers(self._codebook, books, self.codebook_dim)
        if vq_bridge is not None:
            self._codebook.vq_bridge = vq_bridge  # the peer's key: _codebook.vq_bridge.*
        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self._codebook.parameters())
        self.manual_in_place_optimizer_update = bool(manual_in_place_optimizer_update)

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
        ema_update_weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> QuantizerOutput | QuantizerOutputWithBreakdown | tuple[Tensor, Tensor]:
        """Quantize ``x``; see the class docstring for layouts and returns.

        ``mask`` (B, N) bool (True = keep) or ``lens`` (B,) lengths, for (B, N, dim) sequences;
        ``sample_codebook_temp`` overrides the constructor's (stochastic sampling only);
        ``freeze_codebook`` overrides the constructor's for this call; ``ema_update=False`` skips
        this call's EMA update (without dead-code revival); ``ema_update_weight`` ((K,), (books, K)
        or a callable of the batch's (embed_sum, cluster_size)) weights this call's EMA step per
        code; ``accum_ema_update`` accumulates this call's statistics into the next update.
        ``topk``: the topk best codes per vector, as the peer (heads=1; no codebook update):
        quantized (..., k, dim), indices (..., k), and a per-vector loss (..., k).
        ``indices`` given: returns ``(quantized, cross_entropy)``, the peer's cross-entropy of the
        logits against those codes (padding excluded). ``codebook_transform_fn``: per-position
        codebooks (the implicit neural codebook, QINCo): called with the codes (1, K, cd), returns
        (1, B, N, K, cd) for (B, N, dim) input (``_transformed_forward``; dense, O(B N K cd) memory).
        """
        where = f"{type(self).__name__}.forward"
        self._check_transform(codebook_transform_fn, topk, indices)
        skip_ema = skips_ema_update(where, ema_update, self.ema_update, bool(self.threshold_ema_dead_code))
        check_float_tensor(x, "x", min_dim=2)
        topk = self._check_topk(topk)
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        mask = sequence_mask(x, mask, lens, self.channel_last, fmap)
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else check_weight(
            sample_codebook_temp, "sample_codebook_temp"
        )
        x_last = fmap_to_channel_last(x, self.dim, self.channel_last, self.accept_image_fmap, self.accept_3d_fmap)
        z = self._split_heads(self.project_in(x_last))  # (B, ..., H, cd)
        rows = z if mask is None else z[mask]  # (M, H, cd) with a mask: only the valid positions
        if self.training and not self._codebook._initted:
            codebook.kmeans_init_books_(self._codebook, self.updater, rows.detach())
        if self.affine_param:
            affine.update_affine_(
                self._codebook, self._rows_per_book(rows.detach()), self._codebook.embed.detach(), self.training,
                *self._affine_decays,
            )
        update = self.training and not freeze and not skip_ema and topk is None
        books, weights = self._search_books(freeze, update)
        if topk is not None:
            return self._topk_forward(x, x_last, z, books, topk, temperature, mask)
        if codebook_transform_fn is not None:
            return self._transformed_forward(x, x_last, z, books, weights, codebook_transform_fn, mask, update)

        zq, codes, idx, loss = self._assign(rows, books, weights, temperature)
        inplace_loss = torch.zeros((), device=x.device)
        if self.in_place_codebook_optimizer is not None and self.training and not freeze:
            inplace_loss = inplace_codebook_loss_(self._codes_with_grad(codes, books, idx), rows)
            if not self.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            books, weights = self._search_books(freeze, update)
            zq, codes, idx, loss = self._assign(rows, books, weights, temperature)  # with the moved codes
        zq = self._estimate(rows, zq, codes, books, idx, x.requires_grad)
        if update:
            ema_rows = rows.detach()
            if self.affine_param:
                ema_rows = affine.affine_rows(self._codebook, ema_rows, books_axis=-2)
            codebook.update_books_(
                self._codebook, self.updater, ema_rows, idx, weight=ema_update_weight, accumulate=accum_ema_update
            )
        loss, breakdown = self._losses(z, rows, books, idx, loss, weights, inplace_loss)

        if mask is not None:
            zq, idx = scatter_valid(zq, mask, 0.0), scatter_valid(idx, mask, -1)  # (B, N, H, cd), (B, N, H)
        zq = self.project_out(zq.reshape(*z.shape[:-2], self.heads * self.codebook_dim))
        if mask is not None:
            zq = fill_padding(zq, x_last, mask, self.return_zeros_for_masked_padding)
        if self.heads == 1:
            idx = idx.squeeze(-1)
        quantized = from_channel_last(zq.to(x.dtype), self.channel_last)  # x's dtype, as theirs
        if indices is not None:
            return quantized, self._cross_entropy_to(indices, rows, books, mask)
        out = QuantizerOutput(quantized, idx, loss)
        return QuantizerOutputWithBreakdown(*out, breakdown) if return_loss_breakdown else out

    def _split_heads(self, z: Tensor) -> Tensor:
        """(B, ..., H * cd) -> (B, ..., H, cd), unit vectors with use_cosine_sim."""
        z = z.reshape(*z.shape[:-1], self.heads, self.codebook_dim)
        return F.normalize(z, dim=-1) if self.use_cosine_sim else z

    def _rows_per_book(self, rows: Tensor) -> Tensor:
        """(books, M', cd) rows of (..., H, cd) per codebook (every head's rows for a shared one)."""
        return torch.stack(codebook.rows_per_book(rows, self._codebook.embed.shape[0]))

    def _search_books(self, freeze: bool, update: bool) -> tuple[Tensor, tuple[float, float]]:
        """The codes the search sees, (books, K, cd), and this forward's (commitment, codebook) weights."""
        books = self._codebook.embed
        if not self.learnable_codebook or freeze:
            books = books.detach()
        if self.training and (update and self.updater.changes_codes or self.updater.manual_ema_update):
            # The op saves the codebook for backward; the codes updated in place later (by this forward,
            # or by a residual stack's update_ema after its stages) must not be that tensor.
            books = books.clone()
        if self.vq_bridge is not None:
            books = self.vq_bridge(books)
        if self.affine_param:
            books = affine.affine_codes(self._codebook, books)
        commitment_weight, codebook_weight = self.commitment_weight, (0.0 if freeze else self.codebook_weight)
        if self.directional_reparam or self.aux.commitment_use_cross_entropy_loss:
            commitment_weight = codebook_weight = 0.0  # DiVeQ has no commitment term; the CE replaces it
        return self._unit(books), (commitment_weight, codebook_weight)

    @property
    def vq_bridge(self) -> nn.Module | None:
        """The peer's ``vq_bridge`` module (registered on ``_codebook``), or None."""
        return getattr(self._codebook, "vq_bridge", None)

    def _assign(
        self, rows: Tensor, books: Tensor, weights: tuple[float, float], temperature: float
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(zq, codes, idx, weighted loss): the fused nearest-code op, or the peer's sampling in training.

        zq carries the straight-through gradient to ``rows``; ``codes`` is the sampled codes with
        their own gradient (None on the fused path, where ``_codes_with_grad`` looks them up).
        """
        if self.training and temperature > 0 and (self.stochastic_sample_codes or self.straight_through):
            codes, idx = assignment.sampled(
                rows, books, temperature, stochastic=self.stochastic_sample_codes,
                straight_through=self.straight_through, use_cosine_sim=self.use_cosine_sim,
            )
            zq = codes.detach() + (rows - rows.detach()).to(codes.dtype)  # the peer's straight_through(x, q)
            return zq, codes, idx, assignment.code_losses(rows, codes, *weights)
        zq, idx, loss = assignment.nearest(rows, books, *weights, self.backend)
        return zq, None, idx, loss

    @staticmethod
    def _codes_with_grad(codes: Tensor | None, books: Tensor, idx: Tensor) -> Tensor:
        """The assigned codes with their gradient path to the codebook (a lookup on the fused path)."""
        return assignment.lookup(books, idx) if codes is None else codes

    def _estimate(
        self, rows: Tensor, zq: Tensor, codes: Tensor | None, books: Tensor, idx: Tensor, input_requires_grad: bool
    ) -> Tensor:
        """The output's gradient estimator, as the peer's training branch (identity in eval mode)."""
        if not self.training:
            return zq
        if not (input_requires_grad and self.route_gradients_to_input):
            out = self._codes_with_grad(codes, books, idx)  # the codes themselves (their own gradients only)
        elif self.rotation_trick:
            out = rotate_to(rows, zq)
        elif self.directional_reparam:
            out = diveq_estimator(rows, self._codes_with_grad(codes, books, idx), self.directional_reparam_variance)
        else:
            out = zq
        return sync_update(out, self.sync_update_v) if self.sync_update_v > 0 else out

    def _losses(
        self, z: Tensor, rows: Tensor, books: Tensor, idx: Tensor, loss: Tensor, weights: tuple[float, float],
        inplace_loss: Tensor,
    ) -> tuple[Tensor, LossBreakdown]:
        """(total loss, the peer's breakdown): commitment (squared error or cross-entropy) and the
        auxiliary terms, in training (and in eval mode with ``eval_loss``)."""
        zero = torch.zeros((), device=z.device)
        if not (self.training or self.eval_loss):
            return zero, LossBreakdown(zero, zero, zero, inplace_loss)
        loss, commitment = assignment.peer_loss(loss, *weights, self._one_term)
        diversity = orthogonal = zero
        if self.aux.commitment_use_cross_entropy_loss and self.commitment_weight > 0:
            commitment = self.aux.cross_entropy_commitment(rows, books, idx, self.use_cosine_sim)
            loss = loss + self.commitment_weight * commitment
        if self.aux.codebook_diversity_loss_weight > 0:
            positions = z.reshape(z.shape[0], -1, *z.shape[-2:])  # (B, N, H, cd): the peer averages per position
            diversity = self.aux.diversity(positions, books, self.use_cosine_sim)
            loss = loss + self.aux.codebook_diversity_loss_weight * diversity
        if self.aux.orthogonal_reg_weight > 0:
            orthogonal = self.aux.orthogonal(self._codebook.embed, idx)
            loss = loss + self.aux.orthogonal_reg_weight * orthogonal
        return loss, LossBreakdown(commitment, diversity, orthogonal, inplace_loss)

    def _cross_entropy_to(self, indices: Tensor, rows: Tensor, books: Tensor, mask: Tensor | None) -> Tensor:
        """The peer's ``forward(x, indices=...)`` loss: cross-entropy of the logits against ``indices``."""
        check_indices(indices, self.codebook_size, low=-1)
        target = with_heads_axis(indices, self.heads)
        target = target.reshape(*rows.shape[:-1]) if mask is None else target[mask]
        return self.aux.cross_entropy_commitment(rows, books, target.long(), self.use_cosine_sim)

    def _check_transform(self, fn: Any, topk: int | None, indices: Tensor | None) -> None:
        """ValueError where per-position codebooks meet an option that assumes one shared codebook."""
        if fn is None:
            return
        if not callable(fn):
            raise TypeError(f"codebook_transform_fn must be callable, got {type(fn).__name__}")
        if self.heads != 1 or topk is not None or indices is not None or self.stochastic_sample_codes or (
            self.straight_through or self.in_place_codebook_optimizer is not None or self.aux.needs_learnable_codes
            or self.aux.codebook_diversity_loss_weight > 0
        ):
            raise ValueError(
                "codebook_transform_fn needs heads=1, no topk or indices, no stochastic sampling, in-place "
                "optimizer, cross-entropy commitment or diversity loss"
            )

    def _transformed_forward(
        self, x: Tensor, x_last: Tensor, z: Tensor, books: Tensor, weights: tuple[float, float], fn: Any,
        mask: Tensor | None, update: bool,
    ) -> QuantizerOutput:
        """Quantize each position against its own codebook ``fn(books)`` (the peer's codebook_transform_fn).

        Args:
            x, x_last: the input as given and channel-last. z: (B, ..., 1, cd) the projected rows.
            books: (1, K, cd) the codes the search would see. weights: (commitment, codebook) weights.
            fn: books -> (1, B, N, K, cd) per-position codes (B, N: z's leading axes).
            mask: (B, N) bool or None. update: whether this call updates the codebook's statistics.

        Returns:
            QuantizerOutput(quantized like x, indices z's leading shape (-1 where masked), 0-d loss).

        Raises:
            ValueError: fn returned a tensor of the wrong size.
        """
        rows = z.squeeze(-2)  # (B, N, cd)
        per_row = fn(books)
        expected = rows.numel() * books.shape[-2]
        if not isinstance(per_row, Tensor) or per_row.numel() != expected or per_row.shape[-1] != rows.shape[-1]:
            got = tuple(per_row.shape) if isinstance(per_row, Tensor) else type(per_row).__name__
            raise ValueError(f"codebook_transform_fn must return (1, {', '.join(map(str, rows.shape[:-1]))}, "
                             f"{books.shape[-2]}, {rows.shape[-1]}) per-position codes, got {got}")
        per_row = self._unit(per_row.reshape(*rows.shape[:-1], *books.shape[-2:]))  # (B, N, K, cd)
        with torch.no_grad():  # the search: squared distances (cosine: the largest dot product)
            rows32, codes32 = rows.float().unsqueeze(-2), per_row.float()
            if self.use_cosine_sim:
                idx = (rows32 * codes32).sum(-1).argmax(-1)
            else:
                idx = (rows32 - codes32).pow(2).sum(-1).argmin(-1)  # (B, N)
        codes = per_row.gather(-2, idx[..., None, None].expand(*idx.shape, 1, rows.shape[-1])).squeeze(-2)
        valid_rows, valid_codes = (rows, codes) if mask is None else (rows[mask], codes[mask])
        loss = assignment.code_losses(valid_rows, valid_codes, *weights)
        if self.training:  # the straight-through value; the estimator decides where gradients go
            zq = self._estimate(rows, codes.detach() + (rows - rows.detach()), codes, books, idx, x.requires_grad)
        else:
            zq = codes
        if update:
            codebook.update_books_(self._codebook, self.updater, valid_rows.detach().unsqueeze(-2),
                                   idx.unsqueeze(-1) if mask is None else idx[mask].unsqueeze(-1))
        loss, _ = self._losses(z, valid_rows.unsqueeze(-2), books, idx.unsqueeze(-1), loss, weights,
                               torch.zeros((), device=x.device))
        if mask is not None:
            idx = idx.masked_fill(~mask, -1)
        out = self.project_out(zq)
        if mask is not None:
            out = fill_padding(out, x_last, mask, self.return_zeros_for_masked_padding)
        return QuantizerOutput(from_channel_last(out.to(x.dtype), self.channel_last), idx, loss)

    def _check_topk(self, topk: int | None) -> int | None:
        """``topk`` clipped to K, as the peer; ValueError where the peer refuses it."""
        if topk is None:
            return None
        topk = min(positive_int(topk, "topk"), self.codebook_size)
        if self.heads != 1 or (self.training and (
            self.aux.commitment_use_cross_entropy_loss or self.in_place_codebook_optimizer is not None
        )):
            raise ValueError(
                "topk is supported for heads=1, without cross-entropy commitment or in-place optimizer in training"
            )
        return topk

    def _topk_forward(
        self, x: Tensor, x_last: Tensor, z: Tensor, books: Tensor, topk: int, temperature: float, mask: Tensor | None
    ) -> QuantizerOutput:
        """The peer's topk branch: the k best codes per vector, no codebook update.

        Returns quantized (B, ..., k, dim) in x's layout with the k axis before the features, indices
        (B, ..., k), and loss (B, ..., k): the per-vector weighted squared error (0 at masked positions).
        """
        stochastic = self.training and self.stochastic_sample_codes
        codes, idx = assignment.sampled(
            z, books, temperature, stochastic=stochastic, straight_through=False,
            use_cosine_sim=self.use_cosine_sim, topk=topk,
        )  # (B, ..., 1, k, cd), (B, ..., 1, k)
        codes, idx = codes.squeeze(-3), idx.squeeze(-2)
        rows = z.expand(*z.shape[:-2], topk, z.shape[-1])  # (B, ..., k, cd)
        per_vector = (rows - codes).pow(2).mean(-1)  # (B, ..., k)
        if mask is not None:
            per_vector = per_vector * mask.reshape(*mask.shape, *([1] * (per_vector.dim() - mask.dim())))
            idx = idx.masked_fill(~mask.reshape(*mask.shape, *([1] * (idx.dim() - mask.dim()))), -1)
        if self.training:
            codes = rotate_to(rows, codes) if self.rotation_trick else codes.detach() + (rows - rows.detach())
        has_commitment = self.commitment_weight > 0 and not self.directional_reparam
        if has_commitment:
            loss = self.commitment_weight * per_vector
        else:  # the peer scores candidates by the unweighted error in eval, and has no loss in training
            loss = per_vector if not self.training else per_vector.new_zeros(())
        out = self.project_out(codes)  # (B, ..., k, dim)
        if mask is not None:
            fill = torch.zeros_like(x_last) if self.return_zeros_for_masked_padding else x_last
            out = torch.where(mask[..., None, None], out, fill.unsqueeze(-2).to(out.dtype))
        if not self.channel_last:
            out = out.movedim(-1, 1)
        return QuantizerOutput(out.to(x.dtype), idx, loss)

    # -- the peer's manual controls -----------------------------------------------------------------

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer on the gradients accumulated so far (ranks averaged)."""
        if self.in_place_codebook_optimizer is not None:
            optimizer_step_(self.in_place_codebook_optimizer, self._codebook.parameters())

    def expire_codes_(self, x: Tensor) -> None:
        """Dead-code revival from rows ``x`` (..., heads * codebook_dim) already in the code space
        (training only, as the peer's; a no-op without ``threshold_ema_dead_code``)."""
        if self.training:
            codebook.expire_codes_(self._codebook, self.updater, self._split_heads(x.detach()))

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """Update the codebook (EMA statistics, codes, revival) from ``x`` and GIVEN ``indices``, as
        the peer's ``update_indices`` (used after a beam search): x in the forward's layout, indices
        as the forward returns them. Positions with index -1 or masked out are not counted (the peer
        counts -1 as code 0 without a mask)."""
        check_float_tensor(x, "x", min_dim=2)
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        mask = sequence_mask(x, mask, None, self.channel_last, fmap)
        x_last = fmap_to_channel_last(x, self.dim, self.channel_last, self.accept_image_fmap, self.accept_3d_fmap)
        z = self._split_heads(self.project_in(x_last))
        idx = with_heads_axis(check_indices(indices, self.codebook_size, low=-1), self.heads).long()
        if mask is not None:
            idx = idx.masked_fill(~mask[..., None], -1)
        keep = (idx >= 0).all(-1)
        rows, idx = z[keep], idx[keep]
        if self.affine_param:
            rows = affine.affine_rows(self._codebook, rows, books_axis=-2)
        codebook.update_books_(self._codebook, self.updater, rows, idx)

    update_ema_indices = update_indices  # the peer's older name

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
