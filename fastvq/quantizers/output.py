"""The result type every fastvq quantizer returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class QuantizerOutput(NamedTuple):
    """What every fastvq quantizer returns; unpacks like vector-quantize-pytorch's tuple."""

    quantized: Tensor  # same shape and layout as the input
    indices: Tensor  # int64, the input's shape without the feature axis (plus a heads axis if heads > 1)
    loss: Tensor  # 0-d: codebook + commitment terms, already weighted


class LossBreakdown(NamedTuple):
    """The peer's loss breakdown (``return_loss_breakdown=True``): unweighted terms, 0-d."""

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


class QuantizerOutputWithBreakdown(NamedTuple):
    """What ``forward(..., return_loss_breakdown=True)`` returns: the peer's four values."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    loss_breakdown: LossBreakdown


class ResidualVQOutput(NamedTuple):
    """What a residual stack returns: vector-quantize-pytorch's ResidualVQ tuple."""

    quantized: Tensor  # same shape and layout as the input: the sum of the stages' codes
    indices: Tensor  # int64 (..., Q): the input's shape without the feature axis, plus a stage axis (-1: dropped)
    losses: Tensor  # (Q,) each stage's loss, already weighted (0 for dropped stages and, as the peer's, in eval)


class ResidualVQOutputWithCodes(NamedTuple):
    """What ``forward(..., return_all_codes=True)`` returns: the peer's four values."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor
    all_codes: Tensor  # (Q, B, ..., codebook_dim): each stage's code before project_out, 0 for dropped stages
