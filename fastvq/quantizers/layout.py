"""Input layouts and feature sizes shared by the quantizer modules.

The same rules everywhere: features on the last axis by default, (B, dim, ...) with
``channel_last=False``, and (B, dim, H, W) feature maps with ``accept_image_fmap=True``. The modules
convert once to channel-last, quantize, and convert back; ``projections`` maps the input's feature
size to the code size and back, ``common_input_dim`` checks that composed quantizers fit together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def resolve_channel_last(channel_last: bool | None, accept_image_fmap: bool) -> bool:
    """The effective ``channel_last`` flag; ValueError for the one contradictory combination."""
    if accept_image_fmap and channel_last:
        raise ValueError(
            "accept_image_fmap=True takes (B, dim, H, W) input: it cannot be combined with channel_last=True"
        )
    return (not accept_image_fmap) if channel_last is None else bool(channel_last)


def to_channel_last(z: Tensor, dim: int, channel_last: bool, accept_image_fmap: bool) -> Tensor:
    """(B, ..., dim) view of ``z``; ValueError (naming the expected layout) for a wrong shape."""
    if accept_image_fmap and z.dim() != 4:
        raise ValueError(
            f"z must be a (B, {dim}, H, W) feature map (accept_image_fmap=True), got shape {tuple(z.shape)}"
        )
    if z.dim() < 2:
        raise ValueError(f"z must have a batch axis and a feature axis, got shape {tuple(z.shape)}")
    feature_axis = -1 if channel_last else 1
    if z.shape[feature_axis] != dim:
        layout = "(B, ..., dim)" if channel_last else "(B, dim, ...)"
        raise ValueError(f"z must be {layout} with dim = {dim}, got shape {tuple(z.shape)}")
    return z if channel_last else z.movedim(1, -1)


def fmap_to_channel_last(
    x: Tensor, dim: int, channel_last: bool, accept_image_fmap: bool, accept_3d_fmap: bool
) -> Tensor:
    """``to_channel_last`` that also takes (B, dim, D, H, W) volumes with ``accept_3d_fmap``.

    Returns (B, ..., dim): (B, D, H, W, dim) for a volume.

    Raises:
        ValueError: ``accept_3d_fmap`` and ``x`` is not (B, dim, D, H, W); else as ``to_channel_last``.
    """
    if accept_3d_fmap:
        if x.dim() != 5 or x.shape[1] != dim:
            raise ValueError(f"x must be a (B, {dim}, D, H, W) map (accept_3d_fmap=True), got shape {tuple(x.shape)}")
        return x.movedim(1, -1)
    return to_channel_last(x, dim, channel_last, accept_image_fmap)


def sequence_mask(x: Tensor, mask: Tensor | None, lens: Tensor | None, channel_last: bool, fmap: bool) -> Tensor | None:
    """The (B, N) bool mask (True = valid) of a (B, N, dim) / (B, dim, N) sequence ``x``, or None.

    ``mask`` is returned as given after checks; ``lens`` (B,) int lengths become
    ``arange(N) < lens[:, None]`` on ``x``'s device. ``fmap``: ``x`` is an image / volume map,
    which takes no mask.

    Raises:
        ValueError: both ``mask`` and ``lens``; a mask on a map or on ``x`` that is not 3-d; a mask
        that is not bool of shape (B, N).
    """
    if mask is not None and lens is not None:
        raise ValueError("pass either mask or lens, not both")
    if mask is None and lens is None:
        return None
    if fmap or x.dim() != 3:
        raise ValueError(f"mask / lens need a (B, N, dim) or (B, dim, N) input, got shape {tuple(x.shape)}")
    length = x.shape[1] if channel_last else x.shape[2]
    if lens is not None:
        mask = torch.arange(length, device=x.device) < lens.to(x.device)[:, None]
    if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], length):
        want = (x.shape[0], length)
        raise ValueError(f"mask must be a bool tensor of shape {want}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


def scatter_valid(rows: Tensor, mask: Tensor, fill: float | int) -> Tensor:
    """Rows of the valid positions back into the full (B, N, ...) grid, ``fill`` elsewhere.

    Args:
        rows: (M, ...) the values at the M True positions of ``mask``, in ``mask``'s order.
        mask: (B, N) bool.

    Returns:
        (B, N, ...) in rows' dtype and device; differentiable with respect to ``rows``.
    """
    return rows.new_full((*mask.shape, *rows.shape[1:]), fill).index_put((mask,), rows)


def fill_padding(out: Tensor, x: Tensor, mask: Tensor, zeros: bool) -> Tensor:
    """``out`` (B, N, dim) at the valid positions of ``mask`` (B, N); zeros (``zeros=True``, the
    peer's ``return_zeros_for_masked_padding``) or the input ``x`` (B, N, dim) elsewhere, in out's dtype."""
    fill = torch.zeros_like(x) if zeros else x
    return torch.where(mask[..., None], out, fill.to(out.dtype))


def with_heads_axis(indices: Tensor, heads: int) -> Tensor:
    """(..., heads) view of the indices a quantizer returns: those already end in a heads axis when
    heads > 1, and get a size-1 one otherwise.

    Raises:
        ValueError: heads > 1 and ``indices`` does not end in an axis of size ``heads``.
    """
    if heads == 1:
        return indices.unsqueeze(-1)
    if indices.dim() == 0 or indices.shape[-1] != heads:
        raise ValueError(f"indices must end in a heads axis of size {heads}, got shape {tuple(indices.shape)}")
    return indices


def from_channel_last(out: Tensor, channel_last: bool) -> Tensor:
    """Inverse of ``to_channel_last`` for an output with a trailing feature axis."""
    return out if channel_last else out.movedim(-1, 1)


def projections(dim: int, inner: int, layernorm: bool = False) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out): Linear dim -> inner and inner -> dim, or two Identity if equal.

    ``layernorm``: project_in is Linear then LayerNorm(inner) (vector-quantize-pytorch's
    ``layernorm_after_project_in``; state_dict keys ``project_in.0.*`` / ``project_in.1.*`` as the
    peer's). It has no effect without a projection, as in the peer.
    """
    if inner == dim:
        return nn.Identity(), nn.Identity()
    project_in = nn.Sequential(nn.Linear(dim, inner), nn.LayerNorm(inner)) if layernorm else nn.Linear(dim, inner)
    return project_in, nn.Linear(inner, dim)


def common_input_dim(quantizers: Sequence[nn.Module], name: str) -> int:
    """The input feature size ``q.dim`` that every quantizer in ``quantizers`` shares.

    Raises:
        ValueError: ``quantizers`` is empty, or their ``dim`` differ (the message names ``name``).
    """
    if not quantizers:
        raise ValueError(f"{name} must hold at least one quantizer, got none")
    dims = {q.dim for q in quantizers}
    if len(dims) != 1:
        raise ValueError(f"every quantizer in {name} must have the same input size dim, got {sorted(dims)}")
    return dims.pop()
