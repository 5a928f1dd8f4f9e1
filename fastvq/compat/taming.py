"""taming-transformers' ``VectorQuantizer2`` on fastvq's fused op: change the import, keep the checkpoint.

taming-transformers, latent-diffusion and Stable Diffusion's VQ first stage quantize with
``taming.modules.vqvae.quantize.VectorQuantizer2`` and load checkpoints with ``strict=False``, so a
renamed key would silently leave a random codebook. This class keeps taming's constructor, forward
signature, return structure, index shapes, ``remap`` behaviour and state_dict keys
(``embedding.weight``, plus the ``used`` buffer with ``remap``), and runs the search, the loss and
the gradients through ``fastvq.functional.vector_quantize``: no dense N x K distance matrix.

The loss, as in taming (VQ-VAE, van den Oord et al. 2017, with sg = stop-gradient):
    legacy=True  (taming's default):  mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
    legacy=False (the paper's form):  beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)
i.e. legacy puts beta on the codebook term. Both have the same value; only the gradients differ.

What differs from taming, on purpose (docs/compat.md): the search is exact per fastvq's numerics
contract with ties to the lowest index, and z_q equals ``embedding.weight[idx]`` bitwise (taming's
``z + (z_q - z).detach()`` rounds); the loss accumulates in fp32 for 16-bit inputs; the remap
lookup is a sort + binary search instead of a dense (B, H*W, len(used)) match; bad arguments raise
ValueError / TypeError instead of ``assert``; inputs are never modified in place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, check_indices, check_weight
from fastvq.functional import BACKENDS, vector_quantize

__all__ = ["VectorQuantizer2"]


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _load_used(remap: object, n_e: int) -> Tensor:
    """The (U,) int64 tensor of used code indices stored in the .npy file ``remap``."""
    if not isinstance(remap, (str, os.PathLike)):
        raise TypeError(f"remap must be None or a path to a .npy file, got {type(remap).__name__}")
    used = np.load(remap, allow_pickle=False)  # a local file only: never a URL, never pickles
    if used.ndim != 1 or used.size == 0 or not np.issubdtype(used.dtype, np.integer):
        raise ValueError(
            f"remap file {os.fspath(remap)!r} must hold a non-empty 1-D integer array, "
            f"got dtype {used.dtype} and shape {used.shape}"
        )
    if used.min() < 0 or used.max() >= n_e:
        raise ValueError(
            f"remap file {os.fspath(remap)!r} holds indices in [{used.min()}, {used.max()}], outside [0, n_e={n_e})"
        )
    return torch.from_numpy(used.astype(np.int64))


class VectorQuantizer2(nn.Module):
    """taming-transformers' VectorQuantizer2 (same arguments, returns and state_dict), on fastvq's op.

    Args:
        n_e: number of codes K (int >= 1).
        e_dim: code dimension C (int >= 1).
        beta: loss weight (finite, >= 0); on the codebook term with ``legacy=True``, on the
            commitment term with ``legacy=False``.
        remap: None, or a path to a .npy file of the used code indices (1-D, integers in [0, n_e));
            forward then returns indices into that list and ``get_codebook_entry`` maps them back.
        unknown_index: with ``remap``, the index of a code not in the list: "random" (uniform in
            [0, len(used)), drawn from the global CPU generator as taming does), "extra" (the
            extra index len(used)) or an int in [0, len(used)).
        sane_index_shape: return indices as (B, H, W) instead of flat.
        legacy: taming's default loss weighting (see the module docstring).
        backend: keyword-only fastvq extra, "auto" | "triton" | "torch".

    State: ``embedding`` (nn.Embedding(n_e, e_dim), uniform in [-1/n_e, 1/n_e] as taming) and,
    with ``remap``, the int64 buffer ``used``. Attributes ``n_e, e_dim, beta, legacy, remap,
    re_embed, unknown_index, sane_index_shape`` as in taming.

    Raises:
        TypeError / ValueError naming the argument; FileNotFoundError for a missing remap file.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | os.PathLike | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.n_e = _check_size(n_e, "n_e")
        self.e_dim = _check_size(e_dim, "e_dim")
        self.beta = check_weight(beta, "beta")
        self.legacy = bool(legacy)
        self.sane_index_shape = bool(sane_index_shape)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        is_int = isinstance(unknown_index, int) and not isinstance(unknown_index, bool)
        if not (is_int or unknown_index in ("random", "extra")):
            raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")

        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

        self.remap = remap
        self.unknown_index = unknown_index
        if remap is None:
            self.re_embed = self.n_e
            return
        self.register_buffer("used", _load_used(remap, self.n_e))
        self.re_embed = self.used.shape[0]
        if unknown_index == "extra":  # as taming: the unknown index becomes len(used), one past the list
            self.unknown_index = self.re_embed
            self.re_embed += 1
        elif isinstance(unknown_index, int) and not 0 <= unknown_index < self.re_embed:
            # taming accepts any int here and fails later in get_codebook_entry; fail early instead.
            raise ValueError(f"unknown_index must lie in [0, len(used)={self.re_embed}), got {unknown_index}")

    def extra_repr(self) -> str:
        s = f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, legacy={self.legacy}"
        if self.remap is not None:
            s += f", remap={os.fspath(self.remap)!r}, unknown_index={self.unknown_index!r}"
        return s + f", backend={self.backend!r}"

    def remap_to_used(self, inds: Tensor) -> Tensor:
        """Indices into ``used`` for code indices ``inds`` (any shape, int); same shape, int64.

        A code listed several times maps to its first position (as taming's argmax over matches);
        a code not listed maps to ``unknown_index``.
        """
        used = self.used.to(inds.device)
        # A stable sort keeps equal codes in list order, so a left binary search finds the first.
        sorted_used, order = torch.sort(used, stable=True)
        flat = inds.reshape(-1).to(torch.int64)
        pos = torch.searchsorted(sorted_used, flat).clamp_max(used.shape[0] - 1)
        found = sorted_used[pos] == flat
        new = order[pos]
        unknown = ~found
        if self.unknown_index == "random":
            # taming's draw, on the global CPU generator: the same seed gives the same indices.
            draw = torch.randint(0, self.re_embed, size=new[unknown].shape)
            new[unknown] = draw.to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(inds.shape)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Code indices for indices into ``used`` (any shape); same shape, int64.

        The "extra" index maps to ``used[0]``, as in taming. ``inds`` is not modified.
        """
        inds = inds.to(torch.int64)
        n_used = self.used.shape[0]
        if self.re_embed > n_used:
            inds = inds.masked_fill(inds >= n_used, 0)
        return self.used.to(inds.device)[inds]

    def forward(
        self, z: Tensor, temp: float | None = None, rescale_logits: bool = False, return_logits: bool = False
    ) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        """Quantize a (B, e_dim, H, W) feature map.

        Args:
            z: (B, e_dim, H, W) float tensor on the codebook's device.
            temp, rescale_logits, return_logits: accepted for interface compatibility with
                taming's GumbelQuantize, as in taming: only None / 1.0, False, False.

        Returns:
            ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))``:
            z_q (B, e_dim, H, W), contiguous, dtype promote(z, codebook), equal to the chosen codes
            and straight-through to z; loss 0-d (fp32 for 16-bit inputs); perplexity and
            min_encodings None (taming computes neither); min_encoding_indices int64, (B*H*W,)
            without remap, (B*H*W, 1) with remap (taming's shapes), (B, H, W) with sane_index_shape.

        Raises:
            TypeError: z is not a float tensor. ValueError: z's shape, a Gumbel-only argument,
            non-finite values (CPU), or a device mismatch.
        """
        if temp is not None and temp != 1.0:
            raise ValueError(f"temp must be None or 1.0 (only for interface compatibility with Gumbel), got {temp}")
        if rescale_logits:
            raise ValueError("rescale_logits must be False (only for interface compatibility with Gumbel)")
        if return_logits:
            raise ValueError("return_logits must be False (only for interface compatibility with Gumbel)")
        check_float_tensor(z, "z")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"z must be (B, e_dim={self.e_dim}, H, W), got shape {tuple(z.shape)}")
        b, _, h, w = z.shape
        weight = self.embedding.weight
        # legacy: weight 1 on the commitment term, beta on the codebook term; the paper's form swaps them.
        commitment_weight, codebook_weight = (1.0, self.beta) if self.legacy else (self.beta, 1.0)
        zq, idx, loss = vector_quantize(
            z.permute(0, 2, 3, 1),  # (B, H, W, C): one row per position
            weight,
            commitment_weight=commitment_weight,
            codebook_weight=codebook_weight,
            backend=self.backend,
        )
        # taming's z + (z_q - z).detach() has dtype promote(z, weight); the upcast keeps values exact.
        z_q = zq.permute(0, 3, 1, 2).contiguous().to(torch.promote_types(z.dtype, weight.dtype))  # (B, C, H, W)
        indices = idx.reshape(-1)  # (B*H*W,)
        if self.remap is not None:
            indices = self.remap_to_used(indices).reshape(-1, 1)  # taming returns (B*H*W, 1) here
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: Tensor, shape: Sequence[int] | None) -> Tensor:
        """Codes for indices, as forward returned them (unmapped through ``used`` with remap).

        Args:
            indices: int64/int32 tensor of any shape, values in [0, re_embed).
            shape: (B, H, W, e_dim) (-1 allowed, as in ``view``), or None.

        Returns:
            (B, e_dim, H, W) contiguous with ``shape``; ``indices.shape + (e_dim,)`` with None.
            Differentiable to ``embedding.weight``.

        Raises:
            TypeError: indices not an integer tensor. ValueError: indices out of range (CPU), or
            a shape that is not 4 entries ending in e_dim or does not hold indices.numel() codes.
        """
        check_indices(indices, self.re_embed, "indices")
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        z_q = self.embedding(indices)  # indices.shape + (C,)
        if shape is None:
            return z_q
        shape = tuple(shape)
        if len(shape) != 4 or shape[3] not in (self.e_dim, -1):
            raise ValueError(f"shape must be (B, H, W, e_dim={self.e_dim}) or None, got {shape}")
        try:
            z_q = z_q.view(shape)
        except RuntimeError as err:
            raise ValueError(f"shape {shape} does not hold the {indices.numel()} codes of indices") from err
        return z_q.permute(0, 3, 1, 2).contiguous()
