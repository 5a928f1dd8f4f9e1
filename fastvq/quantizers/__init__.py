"""The quantizer modules (nn.Module): VectorQuantizer and its family, built from small parts.

Modules: vector_quantizer.py (VectorQuantizer), fsq.py (FSQ), lfq.py (LFQ), residual.py
(ResidualVQ), textbook.py (the cdist + argmin baseline the benchmarks measure against).
Parts they share: output.py (the QuantizerOutput they return), layout.py (channel-last and
feature-map layouts), codebook_ema.py (EMA statistics, Laplace smoothing, dead-code revival),
kmeans.py (k-means++ initialisation), implicit.py (codes computed from indices: FSQ, LFQ).
Kernel code never appears here: the modules call fastvq.functional.
"""

from fastvq.quantizers.fsq import FSQ
from fastvq.quantizers.lfq import LFQ
from fastvq.quantizers.output import QuantizerOutput
from fastvq.quantizers.residual import ResidualVQ
from fastvq.quantizers.vector_quantizer import VectorQuantizer

__all__ = ["FSQ", "LFQ", "QuantizerOutput", "ResidualVQ", "VectorQuantizer"]
