"""The quantizers a VQ model can use, by name (the ``quantizer`` field of its config).

    "vq"        fastvq.VectorQuantizer (backend "auto": Triton kernels on a GPU, else the chunked
                PyTorch path).
    "fsq"       fastvq.FSQ, finite scalar quantization: quantizer_kwargs {"levels": [...]} with
                prod(levels) == codebook_size; no codebook, no auxiliary loss.
    "lfq"       fastvq.LFQ, lookup-free quantization: codebook_size a power of two.
    "textbook"  the textbook PyTorch layer (cdist + argmin, z + (e - z).detach()): the baseline the
                step-time comparison measures fastvq against.

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
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq import FSQ, LFQ, QuantizerOutput, VectorQuantizer


class TextbookQuantizer(nn.Module):
    """VQ-VAE quantization as most tutorials write it. z: (B, dim, H, W) -> QuantizerOutput.

    Materialises the full (N, K) distance matrix with ``torch.cdist``; the loss is
    mse(e, sg(z)) + commitment_weight * mse(z, sg(e)), the output z + sg(e - z).
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.commitment_weight = dim, codebook_size, commitment_weight
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        self.project_in = nn.Identity()
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codes_used_fraction", torch.zeros(()), persistent=False)

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
        idx = torch.cdist(flat, self.embed).argmin(dim=1)  # (N,)
        e = self.embed[idx]  # (N, D)
        loss = F.mse_loss(e, flat.detach()) + self.commitment_weight * F.mse_loss(flat, e.detach())
        zq = flat + (e - flat).detach()
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx, minlength=self.codebook_size).float()
                p = counts / counts.sum()
                self.perplexity.copy_(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
                self.codes_used_fraction.copy_((counts > 0).float().mean())
        return QuantizerOutput(zq.reshape(b, h, w, d).permute(0, 3, 1, 2), idx.reshape(b, h, w), loss)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (B, H, W) int64 -> (B, dim, H, W)."""
        return self.embed[indices].permute(0, 3, 1, 2)


def _fastvq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, **kwargs) -> nn.Module:
    return VectorQuantizer(dim, codebook_size, commitment_weight=commitment_weight, accept_image_fmap=True, **kwargs)


def _fsq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, levels=None, **kwargs) -> nn.Module:
    if levels is None or math.prod(levels) != codebook_size:
        raise ValueError(f"quantizer 'fsq' needs quantizer_kwargs levels with prod(levels) == codebook_size "
                         f"({codebook_size}), got levels={levels!r}")
    return FSQ(list(levels), dim, accept_image_fmap=True, **kwargs)


def _lfq(dim: int, codebook_size: int, *, commitment_weight: float = 0.25, **kwargs) -> nn.Module:
    return LFQ(dim, codebook_size, commitment_loss_weight=commitment_weight, accept_image_fmap=True, **kwargs)


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
