"""Residual quantization (SoundStream, Zeghidour et al. 2021, Algorithm 1): a generic stack of any
quantizers (``ResidualStack``) and ResidualVQ, vector-quantize-pytorch's ResidualVQ, drop-in.

Stage 0 quantizes the input, stage q quantizes what the stages before it left over, and the output
is the sum of the stages' codes:

    r_0 = x;   e_q = Q_q(r_q);   r_{q+1} = r_q - (f e_q + (1 - f) sg(e_q));   quantized = sum_q e_q

with f = ``quant_grad_frac`` (default 0: the residual is detached from the earlier codes).

Gradients to the input (``stack_estimator``):

* None (default, the peer's): every stage's output keeps the estimator its stage gives it (a
  VectorQuantizer stage's rotation trick, on by default for codebook_dim > 1, or straight-through;
  FSQ / LFQ stages their own straight-through rounding / sign) and the stack sums them. With f = 0
  each r_q has Jacobian I to x, so d quantized / d x is the sum of the active stages' estimators
  (Q x I when all are straight-through).
* "straight_through" / "rotation_trick" (fastvq): the stage outputs are detached and ONE estimator
  carries x to the sum of the codes (d quantized / d x = I for straight-through, as one
  VectorQuantizer and SoundStream / EnCodec). The stages' losses still see their own residuals.

Each stage's loss sees its own residual r_q, so every stage's commitment term reaches the input.

Quantize dropout (SoundStream's bitrate scalability): in training, each forward keeps stages
0..j and drops the rest, j drawn uniformly from [quantize_dropout_cutoff_index, Q - 1] and then
rounded as the peer's ``round_up_multiple(j + 1, quantize_dropout_multiple_of) - 1``. The draw
is Python's ``random.Random(seed).randrange`` when a seed is given (the peer's draw, so both pick
the same stages), else one draw from ``generator`` / torch's global CPU generator, broadcast from
rank 0 under torch.distributed. Dropped stages do not run and get index -1 and loss 0.
In eval mode every stage runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, int_at_least, nonnegative_int, positive_int
from fastvq.distributed import broadcast_, is_distributed
from fastvq.quantizers import codebook
from fastvq.quantizers.gradients import estimate
from fastvq.quantizers.implicit_codebook import ImplicitCodebookMLP
from fastvq.quantizers.layout import (
    common_input_dim,
    fill_padding,
    from_channel_last,
    projections,
    resolve_channel_last,
    sequence_mask,
    to_channel_last,
)
from fastvq.quantizers.output import ResidualVQOutput, ResidualVQOutputWithCodes
from fastvq.quantizers.vector_quantizer import VectorQuantizer

STACK_ESTIMATORS = (None, "straight_through", "rotation_trick")

# The peer's DiVeQ noise on the direction of the error (its directional_reparam default).
_DIVEQ_VARIANCE = 5e-3


def draw_active_stages(
    num_stages: int,
    cutoff_index: int,
    generator: torch.Generator | None = None,
    multiple_of: int = 1,
    seed: int | None = None,
) -> int:
    """How many leading stages run this batch: 1 + j, j uniform in [cutoff_index, num_stages - 1],
    rounded up so that j + 1 is a multiple of ``multiple_of`` (at most ``num_stages``).

    With ``seed`` the draw is ``random.Random(seed).randrange(cutoff_index, num_stages)``, the
    peer's, so a fixed seed picks the same stages in both. Otherwise one CPU draw from
    ``generator`` (no device synchronisation), under torch.distributed rank 0's draw broadcast:
    each stage's training forward may be a collective (EMA / usage all-reduce), so ranks that ran
    different stages would hang or mix the stages' statistics.
    """
    if seed is not None:
        last = random.Random(seed).randrange(cutoff_index, num_stages)
    else:
        drawn = torch.randint(cutoff_index, num_stages, (1,), generator=generator)
        if is_distributed():
            # gloo takes the CPU tensor; NCCL needs it on the rank's device.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            drawn = broadcast_(drawn.to(device)).cpu()
        last = int(drawn)
    if multiple_of != 1:
        last = math.ceil((last + 1) / multiple_of) * multiple_of - 1
    return min(last + 1, num_stages)


def frac_gradient(e: Tensor, frac: float) -> Tensor:
    """e's value with a fraction ``frac`` of its gradient: f e + (1 - f) sg(e) (sg(e) for f <= 0)."""
    if frac <= 0:
        return e.detach()
    return frac * e + (1.0 - frac) * e.detach()


class Beam:
    """The candidates of a residual beam search, j per position (j = 1 at the start).

    Every tensor has the positions' axes ``P`` first and the candidate axis after them:
    ``scores`` (*P, j) minus the weighted sum of the candidate's stage losses; ``residual`` and
    ``quantized`` (*P, j, cd) what is left and the sum of the codes so far; ``inputs`` (*P, j, L, cd)
    the residual each of the L stages so far saw (detached); ``indices`` (*P, j, L) int64 and
    ``losses`` (*P, j, L) the stages' codes and per-vector losses. The beam holds O(P * j * L * cd),
    never a position-by-code matrix.

    Args:
        flat: (*P, cd) float, the stack's input in the residual space.
    """

    def __init__(self, flat: Tensor) -> None:
        self.axis = flat.dim() - 1  # the candidate axis
        start = flat.unsqueeze(-2)  # (*P, 1, cd)
        self.scores = flat.new_zeros(*flat.shape[:-1], 1)
        self.residual, self.quantized = start, torch.zeros_like(start)  # zeros + e: the peer's arithmetic
        self.inputs = flat.new_zeros(*start.shape[:-1], 0, flat.shape[-1]).detach()
        self.indices = torch.zeros(*start.shape[:-1], 0, dtype=torch.long, device=flat.device)
        self.losses = torch.zeros(*start.shape[:-1], 0, dtype=torch.float32, device=flat.device)

    def extend(self, e: Tensor, e_residual: Tensor, idx: Tensor, loss: Tensor, weight: Tensor | float) -> None:
        """Replace each candidate by its k continuations with the next stage's codes.

        Args:
            e: (*P, j, k, cd) the stage's k best codes for each candidate's residual, with the
                stage's gradient estimator; ``e_residual`` the same value with the gradient the next
                residual carries (quant_grad_frac).
            idx: (*P, j, k) int64 their indices; ``loss`` (*P, j, k) their per-vector losses.
            weight: this stage's weight in the score (beam_score_quantizer_weights).
        """
        k = idx.shape[-1]
        self.inputs = torch.cat((self.inputs, self.residual.detach().unsqueeze(-2)), -2)
        self.scores = (self.scores.unsqueeze(-1) - loss * weight).flatten(-2)  # (*P, j * k)
        self.residual = (self.residual.unsqueeze(-2) - e_residual).flatten(-3, -2)
        self.quantized = (self.quantized.unsqueeze(-2) + e).flatten(-3, -2)
        self.inputs = self.inputs.repeat_interleave(k, self.axis)
        self.indices = torch.cat((self.indices.repeat_interleave(k, self.axis), idx.flatten(-2).unsqueeze(-1)), -1)
        self.losses = torch.cat((self.losses.repeat_interleave(k, self.axis), loss.flatten(-2).unsqueeze(-1)), -1)

    def keep(self, width: int) -> None:
        """Keep the ``width`` best-scoring candidates per position (all when there are no more)."""
        if self.scores.shape[-1] <= width:
            return
        self.scores, pick = self.scores.topk(width, dim=-1)  # (*P, width), torch.topk as the peer's
        for name in ("residual", "quantized", "inputs", "indices", "losses"):
            value = getattr(self, name)
            setattr(self, name, torch.take_along_dim(value, _trailing_ones(pick, value.dim()), self.axis))

    def best(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(quantized (*P, cd), indices (*P, L), losses (*P, L), inputs (*P, L, cd)) of the first
        (after ``keep(1)``: the best) candidate."""
        return tuple(t.select(self.axis, 0) for t in (self.quantized, self.indices, self.losses, self.inputs))


def _trailing_ones(t: Tensor, ndim: int) -> Tensor:
    """t viewed with size-1 axes appended up to ``ndim`` axes (to broadcast an index along them)."""
    return t.reshape(*t.shape, *([1] * (ndim - t.dim())))


def _beam_as_sequence(residual: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(*P, j, cd) candidates as the (B, N * j, cd) sequence a stage takes, and the (B, N) mask
    repeated for the j candidates of each position."""
    stage_in = residual.reshape(residual.shape[0], -1, residual.shape[-1])
    if mask is None:
        return stage_in, None
    return stage_in, mask.repeat_interleave(residual.shape[-2], 1)


def _average_over_valid(per_vector: Tensor, mask: Tensor | None) -> Tensor:
    """(*P, L) per-position losses -> (L,): their mean, or with a (B, N) mask the sum over valid
    positions divided by their number (the peer's beam-search stage losses)."""
    if mask is None:
        return per_vector.flatten(0, -2).mean(0)
    kept = torch.where(mask.unsqueeze(-1), per_vector, 0.0)
    return kept.flatten(0, -2).sum(0) / mask.sum().clamp_min(1e-4)


class ResidualStack(nn.Module):
    """Residual quantization over any stages (module docstring).

    Args:
        layers: the stages Q_0 .. Q_{Q-1} (at least one): channel-last quantizers (VectorQuantizer,
            FSQ, LFQ, ...) with equal input size ``layer.dim`` (the residual space), whose forward
            returns ``(quantized, indices[, loss])`` (no loss counts as 0; 4-D+ inputs reach the
            stages as (B, N, dim)), indices of the input's shape minus the feature axis, and which have
            ``codebook_size`` and ``get_output_from_indices``. Registered as ``layers``.
        dim: feature size of the input. Default: the stages' ``dim``; any other value adds
            ``project_in`` / ``project_out`` (Linear) around the whole stack.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: module
            docstring; the cutoff lies in [0, Q - 1]. Default False, 0, 1. Off when Q = 1 (the peer's).
        quant_grad_frac: f in [0, 1], the fraction of each code's gradient the next residual
            carries (the peer's frac_gradient). Default 0.
        stack_estimator: None (each stage's own estimator, summed; the peer's), "straight_through"
            or "rotation_trick" (one estimator for the whole sum; stage outputs detached).
        channel_last, accept_image_fmap: input layouts, as VectorQuantizer. The stack converts once
            and runs its stages channel-last.
        return_zeros_for_masked_padding: with a ``mask``, padded positions output 0 (else the input).
        beam_score_quantizer_weights: one weight per stage of its losses in the beam-search score
            (forward ``beam_size``). Default all 1.

    Input ``z``: (B, ..., dim) float, or (B, dim, ...) when features are not last.
    Output: ``ResidualVQOutput(quantized, indices, losses)``: quantized has z's shape; indices int64
    (..., Q), z's shape minus the feature axis plus a trailing stage axis (-1 for dropped stages);
    losses (Q,) the stages' losses (0 for dropped stages). ``last_losses`` (Q,) holds them detached.

    Raises:
        ValueError: no stages, stages of different sizes, bad options (in ``__init__``); input of the
        wrong shape.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        dim: int | None = None,
        *,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        quant_grad_frac: float = 0.0,
        stack_estimator: str | None = None,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        beam_score_quantizer_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        layers = list(layers)
        codebook_dim = common_input_dim(layers, "layers")
        dim = codebook_dim if dim is None else positive_int(dim, "dim")
        nonnegative_int(quantize_dropout_cutoff_index, "quantize_dropout_cutoff_index")
        if quantize_dropout_cutoff_index >= len(layers):
            raise ValueError(
                f"quantize_dropout_cutoff_index must be < num_quantizers = {len(layers)}, "
                f"got {quantize_dropout_cutoff_index}"
            )
        if stack_estimator not in STACK_ESTIMATORS:
            raise ValueError(f"stack_estimator must be one of {STACK_ESTIMATORS}, got {stack_estimator!r}")
        if isinstance(quant_grad_frac, bool) or not isinstance(quant_grad_frac, (int, float)) or not (
            0 <= quant_grad_frac <= 1
        ):
            raise ValueError(f"quant_grad_frac must be a float in [0, 1], got {quant_grad_frac!r}")
        if stack_estimator is not None and quant_grad_frac > 0:
            # The stage outputs are detached under one stack estimator: no code gradient to share.
            raise ValueError(f"quant_grad_frac > 0 needs stack_estimator=None, got {stack_estimator!r}")
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_quantizers = len(layers)
        self.quantize_dropout = bool(quantize_dropout) and len(layers) > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = positive_int(quantize_dropout_multiple_of, "quantize_dropout_multiple_of")
        self.quant_grad_frac = float(quant_grad_frac)
        self.stack_estimator = stack_estimator
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)

        self.project_in, self.project_out = projections(dim, codebook_dim)
        self.has_projections = dim != codebook_dim
        self.layers = nn.ModuleList(layers)
        self.register_buffer("last_losses", torch.zeros(len(layers)), persistent=False)
        if beam_score_quantizer_weights is not None and len(beam_score_quantizer_weights) != len(layers):
            raise ValueError(
                f"beam_score_quantizer_weights needs one weight per stage ({len(layers)}), "
                f"got {len(beam_score_quantizer_weights)}"
            )
        weights = [1.0] * len(layers) if beam_score_quantizer_weights is None else list(beam_score_quantizer_weights)
        self.register_buffer("beam_score_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Each stage's number of codes."""
        return tuple(layer.codebook_size for layer in self.layers)

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(Q, K, codebook_dim): each stage's ``codebook`` in the residual space; a tuple of (K_q,
        codebook_dim) when the stages' sizes differ (the peer's)."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        z: Tensor,
        mask: Tensor | None = None,
        indices: Tensor | None = None,
        return_all_codes: bool = False,
        *,
        rand_quantize_dropout_fixed_seed: int | None = None,
        generator: torch.Generator | None = None,
        beam_size: int | None = None,
        **stage_kwargs: Any,
    ) -> ResidualVQOutput | ResidualVQOutputWithCodes | tuple[Tensor, Tensor]:
        """Quantize ``z``; see the class docstring for layouts and outputs.

        Args:
            z: (B, ..., dim) float tensor (or the layout set by channel_last / accept_image_fmap).
            mask: (B, N) bool, True = valid, for (B, N, dim) / (B, dim, N) sequences; passed to the
                stages, and padded outputs become 0 (or z, see return_zeros_for_masked_padding).
            indices: int (..., Q) target codes (no -1): cross-entropy mode, stage q gets
                ``indices=indices[..., q]`` and returns (quantized, ce loss); no quantize dropout.
            return_all_codes: also return every stage's codes, (Q, B, ..., codebook_dim).
            rand_quantize_dropout_fixed_seed: seed of the quantize-dropout draw (module docstring).
            generator: CPU torch.Generator for the draw without a seed; default torch's global one.
            beam_size: > 1 searches the stages' codes with a beam of this width (``_beam_stages``;
                stages with forward ``topk`` and ``update_indices``); ignored in cross-entropy mode.
            **stage_kwargs: passed to every stage's forward.

        Returns:
            ResidualVQOutput(quantized, indices (..., Q), losses (Q,)), with ``all_codes`` when
            asked; in cross-entropy mode (quantized, sum of the stages' ce losses).

        Raises:
            ValueError: bad z, mask or indices.
        """
        check_float_tensor(z, "z", min_dim=2)
        mask = sequence_mask(z, mask, None, self.channel_last, self.accept_image_fmap)
        x = self.project_in(to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap))
        # Stages see (B, N, dim) for 4-D+ input: peer-style stages (FSQ, LFQ) read 4-D+ as channel-first.
        flat = x if x.dim() <= 3 else x.flatten(1, -2)
        ce_mode = indices is not None
        if ce_mode:
            indices = self._check_target_indices(indices, x)
        if mask is not None:
            stage_kwargs["mask"] = mask
        active = self.num_quantizers
        if self.training and self.quantize_dropout and not ce_mode:
            active = draw_active_stages(
                self.num_quantizers, self.quantize_dropout_cutoff_index, generator,
                self.quantize_dropout_multiple_of, rand_quantize_dropout_fixed_seed,
            )

        if beam_size is not None and positive_int(beam_size, "beam_size") > 1 and not ce_mode:
            quantized, stage_indices, losses, stage_inputs = self._beam_stages(
                flat, active, beam_size, mask, stage_kwargs
            )
        else:
            quantized, stage_indices, losses, stage_inputs = self._greedy_stages(flat, active, indices, stage_kwargs)
        stage_indices = [idx.long().reshape(*x.shape[:-1], *idx.shape[flat.dim() - 1 :]) for idx in stage_indices]
        self._after_stages(stage_inputs, mask)

        quantized = self._output_estimator(flat, quantized)
        out = self.project_out(quantized.reshape(x.shape))
        if mask is not None:
            out = fill_padding(out, to_channel_last(z, self.dim, self.channel_last, False), mask,
                               self.return_zeros_for_masked_padding)
        out = from_channel_last(out, self.channel_last)
        if ce_mode:
            return out, sum(losses)

        stage_losses = torch.stack([loss.reshape(()).float() for loss in losses])
        stage_losses = torch.cat([stage_losses, stage_losses.new_zeros(self.num_quantizers - active)])  # (Q,)
        stage_indices.extend(torch.full_like(stage_indices[0], -1) for _ in range(self.num_quantizers - active))
        all_indices = torch.stack(stage_indices, -1)
        with torch.no_grad():
            self.last_losses.copy_(stage_losses.detach())
        if not return_all_codes:
            return ResidualVQOutput(out, all_indices, stage_losses)
        return ResidualVQOutputWithCodes(out, all_indices, stage_losses, self.get_codes_from_indices(all_indices))

    def _greedy_stages(
        self, flat: Tensor, active: int, indices: Tensor | None, stage_kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """Run stages 0 .. active - 1, each on the residual the ones before it left (module docstring).

        Args:
            flat: (B, [N,] codebook_dim) the stack's input in the residual space.
            active: number of leading stages to run.
            indices: (..., Q) target codes (cross-entropy mode) or None.
            stage_kwargs: keywords every stage's forward gets.

        Returns:
            (sum of the stages' outputs like ``flat``, each stage's indices (none in cross-entropy
            mode), each stage's loss, each stage's detached residual input).
        """
        residual, quantized = flat, None
        stage_inputs, stage_indices, losses = [], [], []
        for q, layer in enumerate(self.layers[:active]):
            stage_inputs.append(residual.detach())
            kwargs = self._stage_codebook(q, quantized) | stage_kwargs
            if indices is not None:
                e, loss = layer(residual, indices=indices[..., q].reshape(flat.shape[:-1]), **kwargs)
            else:
                e, idx, *loss = layer(residual, **kwargs)  # (quantized, indices[, loss]): FSQ has no loss
                stage_indices.append(idx)
                loss = loss[0] if loss else flat.new_zeros(())
            if self.stack_estimator is not None:
                e = e.detach()  # the stack's one estimator below carries the output's gradient
            residual = residual - frac_gradient(e, self.quant_grad_frac)
            quantized = e if quantized is None else quantized + e
            losses.append(loss)
        return quantized, stage_indices, losses, stage_inputs

    def _beam_stages(
        self, flat: Tensor, active: int, beam_size: int, mask: Tensor | None, stage_kwargs: dict[str, Any]
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """Beam search over the stages' codes (the peer's ``is_beam_search`` branch; ``Beam``).

        Each stage proposes its ``beam_size`` best codes for every kept candidate (its forward with
        ``topk``); a candidate's score is minus the weighted sum of its stages' per-vector losses, and
        the ``beam_size`` best candidates per position go on (one after the last active stage). In
        training the chosen codes then update each stage's codebook (``update_indices``) unless frozen.

        Args:
            flat: (B, [N,] codebook_dim) the stack's input in the residual space.
            active: number of leading stages to run.
            beam_size: candidates kept per position between stages (>= 2).
            mask: (B, N) bool, True = valid, or None.
            stage_kwargs: keywords every stage's forward gets (``mask`` is replaced per stage).

        Returns:
            as ``_greedy_stages``; the losses are the chosen candidate's per-vector losses averaged
            over the valid positions.

        Raises:
            ValueError: a stage without ``topk`` / ``update_indices`` support (VectorQuantizer's).
        """
        if self.num_quantizers > 1 and self._stage_codebook(1, flat):
            raise NotImplementedError("beam search with an implicit neural codebook is not implemented in fastvq")
        if not all(hasattr(layer, "update_indices") for layer in self.layers[:active]):
            raise ValueError("beam search needs stages with forward topk= and update_indices (VectorQuantizer)")
        beam = Beam(flat)
        kwargs = {key: value for key, value in stage_kwargs.items() if key != "mask"}
        for q, layer in enumerate(self.layers[:active]):
            residual = beam.residual  # (*P, j, cd)
            stage_in, stage_mask = _beam_as_sequence(residual, mask)
            e, idx, loss = layer(stage_in, mask=stage_mask, topk=beam_size, **kwargs)
            k = idx.shape[-1]
            e = e.reshape(*residual.shape[:-1], k, residual.shape[-1])  # (*P, j, k, cd)
            if self.stack_estimator is not None:
                e = e.detach()
            idx, loss = idx.reshape(*residual.shape[:-1], k), loss.reshape(*residual.shape[:-1], k)  # (*P, j, k)
            beam.extend(e, frac_gradient(e, self.quant_grad_frac), idx, loss, self.beam_score_weights[q])
            beam.keep(1 if q == active - 1 else beam_size)
        quantized, indices, per_vector, inputs = beam.best()  # (*P, cd), (*P, L), (*P, L), (*P, L, cd)
        losses = list(_average_over_valid(per_vector, mask).unbind(-1))
        stage_indices, stage_inputs = list(indices.unbind(-1)), list(inputs.unbind(-2))
        if self.training:
            freeze_all = bool(stage_kwargs.get("freeze_codebook"))
            for layer, rows, idx in zip(self.layers[:active], stage_inputs, stage_indices, strict=True):
                if not (freeze_all or getattr(layer, "freeze_codebook", False)):
                    layer.update_indices(rows, idx, mask=mask)
        return quantized, stage_indices, losses, stage_inputs

    def _stage_codebook(self, q: int, quantized: Tensor | None) -> dict[str, Any]:
        """Extra keywords of stage q's forward given the sum of the earlier stages' codes (ResidualVQ's
        implicit neural codebook); none here."""
        return {}

    def _check_target_indices(self, indices: Tensor, x: Tensor) -> Tensor:
        """The cross-entropy targets (..., Q) as int64, checked (no -1: every stage needs one)."""
        if isinstance(indices, (list, tuple)):
            indices = torch.stack(list(indices), -1)
        check_indices(indices, max(self.codebook_sizes))
        if tuple(indices.shape) != (*x.shape[:-1], self.num_quantizers):
            raise ValueError(
                f"indices must have shape {(*x.shape[:-1], self.num_quantizers)} (one code per stage), "
                f"got {tuple(indices.shape)}"
            )
        return indices.long()

    def _after_stages(self, stage_inputs: list[Tensor], mask: Tensor | None) -> None:
        """Hook after the stage loop (ResidualVQ's shared EMA codebook); stage_inputs: each ran stage's
        residual input, detached, (B, N, codebook_dim)."""

    def _output_estimator(self, flat: Tensor, quantized: Tensor) -> Tensor:
        """The gradient from the sum of the codes to the stack's input ``flat`` (module docstring)."""
        if self.stack_estimator is None:
            return quantized  # each stage's output already carries its own estimator
        return estimate(flat, quantized, self.stack_estimator == "rotation_trick")

    # -- decoding ---------------------------------------------------------------------------------

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Each stage's codes for ``indices``, before ``project_out`` (the peer's get_codes_from_indices).

        Args:
            indices: int (..., Q') with 1 <= Q' <= num_quantizers, as forward returns (channel-last
                index layout, e.g. (B, H, W, Q') for image maps, or its first Q' stages); -1 entries
                (dropped stages) and missing trailing stages give zero codes.

        Returns:
            (num_quantizers, ..., codebook_dim) float: stage q's codes at position q.

        Raises:
            TypeError: non-integer indices. ValueError: bad stage axis or out-of-range values (CPU only).
        """
        check_indices(indices, max(self.codebook_sizes), low=-1)
        if indices.dim() < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"indices must be (B, ..., Q) with 1 <= Q <= num_quantizers = {self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        codes = []
        for q, layer in enumerate(self.layers):
            if q >= indices.shape[-1]:  # coarse indices: the missing fine stages are dropped ones
                codes.append(torch.zeros_like(codes[0]))
                continue
            idx = indices[..., q]
            code = layer.get_output_from_indices(idx.clamp_min(0))  # stages are channel-last
            codes.append(torch.where((idx >= 0).unsqueeze(-1), code, torch.zeros((), dtype=code.dtype,
                                                                                  device=code.device)))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode stage indices back to the quantized output, in the forward's layout.

        Args:
            indices: as ``get_codes_from_indices``.

        Returns:
            (..., dim) for channel-last layouts, (B, dim, ...) otherwise: project_out of the codes' sum.

        Raises:
            as ``get_codes_from_indices``.
        """
        codes = self.get_codes_from_indices(indices).unbind(0)
        quantized = codes[0]
        for code in codes[1:]:  # in the forward's order, so that decoding reproduces it bitwise
            quantized = quantized + code
        return from_channel_last(self.project_out(quantized), self.channel_last)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_dim={self.codebook_dim}, "
            f"quantize_dropout={self.quantize_dropout}, "
            f"quantize_dropout_cutoff_index={self.quantize_dropout_cutoff_index}, "
            f"quant_grad_frac={self.quant_grad_frac}, stack_estimator={self.stack_estimator!r}, "
            f"channel_last={self.channel_last}"
        )


class ResidualVQ(ResidualStack):
    """vector-quantize-pytorch's ResidualVQ: ``num_quantizers`` VectorQuantizer stages on successive residuals.

    Args (the peer's meaning and default unless said):
        dim: feature size of the input.
        codebook_size: number of codes K of every stage, or a tuple of per-stage sizes (then
            ``num_quantizers`` may be omitted).
        num_quantizers: number of stages Q >= 1 (default: the tuple's length).
        codebook_dim: residual (code) space size; other than ``dim`` adds ``project_in`` /
            ``project_out`` around the whole stack (the stages have no projections).
        shared_codebook: all stages use one codebook module (``layers[0]._codebook``; equal sizes
            needed). With an EMA codebook every stage accumulates its statistics and the stack
            applies them once per step (stages built with ``manual_ema_update=True``), then revives
            dead codes from all stages' residuals, as the peer. Default False.
        diveq: DiVeQ (directional reparameterisation): gradient-trained codebooks without
            commitment loss, quant_grad_frac 1, output directional_reparam(x, sum of codes). Default False.
        heads: must be 1 (as the peer's).
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of, quant_grad_frac,
        return_zeros_for_masked_padding: as ResidualStack (module docstring).
        stack_estimator (fastvq): None (default, the peer's: each stage's own estimator, summed),
            "straight_through" or "rotation_trick" (one estimator from x to the sum of the codes).
        accept_image_fmap, channel_last: input layouts, as VectorQuantizer. The stack converts once
            and runs its stages channel-last.
        beam_size, eval_beam_size: beam search over the stages' codes in training / eval mode (None or
            1: greedy; eval_beam_size defaults to beam_size and needs it). In training the chosen
            codes update the codebooks (``update_indices``) unless frozen.
        beam_score_quantizer_weights: per-stage weights of the losses in the beam score. Default 1.
        implicit_neural_codebook: QINCo (Huijben et al. 2024): stage q > 0 searches its codes
            transformed by an MLP conditioned on the sum of the earlier stages' codes, per position
            (``implicit_codebook.ImplicitCodebookMLP``, keys ``mlps.<q-1>.*``); codes and MLPs are
            trained by gradient (the stages get ``learnable_codebook=True, ema_update=False``).
            Dense by nature: O(B N K codebook_dim) memory per stage. Not with beam search.
        mlp_kwargs: the MLPs' ``dim_hidden``, ``depth`` (default 4).
        **vq_kwargs: passed to every stage's ``VectorQuantizer`` (commitment_weight, rotation_trick,
            ema_update, decay, kmeans_init, threshold_ema_dead_code, use_cosine_sim, backend, ...).

    Forward: ``(quantized, indices, losses)`` (ResidualVQOutput), plus ``all_codes`` with
    ``return_all_codes=True``; (quantized, ce loss) with target ``indices`` (ResidualStack.forward).

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``, including the stages'
        own checks); input of the wrong shape.
        NotImplementedError: beam search with an implicit neural codebook (in forward).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int | tuple[int, ...],
        num_quantizers: int | None = None,
        *,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        diveq: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: Sequence[float] | None = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        stack_estimator: str | None = None,
        channel_last: bool | None = None,
        **vq_kwargs: Any,
    ) -> None:
        # Checked before the stages exist, so that the errors name this class's arguments.
        int_at_least(dim, "dim", 1)
        sizes = _stage_sizes(codebook_size, num_quantizers)
        codebook_dim = dim if codebook_dim is None else int_at_least(codebook_dim, "codebook_dim", 1)
        if heads != 1 or vq_kwargs.get("heads", 1) != 1:
            raise ValueError(f"ResidualVQ supports heads=1 only, got heads={heads!r}")
        if beam_score_quantizer_weights is not None and len(beam_score_quantizer_weights) != len(sizes):
            raise ValueError(
                f"beam_score_quantizer_weights needs one weight per stage ({len(sizes)}), "
                f"got {len(beam_score_quantizer_weights)}"
            )
        _check_beam_sizes(beam_size, eval_beam_size)
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"shared_codebook=True needs equal codebook sizes, got {sizes}")
        if implicit_neural_codebook:  # the peer's: codes and MLPs trained by gradient
            vq_kwargs = vq_kwargs | {"learnable_codebook": True, "ema_update": False}
        stage_kwargs = _stage_kwargs(
            vq_kwargs, shared_codebook, diveq, stack_estimator, return_zeros_for_masked_padding
        )
        stages = [VectorQuantizer(codebook_dim, size, **stage_kwargs) for size in sizes]
        super().__init__(
            stages,
            dim,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            quant_grad_frac=1.0 if diveq else quant_grad_frac,
            stack_estimator=stack_estimator,
            channel_last=channel_last,
            accept_image_fmap=accept_image_fmap,
            return_zeros_for_masked_padding=return_zeros_for_masked_padding,
            beam_score_quantizer_weights=beam_score_quantizer_weights,
        )
        if diveq and stack_estimator is not None:
            raise ValueError(f"diveq=True sets the output's gradient itself: stack_estimator must be None, "
                             f"got {stack_estimator!r}")
        self.diveq = bool(diveq)
        self.shared_codebook = bool(shared_codebook)
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        if implicit_neural_codebook:  # one MLP per stage after the first, keys mlps.<q - 1>.* as the peer's
            cosine = self.layers[0].use_cosine_sim
            self.mlps = nn.ModuleList(
                ImplicitCodebookMLP(codebook_dim, l2norm_output=cosine, **(mlp_kwargs or {}))
                for _ in range(len(sizes) - 1)
            )
        self.beam_size, self.eval_beam_size = beam_size, eval_beam_size if eval_beam_size is not None else beam_size
        if shared_codebook:
            first = self.layers[0]
            for layer in self.layers[1:]:
                layer._codebook = first._codebook  # one codebook (the peer's), registered under every stage

    @property
    def codebook_size(self) -> int:
        """The first stage's number of codes (the peer's)."""
        return self.layers[0].codebook_size

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        indices: Tensor | list[Tensor] | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> ResidualVQOutput | ResidualVQOutputWithCodes | tuple[Tensor, Tensor]:
        """The peer's ResidualVQ.forward; see ``ResidualStack.forward`` for the shared arguments.

        ``sample_codebook_temp`` and ``freeze_codebook`` go to every stage (``freeze_codebook=False``
        leaves each stage's own constructor setting; True freezes every stage for this call);
        ``beam_size`` overrides the constructor's beam width for this call; ``generator`` (fastvq) drives
        the quantize-dropout draw when no seed is given.
        """
        beam = beam_size if beam_size is not None else (self.beam_size if self.training else self.eval_beam_size)
        if indices is not None and self.accept_image_fmap:
            raise ValueError("indices (cross-entropy mode) cannot be combined with accept_image_fmap=True")
        stage_kwargs = {"sample_codebook_temp": sample_codebook_temp, "freeze_codebook": freeze_codebook or None}
        return super().forward(
            x, mask, indices, return_all_codes,
            rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed, generator=generator, beam_size=beam,
            **stage_kwargs,
        )

    def _stage_codebook(self, q: int, quantized: Tensor | None) -> dict[str, Any]:
        """Stage q > 0 of an implicit neural codebook searches codes conditioned on ``quantized``."""
        if not self.implicit_neural_codebook or q == 0:
            return {}
        return {"codebook_transform_fn": partial(self.mlps[q - 1], condition=quantized)}

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """As ``ResidualStack.get_codes_from_indices``; with an implicit neural codebook each stage's
        codes are conditioned on the sum of the earlier stages' codes (dense: O(N K D) per stage)."""
        if not self.implicit_neural_codebook:
            return super().get_codes_from_indices(indices)
        check_indices(indices, max(self.codebook_sizes), low=-1)
        if indices.dim() < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"indices must be (B, ..., Q) with 1 <= Q <= num_quantizers = {self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        codes, total = [], None
        for q, layer in enumerate(self.layers):
            idx = indices[..., q] if q < indices.shape[-1] else torch.full_like(indices[..., 0], -1)
            if q == 0:
                code = layer.get_output_from_indices(idx.clamp_min(0))
            else:
                books = self.mlps[q - 1](layer._unit(layer._codebook.embed[0]), condition=total)  # (B, N', K, cd)
                books = books.reshape(*idx.shape, *books.shape[-2:])
                code = books.gather(-2, idx.clamp_min(0)[..., None, None].expand(*idx.shape, 1, books.shape[-1]))
                code = code.squeeze(-2)
            code = torch.where((idx >= 0).unsqueeze(-1), code, torch.zeros((), dtype=code.dtype, device=code.device))
            total = code if total is None else total + code
            codes.append(code)
        return torch.stack(codes)

    def _after_stages(self, stage_inputs: list[Tensor], mask: Tensor | None) -> None:
        """Shared codebook in training: apply the EMA statistics all stages gathered, once, and revive
        dead codes from every stage's residual (the peer's order)."""
        if not (self.training and self.shared_codebook):
            return
        shared = self.layers[0]
        if shared.ema_update:
            shared._codebook.update_ema()
        if shared.threshold_ema_dead_code > 0:  # the peer's expire_codes_ is a no-op without revival
            residuals = torch.stack(stage_inputs, -2)  # (B, N, L, codebook_dim)
            shared.expire_codes_(residuals.flatten(-3, -2))  # (B, N * L, codebook_dim)

    def _output_estimator(self, flat: Tensor, quantized: Tensor) -> Tensor:
        if not self.diveq:
            return super()._output_estimator(flat, quantized)
        from fastvq.quantizers.gradients import directional_reparam  # being added beside the other estimators

        return directional_reparam(flat, quantized, _DIVEQ_VARIANCE)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_sizes}, num_quantizers={self.num_quantizers}, "
            f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, diveq={self.diveq}, "
            f"quantize_dropout={self.quantize_dropout}, "
            f"quantize_dropout_cutoff_index={self.quantize_dropout_cutoff_index}, "
            f"quantize_dropout_multiple_of={self.quantize_dropout_multiple_of}, "
            f"quant_grad_frac={self.quant_grad_frac}, stack_estimator={self.stack_estimator!r}, "
            f"channel_last={self.channel_last}"
        )


def _stage_sizes(codebook_size: int | tuple[int, ...], num_quantizers: int | None) -> tuple[int, ...]:
    """Per-stage codebook sizes from the peer's ``codebook_size`` (int or tuple) and ``num_quantizers``."""
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(int_at_least(size, "codebook_size", 1) for size in codebook_size)
        if not sizes or (num_quantizers is not None and num_quantizers != len(sizes)):
            raise ValueError(
                f"codebook_size as a tuple needs one size per stage (num_quantizers={num_quantizers}), got {sizes}"
            )
        return sizes
    int_at_least(codebook_size, "codebook_size", 1)
    if num_quantizers is None:
        raise ValueError("num_quantizers is needed when codebook_size is an int, got None")
    return (codebook_size,) * int_at_least(num_quantizers, "num_quantizers", 1)


def _check_beam_sizes(beam_size: int | None, eval_beam_size: int | None) -> None:
    """Beam widths are None or ints >= 1, and eval_beam_size needs beam_size (as the peer's assert)."""
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None:
            positive_int(value, name)
    if eval_beam_size is not None and beam_size is None:
        raise ValueError(f"eval_beam_size={eval_beam_size!r} needs beam_size (the training beam), got None")


def _stage_kwargs(
    vq_kwargs: dict[str, Any], shared_codebook: bool, diveq: bool, stack_estimator: str | None, zeros_for_padding: bool
) -> dict[str, Any]:
    """The keywords every stage's VectorQuantizer gets (the peer's vq_kwargs updates)."""
    kwargs = {"return_zeros_for_masked_padding": zeros_for_padding}
    if stack_estimator is not None:
        # Stage outputs are detached under the stack's estimator: a stage's rotation trick would only cost time.
        kwargs["rotation_trick"] = False
    kwargs |= vq_kwargs
    if diveq:
        if kwargs.get("ema_update"):
            raise ValueError("diveq=True trains the codebook by gradient: it cannot be combined with ema_update=True")
        kwargs |= {"ema_update": False, "learnable_codebook": True, "route_gradients_to_input": False,
                   "commitment_weight": 0.0}
    if shared_codebook:
        ema, _, _ = codebook.resolve_training_mode(
            kwargs.get("ema_update"), kwargs.get("learnable_codebook"), kwargs.get("codebook_weight"), 1.0
        )
        if ema:
            # Each stage accumulates the shared codebook's EMA statistics; the stack applies them once.
            kwargs["manual_ema_update"] = True
    return kwargs
