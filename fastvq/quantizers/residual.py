"""Residual quantization (SoundStream, Zeghidour et al. 2021, Algorithm 1): a generic stack of any
quantizers (``ResidualStack``) and ResidualVQ, the stack of ``fastvq.VectorQuantizer`` stages.

Stage 0 quantizes the input, stage q quantizes what the stages before it left over, and the output
is the sum of the stages' codes:

    r_0 = x;   e_q = Q_q(r_q);   r_{q+1} = r_q - sg(e_q);   quantized = sum_q e_q

Gradients. Each stage's loss sees its own residual r_q, which depends on x with Jacobian I (the
earlier codes are detached), so every stage's commitment term reaches the encoder. The output
carries ONE straight-through estimator for the whole sum: d quantized / d x = I, as for a single
VectorQuantizer and in SoundStream / EnCodec (or, with ``rotation_trick=True``, one rotation-trick
estimator from x to the sum). vector-quantize-pytorch, whose residual is also detached, sums the
stages' straight-through outputs, so its gradient to x is (number of active stages) x I.

Quantize dropout (SoundStream's bitrate scalability): in training, each forward keeps stages
0..j and drops the rest, j drawn uniformly from [quantize_dropout_cutoff_index, num_quantizers - 1]
(one draw per batch, from ``generator`` or torch's global CPU generator, so it is reproducible
under a seed). Dropped stages do not run, contribute nothing to quantized or loss, and get index -1.
In eval mode every stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, int_at_least, nonnegative_int, positive_int
from fastvq.distributed import broadcast_, is_distributed
from fastvq.quantizers.gradients import estimate
from fastvq.quantizers.layout import (
    common_input_dim,
    from_channel_last,
    projections,
    resolve_channel_last,
    to_channel_last,
)
from fastvq.quantizers.output import QuantizerOutput
from fastvq.quantizers.vector_quantizer import VectorQuantizer

# VectorQuantizer options whose state or updates belong to one stage: with one codebook shared by
# all stages they would update it once per stage per step (EMA statistics, k-means initialisation,
# dead-code revival), which the shared mode does not implement.
_PER_STAGE_CODEBOOK_UPDATES = {
    "ema_update": lambda v: bool(v),
    "learnable_codebook": lambda v: v is False,
    "kmeans_init": lambda v: bool(v),
    "threshold_ema_dead_code": lambda v: v > 0,
}


def draw_active_stages(num_stages: int, cutoff_index: int, generator: torch.Generator | None) -> int:
    """How many leading stages run this batch: 1 + j, j uniform in [cutoff_index, num_stages - 1].

    One CPU draw (no device synchronisation), reproducible under a seed. Under torch.distributed
    rank 0's draw is broadcast: each stage's training forward may be a collective (EMA / usage
    all-reduce), so ranks that ran different stages would hang or mix the stages' statistics.
    """
    last = torch.randint(cutoff_index, num_stages, (1,), generator=generator)
    if is_distributed():
        # gloo takes the CPU tensor; NCCL needs it on the rank's device.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        last = broadcast_(last.to(device)).cpu()
    return int(last) + 1


class ResidualStack(nn.Module):
    """Residual quantization over any stages that return ``QuantizerOutput`` (module docstring).

    Args:
        layers: the stages Q_0 .. Q_{Q-1} (at least one): channel-last quantizers (VectorQuantizer,
            FSQ, LFQ, ...) with equal input size ``layer.dim`` (the residual space), whose forward
            returns ``(quantized, indices[, loss])`` (no loss counts as 0; 4-D+ inputs reach the
            stages as (B, N, dim)), indices of the input's shape minus the feature axis, and which have
            ``codebook_size`` and ``get_output_from_indices``. Registered as ``layers``.
        dim: feature size of the input. Default: the stages' ``dim``; any other value adds
            ``project_in`` / ``project_out`` (Linear) around the whole stack.
        quantize_dropout, quantize_dropout_cutoff_index: module docstring; the cutoff lies in
            [0, Q - 1] (at least ``cutoff + 1`` stages always run). Default False, 0.
        rotation_trick: the output's gradient by the rotation trick instead of straight-through.
        channel_last, accept_image_fmap: input layouts, as VectorQuantizer. The stack converts once
            and runs its stages channel-last.

    Input ``z``: (B, ..., dim) float, or (B, dim, ...) when features are not last.
    Output: ``QuantizerOutput(quantized, indices, loss)``: quantized has z's shape; indices int64
    (..., Q), z's shape minus the feature axis plus a trailing stage axis (-1 for dropped stages);
    loss 0-d, the sum of the active stages' losses. ``last_losses`` (Q,) holds the per-stage losses
    of the last forward, detached (0 for dropped stages).

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
        rotation_trick: bool = False,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
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
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_quantizers = len(layers)
        self.quantize_dropout = bool(quantize_dropout)
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.rotation_trick = bool(rotation_trick)
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)

        self.project_in, self.project_out = projections(dim, codebook_dim)
        self.layers = nn.ModuleList(layers)
        self.register_buffer("last_losses", torch.zeros(len(layers)), persistent=False)

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, K, codebook_dim): each stage's ``codebook`` (equal sizes needed), in the
        residual space."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(self, z: Tensor, *, generator: torch.Generator | None = None) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts and outputs.

        Args:
            z: (B, ..., dim) float tensor (or the layout set by channel_last / accept_image_fmap).
            generator: CPU torch.Generator for the quantize-dropout draw; default torch's global one.

        Returns:
            QuantizerOutput(quantized, indices (..., num_quantizers), loss (0-d)).
        """
        check_float_tensor(z, "z", min_dim=2)
        x = self.project_in(to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap))
        active = self.num_quantizers
        if self.training and self.quantize_dropout:
            active = draw_active_stages(self.num_quantizers, self.quantize_dropout_cutoff_index, generator)

        # Stages see (B, N, dim) for 4-D+ input: peer-style stages (FSQ, LFQ) read 4-D+ as channel-first.
        residual = x if x.dim() <= 3 else x.flatten(1, -2)
        quantized = None
        indices, losses = [], []
        for layer in self.layers[:active]:
            e, idx, *loss = layer(residual)  # (quantized, indices[, loss]): FSQ returns no loss
            e = e.detach()  # the stage's gradient reaches x through its loss; the output has one estimator
            residual = residual - e
            quantized = e if quantized is None else quantized + e
            indices.append(idx.long().reshape(*x.shape[:-1], *idx.shape[residual.dim() - 1 :]))
            losses.append(loss[0] if loss else residual.new_zeros(()))

        # Exactly the sum of the codes in value; the identity gradient (straight-through) or the
        # rotation trick's, once for the whole sum.
        quantized = estimate(x, quantized.reshape(x.shape), self.rotation_trick)
        indices.extend(torch.full_like(indices[0], -1) for _ in range(self.num_quantizers - active))
        stage_losses = torch.stack(losses)  # (active,)
        with torch.no_grad():
            self.last_losses.zero_()
            self.last_losses[:active] = stage_losses.detach().to(self.last_losses.dtype)
        out = self.project_out(quantized)
        return QuantizerOutput(from_channel_last(out, self.channel_last), torch.stack(indices, -1), stage_losses.sum())

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode stage indices back to the quantized output, in the forward's layout.

        Args:
            indices: int64 (..., Q') with Q' <= num_quantizers, as forward returns (or its first Q'
                stages); -1 entries (dropped stages) and missing trailing stages contribute nothing.

        Returns:
            (..., dim) for channel-last layouts, (B, dim, ...) otherwise.

        Raises:
            TypeError: non-integer indices. ValueError: bad stage axis or out-of-range values (CPU only).
        """
        check_indices(indices, max(layer.codebook_size for layer in self.layers), low=-1)
        if indices.dim() < 1 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"indices must be (..., Q) with 1 <= Q <= num_quantizers = {self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        quantized = None
        for layer, idx in zip(self.layers, indices.unbind(-1), strict=False):  # Q' <= Q stages
            kept = idx >= 0
            codes = layer.get_output_from_indices(idx.clamp_min(0))  # stages are channel-last
            codes = torch.where(kept.unsqueeze(-1), codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
            quantized = codes if quantized is None else quantized + codes
        return from_channel_last(self.project_out(quantized), self.channel_last)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_dim={self.codebook_dim}, "
            f"quantize_dropout={self.quantize_dropout}, "
            f"quantize_dropout_cutoff_index={self.quantize_dropout_cutoff_index}, "
            f"rotation_trick={self.rotation_trick}, channel_last={self.channel_last}"
        )


class ResidualVQ(ResidualStack):
    """Residual vector quantizer: ``num_quantizers`` VectorQuantizer stages on successive residuals.

    Args:
        dim: feature size of the input.
        codebook_size: number of codes K of every stage.
        num_quantizers: number of stages Q >= 1.
        shared_codebook: all stages use one codebook module (``layers[0]._codebook``). Only with
            gradient-trained codebooks (no EMA / k-means init / dead-code revival options). Default False.
        quantize_dropout: in training, drop a random number of trailing stages per batch (module
            docstring). Default False.
        quantize_dropout_cutoff_index: the last kept stage is never before this one, so at least
            ``cutoff + 1`` stages always run. In [0, num_quantizers - 1]. Default 0.
        codebook_dim: residual (code) space size; other than ``dim`` adds ``project_in`` /
            ``project_out`` around the whole stack (the stages themselves have no projections).
        rotation_trick: the output's gradient to x by the rotation trick (``rotate_to``
            from x to the sum of the codes) instead of straight-through. Default False.
        channel_last, accept_image_fmap: input layouts, as VectorQuantizer. The stack converts once
            and runs its stages channel-last.
        **vq_kwargs: passed to every stage's ``VectorQuantizer`` (commitment_weight, codebook_weight,
            ema_update, decay, kmeans_init, threshold_ema_dead_code, use_cosine_sim, backend, ...);
            ``heads`` must be 1 (a heads axis would clash with the stage axis of the indices).

    Input ``z``: (B, ..., dim) float, or (B, dim, ...) when features are not last.
    Output: ``QuantizerOutput(quantized, indices, loss)``: quantized has z's shape (sum of the active
    stages' codes, projected out if needed); indices int64 (..., num_quantizers), z's shape minus
    the feature axis plus a trailing stage axis (-1 for dropped stages; for image feature maps
    (B, H, W, num_quantizers)); loss 0-d, the sum of the active stages' losses.

    ``last_losses``: (num_quantizers,) the per-stage losses of the last forward, detached (for
    logging; 0 for dropped stages). vector-quantize-pytorch returns these per-stage losses as the
    third output instead of their sum.

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``, including the stages'
        own checks); input of the wrong shape.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        *,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        codebook_dim: int | None = None,
        rotation_trick: bool = False,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
        **vq_kwargs,
    ) -> None:
        # Checked before the stages exist, so that the errors name this class's arguments (in the
        # wording its users already match: "an int >= 1", not the stages' "a positive int").
        int_at_least(dim, "dim", 1)
        int_at_least(codebook_size, "codebook_size", 1)
        int_at_least(num_quantizers, "num_quantizers", 1)
        codebook_dim = dim if codebook_dim is None else int_at_least(codebook_dim, "codebook_dim", 1)
        if vq_kwargs.get("heads", 1) != 1:
            raise ValueError(f"ResidualVQ supports heads=1 only, got heads={vq_kwargs['heads']!r}")
        if shared_codebook:
            for name, conflicts in _PER_STAGE_CODEBOOK_UPDATES.items():
                if name in vq_kwargs and conflicts(vq_kwargs[name]):
                    raise ValueError(
                        f"shared_codebook=True supports gradient-trained codebooks only, got {name}={vq_kwargs[name]!r}"
                    )
        # The stack's estimator carries the output gradient (stage outputs are detached): a stage's own
        # rotation trick would only cost time.
        stage_kwargs = {"rotation_trick": False} | vq_kwargs
        stages = [VectorQuantizer(codebook_dim, codebook_size, **stage_kwargs) for _ in range(num_quantizers)]
        super().__init__(
            stages,
            dim,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            rotation_trick=rotation_trick,
            channel_last=channel_last,
            accept_image_fmap=accept_image_fmap,
        )
        self.codebook_size = codebook_size
        self.shared_codebook = bool(shared_codebook)
        if shared_codebook:
            first = self.layers[0]
            if first.ema_update or not first.learnable_codebook:
                # The stages' defaults are the peer's EMA codebook; updated once per stage per step
                # it would not be the peer's single update per step, so it is refused, not approximated.
                raise NotImplementedError(
                    "shared_codebook=True with an EMA-updated codebook (vector-quantize-pytorch's default) is "
                    "not implemented in fastvq yet: pass ema_update=False, learnable_codebook=True for a "
                    "gradient-trained shared codebook"
                )
            for layer in self.layers[1:]:
                layer._codebook = first._codebook  # one codebook (the peer's), registered under every stage

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}, "
            f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, "
            f"quantize_dropout={self.quantize_dropout}, "
            f"quantize_dropout_cutoff_index={self.quantize_dropout_cutoff_index}, "
            f"rotation_trick={self.rotation_trick}, channel_last={self.channel_last}"
        )
