"""The quantizers a VQ model can use, by name (the ``quantizer`` field of its config).

    "vq"        fastvq.VectorQuantizer (backend "auto": Triton kernels on a GPU, else the chunked
                PyTorch path).
    "fsq"       fastvq.FSQ, finite scalar quantization: quantizer_kwargs {"levels": [...]} with
                prod(levels) == codebook_size; no codebook, no auxiliary loss.
    "lfq"       fastvq.LFQ, lookup-free quantization: codebook_size a power of two; built with
                exact_entropy=True (quantizer_kwargs may override) and returns fastvq.LFQOutput,
                which unpacks like QuantizerOutput and has .loss.
    "textbook"  fastvq.quantizers.textbook.TextbookQuantizer, the layer of tutorials (a dense N x K
                distance matrix, argmin, z + (e - z).detach()): the baseline of `fastvq bench
                --ops vqvae_step`.

Every entry is built as ``QUANTIZERS[name](dim, codebook_size, commitment_weight=..., **kwargs)``,
takes and returns (B, dim, H, W) feature maps with (B, H, W) indices in [0, codebook_size), returns
``fastvq.QuantizerOutput`` and has ``get_output_from_indices``. Those with a learnt (K, D) ``embed``
get the VQ-VAE's codebook care (data init, dead-code restarts). Quantizers with several indices per
position (ResidualVQ) do not fit the (B, H, W) code grid the prior and sampling use, so they are not
registered yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fastvq import FSQ, LFQ, QuantizerOutput, VectorQuantizer
from fastvq.quantizers.textbook import TextbookQuantizer

# What the bundled models train with, pinned (VectorQuantizer's own defaults are vector-quantize-pytorch's:
# EMA codebook, rotation trick, kaiming-uniform init, no loss in eval): a gradient-trained codebook with the
# VQ-VAE losses (codebook term 1.0), straight-through, standard-normal init, the loss also in validation.
VQVAE_QUANTIZER_OPTIONS = {
    "ema_update": False, "learnable_codebook": True, "codebook_weight": 1.0, "rotation_trick": False,
    "codebook_init": "normal", "eval_loss": True,
}


def _fastvq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, **kwargs) -> nn.Module:
    kwargs = VQVAE_QUANTIZER_OPTIONS | kwargs
    if kwargs.get("ema_update"):  # an EMA codebook asked for: no gradient, no codebook term
        kwargs = kwargs | {"learnable_codebook": False, "codebook_weight": None}
    return VectorQuantizer(dim, codebook_size, commitment_weight=commitment_weight, accept_image_fmap=True, **kwargs)


def _fsq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, levels=None, **kwargs) -> nn.Module:
    if levels is None or math.prod(levels) != codebook_size:
        raise ValueError(f"quantizer 'fsq' needs quantizer_kwargs levels with prod(levels) == codebook_size "
                         f"({codebook_size}), got levels={levels!r}")
    return _FeatureMapFSQ(list(levels), dim, accept_image_fmap=True, **kwargs)


class _FeatureMapFSQ(FSQ):
    """FSQ with the registry's contract: QuantizerOutput(quantized, int64 indices, a 0-d zero loss)."""

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        quantized, indices = super().forward(z)
        return QuantizerOutput(quantized, indices.long(), torch.zeros((), device=z.device))


def _lfq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, **kwargs) -> nn.Module:
    # LFQ takes the peer's keywords; channel_first for (B, dim, H, W) maps; the VQ-VAE keeps fastvq's
    # exact entropies (O(N 2^(d/2)) memory, not the peer's dense clamped softmax) unless told otherwise.
    kwargs = {"channel_first": True, "exact_entropy": True, **kwargs}
    return LFQ(dim=dim, codebook_size=codebook_size, commitment_loss_weight=commitment_weight, **kwargs)


QUANTIZERS: dict[str, Callable[..., nn.Module]] = {
    "vq": _fastvq, "fsq": _fsq, "lfq": _lfq, "textbook": TextbookQuantizer,
}


def build_quantizer(name: str, dim: int, codebook_size: int, commitment_weight: float, **kwargs) -> nn.Module:
    """The quantizer called ``name`` (a key of QUANTIZERS) for (B, dim, H, W) feature maps.

    Raises:
        ValueError: unknown name, or options the chosen quantizer rejects.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {sorted(QUANTIZERS)}, got {name!r}")
    try:
        return QUANTIZERS[name](dim, codebook_size, commitment_weight=commitment_weight, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad quantizer_kwargs for {name!r}: {err}") from err
