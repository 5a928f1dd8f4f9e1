"""The base of implicit-codebook quantizers (today ``FSQ``): codes computed from indices, never stored.

``LFQ`` does not use it: as vector-quantize-pytorch's, it keeps every code in a ``codebook`` buffer
and decodes bits itself (``fastvq/quantizers/lfq.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvq.checks import check_indices
from fastvq.quantizers.layout import from_channel_last

# Materialising every code of an implicit codebook beyond this is almost surely a mistake.
MAX_IMPLICIT_CODEBOOK = 2**24


class ImplicitCodebook(nn.Module):
    """Base for quantizers whose codes follow from their indices.

    Subclasses set ``codebook_size``, ``channel_last``, ``project_out`` and implement
    ``indices_to_codes(indices, dtype=torch.float32)`` (codes before ``project_out``) and
    ``_code_device``; a subclass whose ``indices_to_codes`` projects out (the peer's contract)
    overrides ``indices_to_implicit_codes`` instead.
    """

    codebook_size: int
    channel_last: bool

    @property
    def _code_device(self) -> torch.device:
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def indices_to_implicit_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(*indices.shape, code dim) in ``dtype``: the implicit codes, before ``project_out``."""
        return self.indices_to_codes(indices, dtype)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Quantized output for indices, in the forward's layout (projected out if there are projections).

        Args:
            indices: int64 tensor shaped like the ``indices`` forward returns.

        Returns:
            (*indices.shape, dim) for channel-last layouts, (B, dim, ...) otherwise; float32, or the
            projections' dtype when there are projections.
        """
        weight = getattr(self.project_out, "weight", None)
        codes = self.indices_to_implicit_codes(indices, torch.float32 if weight is None else weight.dtype)
        return from_channel_last(self.project_out(codes), self.channel_last)

    @property
    def implicit_codebook(self) -> Tensor:
        """(codebook_size, code dim) float32: every code, before ``project_out``, in index order."""
        if self.codebook_size > MAX_IMPLICIT_CODEBOOK:
            raise ValueError(
                f"implicit_codebook would materialise {self.codebook_size} codes (limit {MAX_IMPLICIT_CODEBOOK})"
            )
        return self.indices_to_implicit_codes(torch.arange(self.codebook_size, device=self._code_device))

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, dim): every code as it appears in the output (projected out if needed)."""
        return self.project_out(self.implicit_codebook)

    def _check_indices(self, indices: Tensor) -> None:
        check_indices(indices, self.codebook_size)
