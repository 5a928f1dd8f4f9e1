"""Input layouts shared by the quantizer modules (FSQ, LFQ, ResidualVQ).

The same rules as ``fastvq.VectorQuantizer``: features on the last axis by default,
(B, dim, ...) with ``channel_last=False``, and (B, dim, H, W) feature maps with
``accept_image_fmap=True``. The modules convert once to channel-last, quantize, and convert back.
"""

from __future__ import annotations

from torch import Tensor


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


def from_channel_last(out: Tensor, channel_last: bool) -> Tensor:
    """Inverse of ``to_channel_last`` for an output with a trailing feature axis."""
    return out if channel_last else out.movedim(-1, 1)
