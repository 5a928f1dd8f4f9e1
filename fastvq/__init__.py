"""fastvq: fast vector quantization for PyTorch (fused Triton kernels, a chunked PyTorch path).

    idx, dist = fastvq.nearest_code(x, codebook)
    zq, idx, loss = fastvq.vector_quantize(z, codebook)
    q, idx, loss = fastvq.VectorQuantizer(dim=64, codebook_size=512)(z)
"""

from fastvq.functional import code_stats, nearest_code, vector_quantize
from fastvq.quantizers import FSQ, LFQ, QuantizerOutput, ResidualVQ, VectorQuantizer

__version__ = "0.1.0"

__all__ = [
    "FSQ",
    "LFQ",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantizer",
    "__version__",
    "code_stats",
    "nearest_code",
    "vector_quantize",
]
