"""Input layouts and feature sizes shared by the quantizer modules.

The same rules everywhere: features on the last axis by default, (B, dim, ...) with
``channel_last=False``, and (B, dim, H, W) feature maps with ``accept_image_fmap=True``. The modules
convert once to channel-last, quantize, and convert back; ``projections`` maps the input's feature
size to the code size and back, ``common_input_dim`` checks that composed quantizers fit together.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def from_channel_last(out: Tensor, channel_last: bool) -> Tensor:
    """Inverse of ``to_channel_last`` for an output with a trailing feature axis."""
    return out if channel_last else out.movedim(-1, 1)


def projections(dim: int, inner: int) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out): Linear dim -> inner and inner -> dim, or two Identity if equal."""
    if inner == dim:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, inner), nn.Linear(inner, dim)


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
