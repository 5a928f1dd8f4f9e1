"""The auxiliary loss terms of vector-quantize-pytorch's VectorQuantize, as one option group.

Three terms beside the commitment loss, each off by default and each computed by its own part:

* cross-entropy commitment (``commitment_use_cross_entropy_loss``): the commitment term is the
  cross-entropy of the peer's logits against the chosen codes instead of the squared error;
* codebook diversity (``codebook_diversity_loss_weight``): minus the entropy of the batch-averaged
  code distribution softmax(temperature x logits), per position;
* orthogonal regularisation (``orthogonal_reg_weight``, Shin et al. 2021, eq. 2): the codes' squared
  cosine similarities, over the used codes and / or a random subset.

The first two need every row's distance to every code: ``fastvq.quantizers.sampling`` computes them
in row chunks (bounded memory, forward and backward), where the peer builds the dense N x K matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastvq.checks import check_weight, positive_float, positive_int
from fastvq.quantizers import regularizers, sampling
from fastvq.quantizers.codebook import rows_per_book


@dataclass(frozen=True)
class AuxiliaryLosses:
    """The peer's auxiliary loss options (its keyword names, its defaults).

    Raises:
        ValueError: a negative weight, a temperature <= 0, ``orthogonal_reg_max_codes`` < 1.
    """

    commitment_use_cross_entropy_loss: bool = False
    codebook_diversity_loss_weight: float = 0.0
    codebook_diversity_temperature: float = 100.0
    orthogonal_reg_weight: float = 0.0
    orthogonal_reg_active_codes_only: bool = False
    orthogonal_reg_max_codes: int | None = None

    def __post_init__(self) -> None:
        check_weight(self.codebook_diversity_loss_weight, "codebook_diversity_loss_weight")
        positive_float(self.codebook_diversity_temperature, "codebook_diversity_temperature")
        check_weight(self.orthogonal_reg_weight, "orthogonal_reg_weight")
        if self.orthogonal_reg_max_codes is not None:
            positive_int(self.orthogonal_reg_max_codes, "orthogonal_reg_max_codes")

    @property
    def needs_learnable_codes(self) -> bool:
        """Whether the codes must be a Parameter (the orthogonal term trains them by gradient)."""
        return self.orthogonal_reg_weight > 0

    def cross_entropy_commitment(self, rows: Tensor, books: Tensor, idx: Tensor, use_cosine_sim: bool) -> Tensor:
        """Mean cross-entropy of the peer's logits of ``rows`` (M, H, D) against their codes ``idx``
        (M, H) (-1 ignored), over every head; books (1 or H, K, D). 0-d."""
        terms = [
            sampling.cross_entropy_to_codes(r, b, i, use_cosine_sim)
            for r, b, i in _per_book(rows, books, idx)
        ]
        return sum(terms[1:], terms[0]) / len(terms)

    def diversity(self, z: Tensor, books: Tensor, use_cosine_sim: bool) -> Tensor:
        """The peer's diversity loss of ``z`` (B, N, H, D) (N positions), unweighted, 0-d."""
        return sampling.diversity_loss(z, books, self.codebook_diversity_temperature, use_cosine_sim)

    def orthogonal(self, codebook: Tensor, idx: Tensor) -> Tensor:
        """The orthogonal regularisation of ``codebook`` (books, K, D) over the codes it selects
        (used in ``idx`` with active_codes_only, at most max_codes at random), unweighted, 0-d."""
        codes = regularizers.orthogonal_reg_codes(
            codebook, idx, self.orthogonal_reg_active_codes_only, self.orthogonal_reg_max_codes
        )
        return regularizers.orthogonal_loss(codes)


def _per_book(rows: Tensor, books: Tensor, idx: Tensor):
    """(rows (M', D), book (K, D), idx (M',)) per codebook: all heads for a shared book, else one head each."""
    count = books.shape[0]
    targets = [t.reshape(-1) for t in rows_per_book(idx.unsqueeze(-1), count)]
    return zip(rows_per_book(rows, count), books, targets, strict=True)
