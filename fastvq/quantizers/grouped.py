"""A grouped split over any quantizers: the feature axis cut into G equal groups, one quantizer each.

    x = [x_0 | x_1 | ... | x_{G-1}]  (feature axis),   quantized = [Q_0(x_0) | ... | Q_{G-1}(x_{G-1})]

The groups are independent quantizers (their own codebooks, options and losses), so the index
space grows as K^G while each search stays over K codes. vector-quantize-pytorch's
GroupedResidualVQ is this split over ResidualVQ groups; its indices gain a LEADING groups axis,
(G, B, ...), and so do ours. The loss is the sum of the groups' losses, so each group's quantizer
gets the gradient it would get alone; ``last_losses`` (G,) keeps them apart for logging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastvq.checks import check_float_tensor
from fastvq.quantizers.layout import common_input_dim, from_channel_last, resolve_channel_last, to_channel_last
from fastvq.quantizers.output import QuantizerOutput


class GroupedQuantizer(nn.Module):
    """One quantizer per equal slice of the feature axis (module docstring).

    Args:
        groups: the G quantizers (at least one), channel-last, with equal input size ``group.dim``
            and forward / ``get_output_from_indices`` returning ``(quantized, indices[, loss])``
            (no loss counts as 0) / codes like VectorQuantizer, FSQ, LFQ, ResidualVQ or
            ResidualStack; 4-D+ inputs reach them as (B, N, group dim). Registered as ``groups``.
        channel_last, accept_image_fmap: input layouts, as VectorQuantizer; the groups run channel-last.

    Attributes:
        dim: G * group dim, the input's feature size.

    Input ``z``: (B, ..., dim) float, or (B, dim, ...) when features are not last.
    Output: ``QuantizerOutput(quantized, indices, loss)``: quantized has z's shape (the groups'
    outputs concatenated in order); indices (G, *group indices shape), each group's indices for
    the channel-last input (for image feature maps (G, B, H, W, ...)); loss 0-d, the sum of the
    groups' losses. Keyword arguments of forward (e.g. ``generator``) go to every group.

    Raises:
        ValueError: no groups or groups of different sizes (in ``__init__``); input of the wrong shape.
    """

    def __init__(
        self,
        groups: Sequence[nn.Module],
        *,
        channel_last: bool | None = None,
        accept_image_fmap: bool = False,
    ) -> None:
        super().__init__()
        groups = list(groups)
        self.group_dim = common_input_dim(groups, "groups")
        self.num_groups = len(groups)
        self.dim = self.num_groups * self.group_dim
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = resolve_channel_last(channel_last, accept_image_fmap)
        self.groups = nn.ModuleList(groups)
        self.register_buffer("last_losses", torch.zeros(self.num_groups), persistent=False)

    def forward(self, z: Tensor, **kwargs) -> QuantizerOutput:
        """Quantize ``z``; see the class docstring for layouts and outputs.

        Args:
            z: (B, ..., dim) float tensor (or the layout set by channel_last / accept_image_fmap).
            **kwargs: passed to every group's forward.

        Returns:
            QuantizerOutput(quantized (z's shape), indices (G, ...), loss (0-d)).
        """
        check_float_tensor(z, "z", min_dim=2)
        x = to_channel_last(z, self.dim, self.channel_last, self.accept_image_fmap)  # (B, ..., G * gd)
        # Groups see (B, N, group dim) for 4-D+ input: peer-style groups (FSQ, LFQ) read 4-D+ as channel-first.
        flat = x if x.dim() <= 3 else x.flatten(1, -2)
        outs = [group(part, **kwargs) for group, part in zip(self.groups, flat.split(self.group_dim, -1), strict=True)]
        # (quantized, indices[, loss]): FSQ returns no loss
        # A residual group returns per-stage losses (Q,): its loss is their sum.
        losses = torch.stack([out[2].sum() if len(out) > 2 else flat.new_zeros(()) for out in outs])  # (G,)
        with torch.no_grad():
            self.last_losses.copy_(losses.detach())
        quantized = torch.cat([out[0] for out in outs], dim=-1).reshape(x.shape)  # (B, ..., dim)
        rest = [out[1].shape[flat.dim() - 1 :] for out in outs]  # trailing index axes (e.g. stages)
        indices = torch.stack([out[1].reshape(*x.shape[:-1], *r) for out, r in zip(outs, rest, strict=True)])
        return QuantizerOutput(from_channel_last(quantized, self.channel_last), indices, losses.sum())

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode grouped indices back to the quantized output, in the forward's layout.

        Args:
            indices: int tensor (G, ...) as forward returns: entry g goes to group g's decoder
                (which checks it).

        Returns:
            (B, ..., dim) for channel-last layouts, (B, dim, ...) otherwise.

        Raises:
            ValueError: the leading axis is not G (and the groups' own errors).
        """
        if not isinstance(indices, Tensor) or indices.dim() < 1 or indices.shape[0] != self.num_groups:
            got = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be (G, ...) with G = num_groups = {self.num_groups}, got {got}")
        codes = [group.get_output_from_indices(idx) for group, idx in zip(self.groups, indices, strict=True)]
        return from_channel_last(torch.cat(codes, dim=-1), self.channel_last)

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, group_dim={self.group_dim}, dim={self.dim}, "
            f"channel_last={self.channel_last}"
        )
