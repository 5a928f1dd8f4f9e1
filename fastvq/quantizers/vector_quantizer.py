"""VectorQuantizer (alias VectorQuantize): vector-quantize-pytorch's VectorQuantize, drop-in.

The same constructor and forward keywords, defaults, returns and state_dict keys as the peer's
release 1.32 for the options implemented here; every other peer keyword is accepted at its
default value and raises NotImplementedError (naming it) at any other value.

A composition of parts: layouts (layout.py), assignment (assignment.py: nearest code through the
fused op), gradient estimators (gradients.py), and the codebook's state and updates
(codebook.py: the ``_codebook`` submodule, EMA, k-means init, dead codes, DDP sync, telemetry).
This file holds the options, the heads and projections, masks, and the order the parts run in.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, check_weight, positive_int
from fastvq.quantizers import assignment, codebook
from fastvq.quantizers.gradients import rotate_to
from fastvq.quantizers.layout import from_channel_last, projections, to_channel_last
from fastvq.quantizers.output import QuantizerOutput

# Peer constructor keywords not implemented here, with the peer's defaults (accepted at these values).
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "sync_kmeans": True,
    "layernorm_after_project_in": False,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_codebook": None,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "route_gradients_to_input": True,
}

# Codebook keys of fastvq checkpoints before the peer's keys (module level) -> their new names.
_OLD_KEYS = {
    "embed": "_codebook.embed",
    "ema_count": "_codebook.cluster_size",
    "ema_sum": "_codebook.embed_avg",
    "initted": "_codebook.initted",
}


def check_unsupported(where: str, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """TypeError for a keyword the peer does not have either; NotImplementedError for a peer keyword
    given at a value other than its default (the peer's option that fastvq does not implement)."""
    for name, value in given.items():
        if name not in defaults:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        default = defaults[name]
        if value is not default and value != default:
            raise NotImplementedError(
                f"{where}: vector-quantize-pytorch's option {name}={value!r} is not implemented in fastvq "
                f"(only its default {default!r} is accepted)"
            )


class LossBreakdown(NamedTuple):
    """The peer's loss breakdown (``return_loss_breakdown=True``): unweighted terms, 0-d."""

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


class QuantizerOutputWithBreakdown(NamedTuple):
    """What ``forward(..., return_loss_breakdown=True)`` returns: the peer's four values."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    loss_breakdown: LossBreakdown


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
        if codebook_init not in ("kaiming_uniform", "normal"):
            raise ValueError(f"codebook_init must be 'kaiming_uniform' or 'normal', got {codebook_init!r}")
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
        if codebook_init == "normal":  # drawn with kmeans_init too (then overwritten), as fastvq always did
            init = F.normalize(torch.randn(shape), dim=-1) if use_cosine_sim else torch.randn(shape)
        elif kmeans_init:  # the peer's: zeros until the first training batch
            init = torch.zeros(shape)
        else:  # the peer's: kaiming-uniform over the (books, K, D) tensor, bound sqrt(6 / (K D))
            init = nn.init.kaiming_uniform_(torch.empty(shape))
            init = F.normalize(init, dim=-1) if use_cosine_sim else init
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

    def _to_channel_last(self, x: Tensor) -> Tensor:
        if self.accept_3d_fmap:
            if x.dim() != 5 or x.shape[1] != self.dim:
                raise ValueError(
                    f"x must be a (B, {self.dim}, D, H, W) map (accept_3d_fmap=True), got shape {tuple(x.shape)}"
                )
            return x.movedim(1, -1)
        return to_channel_last(x, self.dim, self.channel_last, self.accept_image_fmap)

    def _mask(self, x: Tensor, mask: Tensor | None, lens: Tensor | None) -> Tensor | None:
        """(B, N) bool mask of the valid positions of a (B, N, dim) / (B, dim, N) input, or None."""
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if mask is None and lens is None:
            return None
        if self.accept_image_fmap or self.accept_3d_fmap or x.dim() != 3:
            raise ValueError(f"mask / lens need a (B, N, dim) or (B, dim, N) input, got shape {tuple(x.shape)}")
        length = x.shape[1] if self.channel_last else x.shape[2]
        if lens is not None:
            mask = torch.arange(length, device=x.device) < lens.to(x.device)[:, None]
        if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], length):
            want = (x.shape[0], length)
            raise ValueError(f"mask must be a bool tensor of shape {want}, got {mask.dtype} {tuple(mask.shape)}")
        return mask

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
        check_unsupported(
            f"{type(self).__name__}.forward",
            {"indices": indices, "topk": topk, "codebook_transform_fn": codebook_transform_fn,
             "ema_update_weight": ema_update_weight, "accum_ema_update": accum_ema_update},
            {"indices": None, "topk": None, "codebook_transform_fn": None, "ema_update_weight": None,
             "accum_ema_update": False},
        )
        skip_ema = ema_update is not None and bool(ema_update) != self.ema_update
        if skip_ema and (ema_update or self.threshold_ema_dead_code):
            raise NotImplementedError(
                f"{type(self).__name__}.forward: ema_update={ema_update!r} is implemented only as False on an EMA "
                "codebook without dead-code revival (skip this forward's update)"
            )
        check_float_tensor(x, "x", min_dim=2)
        mask = self._mask(x, mask, lens)
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        x_last = self._to_channel_last(x)  # (B, ..., dim)
        z = self.project_in(x_last)
        lead = z.shape[:-1]
        z = z.reshape(*lead, self.heads, self.codebook_dim)  # (B, ..., H, cd)
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        rows = z if mask is None else z[mask]  # (M, H, cd) with a mask: only the valid positions
        if self.training and not self._codebook._initted:
            self._init_codebooks(rows.detach())

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
            self._update_codebooks(rows.detach(), idx)
        commitment = loss / sum(weights) if sum(weights) > 0 else loss.detach() * 0  # each term is mse(z, e)
        if self._one_term and codebook_weight:
            loss = loss - (codebook_weight * commitment).detach()  # value cw * mse, gradients unchanged
        if not (self.training or self.eval_loss):
            loss = commitment = torch.zeros((), device=x.device)

        if mask is not None:
            zq = zq.new_zeros(*lead, self.heads, self.codebook_dim).index_put((mask,), zq)
            idx = idx.new_full((*lead, self.heads), -1).index_put((mask,), idx)
        zq = self.project_out(zq.reshape(*lead, self.heads * self.codebook_dim))
        if mask is not None:
            fill = torch.zeros_like(x_last) if self.return_zeros_for_masked_padding else x_last
            zq = torch.where(mask[..., None], zq, fill.to(zq.dtype))
        if self.heads == 1:
            idx = idx.squeeze(-1)
        out = QuantizerOutput(from_channel_last(zq.to(x.dtype), self.channel_last), idx, loss)  # x's dtype, as theirs
        if not return_loss_breakdown:
            return out
        zero = torch.zeros((), device=x.device)
        return QuantizerOutputWithBreakdown(*out, LossBreakdown(commitment, zero, zero, zero))

    def _init_codebooks(self, z: Tensor) -> None:
        """k-means on the first training batch z (..., H, cd), one run per codebook."""
        for state, rows in zip(self._codebook.states(), self._rows_per_book(z), strict=True):
            self.updater.kmeans_init_(state, rows)
        self._codebook.mark_initted()

    def _update_codebooks(self, z: Tensor, idx: Tensor) -> None:
        """EMA / revival / telemetry from the batch z (..., H, cd) and its indices (..., H)."""
        codes = [c.reshape(-1) for c in self._rows_per_book(idx.unsqueeze(-1))]  # (M,) per book
        books = zip(self._codebook.states(), self._rows_per_book(z), codes, strict=True)
        self._codebook.record_usage_([self.updater.update_(state, rows, c) for state, rows, c in books])

    def _rows_per_book(self, t: Tensor) -> list[Tensor]:
        """Per codebook, its rows of ``t`` (..., H, C): (M, C), every head's rows for a shared book."""
        if self.separate_codebook_per_head:
            return [t[..., h, :].reshape(-1, t.shape[-1]) for h in range(self.heads)]
        return [t.reshape(-1, t.shape[-1])]

    # -- checkpoints ------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fastvq checkpoints before the peer's keys held the codebook at the module level, with a
        # (K, D) ``embed`` for one codebook: rename (and add the books axis) before loading.
        for old, new in _OLD_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                value = state_dict.pop(prefix + old)
                if old in ("embed", "ema_sum") and value.dim() == 2:
                    value = value.unsqueeze(0)
                if old == "ema_count" and value.dim() == 1:
                    value = value.unsqueeze(0)
                state_dict[prefix + new] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- decoding ---------------------------------------------------------------------------------

    def _codes(self, indices: Tensor) -> Tensor:
        """(B, ..., heads * codebook_dim) codes of indices (the forward's index shape), channel-last."""
        check_indices(indices, self.codebook_size)
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must end in a heads axis of size {self.heads}, got shape {tuple(indices.shape)}")
        idx = indices if self.heads > 1 else indices.unsqueeze(-1)  # (B, ..., H)
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
