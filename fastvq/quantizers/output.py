"""The result type every fastvq quantizer returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class QuantizerOutput(NamedTuple):
    """What every fastvq quantizer returns; unpacks like vector-quantize-pytorch's tuple."""

    quantized: Tensor  # same shape and layout as the input
    indices: Tensor  # int64, the input's shape without the feature axis (plus a heads axis if heads > 1)
    loss: Tensor  # 0-d: codebook + commitment terms, already weighted
