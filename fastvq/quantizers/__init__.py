"""The quantizer modules (nn.Module): VectorQuantizer and its family, built from small parts.

Modules: vector_quantizer.py (VectorQuantizer, alias VectorQuantize), fsq.py (FSQ), lfq.py (LFQ), residual.py
(ResidualVQ), textbook.py (the dense-distance textbook layers: rows, EMA, feature maps, that the
benchmarks measure against).
Parts they share, for the coming family to compose instead of copy:
  output.py       QuantizerOutput, the NamedTuple every quantizer returns
  layout.py       channel-last, channel-first and feature-map layouts
  assignment.py   which code a vector gets (nearest, through the fused op; or sampled, sampling.py)
  gradients.py    gradient estimators: straight-through, the rotation trick, DiVeQ, synchronous update
  aux_losses.py   the peer's cross-entropy commitment, diversity and orthogonal terms (regularizers.py)
  affine.py       the peer's affine codebook statistics; inplace.py: its in-place codebook optimizer
  codebook.py     codebook state and updates: EMA + Laplace smoothing, k-means init (kmeans.py),
                  dead-code revival, DDP sync, telemetry
  implicit.py     codes computed from indices (FSQ, LFQ)
  residual.py     ResidualStack: a residual stack over any quantizers (ResidualVQ is one)
  grouped.py      GroupedQuantizer: one quantizer per slice of the feature axis
Kernel code never appears here: the modules call fastvq.functional.
"""

from fastvq.quantizers.fsq import FSQ, FSQOutput
from fastvq.quantizers.lfq import LFQ
from fastvq.quantizers.output import QuantizerOutput
from fastvq.quantizers.residual import ResidualVQ
from fastvq.quantizers.vector_quantizer import VectorQuantize, VectorQuantizer

__all__ = ["FSQ", "LFQ", "FSQOutput", "QuantizerOutput", "ResidualVQ", "VectorQuantize", "VectorQuantizer"]
