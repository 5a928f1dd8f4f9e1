"""VectorQuantizer: the drop-in nn.Module (keyword names follow vector-quantize-pytorch)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastvq._checks import check_float_tensor, check_weight
from fastvq.functional import BACKENDS, vector_quantize


class QuantizerOutput(NamedTuple):
    """What every fastvq quantizer returns; unpacks like vector-quantize-pytorch's tuple."""

    quantized: Tensor  # same shape and layout as the input
    indices: Tensor  # int64, the input's shape without the feature axis
    loss: Tensor  # 0-d: codebook + commitment terms, already weighted


class VectorQuantizer(nn.Module):
    """Vector quantizer with a gradient-trained codebook and the VQ-VAE losses.

    Args:
        dim: feature size of the input.
        codebook_size: number of codes K.
        codebook_dim: size of the codes when looked up in a lower-dimensional space; the input is
            projected in (Linear dim -> codebook_dim) and the result out again. Default: ``dim``.
        commitment_weight: beta of the VQ-VAE paper (weight of mean((z - sg(e))^2)). Default 0.25.
        codebook_weight: weight of mean((sg(z) - e)^2), the term that trains the codebook. Default 1.
        channel_last: features on the last axis, (B, ..., dim). False: features on axis 1,
            (B, dim, ...). Default: True, or False when ``accept_image_fmap``.
        accept_image_fmap: input is a (B, dim, H, W) feature map; indices are (B, H, W).
        learnable_codebook: train the codebook by gradient (True, the only mode until EMA lands).
        backend: "auto" | "triton" | "torch" (see fastvq.functional).

    Input ``z``: (B, ..., dim) float, or (B, dim, ...) when features are not last.
    Output: ``QuantizerOutput(quantized, indices, loss)``.

    Telemetry (buffers, refreshed by every training-mode forward from the indices it already
    has, no extra pass over the data): ``perplexity`` (exp of the entropy of code usage in the
    batch) and ``codes_used_fraction`` (fraction of codes chosen at least once in the batch).

    Raises:
        ValueError: bad sizes or option combinations (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
        learnable_codebook: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive int or None, got {codebook_dim!r}")
        if accept_image_fmap and channel_last:
            raise ValueError(
                "accept_image_fmap=True takes (B, dim, H, W) input: it cannot be combined with channel_last=True"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not learnable_codebook:
            raise ValueError("learnable_codebook=False needs an EMA codebook update, which is not implemented yet")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
        self.codebook_weight = check_weight(codebook_weight, "codebook_weight")
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = (not accept_image_fmap) if channel_last is None else channel_last
        self.backend = backend

        needs_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection else nn.Identity()
        # Standard-normal init like vector-quantize-pytorch; VQ-VAE's U(-1/K, 1/K) starts every
        # code at the origin, far from typical encoder outputs, and most codes then never win.
        self.embed = nn.Parameter(torch.randn(codebook_size, codebook_dim))
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, dim): the codes as they appear in the output (projected out if needed)."""
        return self.project_out(self.embed)

    def _to_channel_last(self, z: Tensor) -> Tensor:
        if self.accept_image_fmap and z.dim() != 4:
            raise ValueError(
                f"z must be a (B, {self.dim}, H, W) feature map (accept_image_fmap=True), got shape {tuple(z.shape)}"
            )
        if z.dim() < 2:
            raise ValueError(f"z must have a batch axis and a feature axis, got shape {tuple(z.shape)}")
        feature_axis = -1 if self.channel_last else 1
        if z.shape[feature_axis] != self.dim:
            layout = "(B, ..., dim)" if self.channel_last else "(B, dim, ...)"
            raise ValueError(f"z must be {layout} with dim = {self.dim}, got shape {tuple(z.shape)}")
        return z if self.channel_last else z.movedim(1, -1)

    def _from_channel_last(self, out: Tensor) -> Tensor:
        return out if self.channel_last else out.movedim(-1, 1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts. Returns QuantizerOutput."""
        check_float_tensor(z, "z", min_dim=2)
        z = self.project_in(self._to_channel_last(z))  # (B, ..., codebook_dim)
        zq, idx, loss = vector_quantize(z, self.embed, self.commitment_weight, self.codebook_weight, self.backend)
        if self.training:
            self._update_usage(idx)
        return QuantizerOutput(self._from_channel_last(self.project_out(zq)), idx, loss)

    @torch.no_grad()
    def _update_usage(self, idx: Tensor) -> None:
        # index_add rather than bincount: bincount sizes its output from idx.max(), a host sync.
        counts = torch.zeros(self.codebook_size, device=idx.device)
        counts.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device))
        probs = counts / counts.sum().clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        self.perplexity.copy_(entropy.exp())
        self.codes_used_fraction.copy_((counts > 0).float().mean())

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Quantized output for given code indices, in the forward's layout.

        Args:
            indices: int64 tensor, shaped like the ``indices`` forward returns.

        Returns:
            (*indices.shape, dim) for channel-last layouts; (B, dim, ...) otherwise.

        Raises:
            TypeError: non-integer indices. ValueError: indices out of [0, codebook_size).
        """
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = getattr(indices, "dtype", type(indices).__name__)
            raise TypeError(f"indices must be an int64/int32 tensor, got {got}")
        # Range-checked on CPU only: on CUDA the check would be a host synchronisation.
        if indices.device.type == "cpu" and indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")
        codes = self.project_out(self.embed[indices])  # (*indices.shape, dim)
        return self._from_channel_last(codes)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"commitment_weight={self.commitment_weight}, codebook_weight={self.codebook_weight}, "
            f"channel_last={self.channel_last}, accept_image_fmap={self.accept_image_fmap}, backend={self.backend!r}"
        )
