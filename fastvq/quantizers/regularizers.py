"""Orthogonal regularisation of a codebook (Shin et al. 2021, https://arxiv.org/abs/2112.00384).

Eq. (2) of the paper, as vector-quantize-pytorch computes it: with u_i = c_i / ||c_i|| the n unit
codes of each of H codebooks,

    L = sum_{h,i,j} (u_i . u_j)^2 / (H n^2) - 1 / n,

which is 0 exactly when the codes of every book are pairwise orthogonal (n <= D) and grows with
their squared cosine similarities. ``orthogonal_reg_codes`` picks the codes the loss is taken over
(the codes a batch used, at most ``max_codes`` of them at random), as the peer's
``orthogonal_reg_active_codes_only`` / ``orthogonal_reg_max_codes`` options do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvq.checks import check_float_tensor, positive_int

# vector-quantize-pytorch's l2norm eps: a zero code is normalised to zero, not to NaN.
_NORM_EPS = 1e-6


def orthogonal_loss(codes: Tensor) -> Tensor:
    """Eq. (2) of Shin et al. 2021: mean squared cosine similarity of the codes minus 1 / n.

    The sum of squared cosines over all n^2 pairs equals ||U U^T||_F^2 = ||U^T U||_F^2 for the
    (n, D) unit codes U, so it is taken over the smaller Gram matrix: O(n min(n, D)) memory instead
    of the peer's n x n matrix, the same value up to rounding.

    Args:
        codes: (H, n, D) float, H codebooks of n codes each (any float dtype; gradient flows).

    Returns:
        0-d tensor in ``codes``' dtype. An empty set of codes (n = 0) has no pairs: 0 (still
        attached to ``codes``' graph).

    Raises:
        TypeError: ``codes`` is not a floating tensor. ValueError: ``codes`` is not 3-D.
    """
    check_float_tensor(codes, "codes")
    if codes.dim() != 3:
        raise ValueError(f"codes must be 3-D (H, n, D), got shape {tuple(codes.shape)}")
    books, n, dim = codes.shape
    if n == 0:
        return codes.sum() * 0.0
    unit = F.normalize(codes, dim=-1, eps=_NORM_EPS)
    # (H, m, m), m = min(n, D): both Gram matrices have the same Frobenius norm
    gram = unit @ unit.transpose(1, 2) if n <= dim else unit.transpose(1, 2) @ unit
    return gram.square().sum() / (books * n**2) - 1.0 / n


def orthogonal_reg_codes(
    codebook: Tensor,
    indices: Tensor | None,
    active_codes_only: bool,
    max_codes: int | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The codes the orthogonal loss is taken over, as vector-quantize-pytorch selects them.

    With ``active_codes_only`` only the codes that appear in ``indices`` (sorted by index, as
    ``torch.unique`` returns them); then, when more than ``max_codes`` remain, ``max_codes`` of
    them drawn uniformly without replacement (``torch.randperm``, from ``generator`` or torch's
    global RNG on the codebook's device, as the peer). The selection synchronises with the host
    when ``active_codes_only`` (the number of used codes is data).

    Args:
        codebook: (H, K, D) float, the codes (gradient flows to the rows selected).
        indices: any shape, int, the batch's codes in [0, K); entries -1 (masked rows) are
            ignored. Needed only with ``active_codes_only`` (may be None otherwise).
        active_codes_only: keep only the codes used in ``indices``.
        max_codes: None (all) or a positive int, the most codes the loss sees.
        generator: optional torch.Generator for the random subset.

    Returns:
        (H, n, D) the selected rows of ``codebook``, n <= K (n = 0 when ``indices`` holds only -1).

    Raises:
        TypeError: ``codebook`` not a floating tensor, or ``indices`` not an integer tensor.
        ValueError: ``codebook`` not 3-D; ``active_codes_only`` with H > 1 separate codebooks (which
            codes are active is per head; the peer rejects it too) or without ``indices``; an index
            outside [-1, K); ``max_codes`` not None or a positive int.
    """
    check_float_tensor(codebook, "codebook")
    if codebook.dim() != 3:
        raise ValueError(f"codebook must be 3-D (H, K, D), got shape {tuple(codebook.shape)}")
    if max_codes is not None:
        positive_int(max_codes, "max_codes")
    if active_codes_only:
        codebook = codebook[:, _active_code_ids(codebook, indices)]
    num_codes = codebook.shape[1]
    if max_codes is None or num_codes <= max_codes:
        return codebook
    return codebook[:, _random_subset(num_codes, max_codes, codebook.device, generator)]


def _active_code_ids(codebook: Tensor, indices: Tensor | None) -> Tensor:
    """Sorted distinct entries of ``indices`` other than -1, checked against the (H, K, D) codebook."""
    if codebook.shape[0] > 1:
        raise ValueError(
            "active_codes_only needs one shared codebook: the orthogonal loss over active codes is "
            f"not defined for {codebook.shape[0]} separate per-head codebooks"
        )
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be an integer torch.Tensor with active_codes_only, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    ids = torch.unique(indices.to(codebook.device))
    ids = ids[ids != -1]
    if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= codebook.shape[1]):
        raise ValueError(
            f"indices must lie in [0, {codebook.shape[1]}) or be -1, got values from {int(ids[0])} to {int(ids[-1])}"
        )
    return ids.long()


def _random_subset(num: int, size: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``size`` distinct ints of [0, num) drawn by randperm on ``generator``'s device (or ``device``)."""
    if generator is None:
        return torch.randperm(num, device=device)[:size]
    return torch.randperm(num, generator=generator, device=generator.device)[:size].to(device)
