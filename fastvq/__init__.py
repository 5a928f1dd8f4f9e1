"""fastvq: fast vector quantization for PyTorch (fused Triton kernels, a chunked PyTorch path).

    idx, dist = fastvq.nearest_code(x, codebook)
    zq, idx, loss = fastvq.vector_quantize(z, codebook)
    q, idx, loss = fastvq.VectorQuantize(dim=64, codebook_size=512)(z)   # VectorQuantizer: the same class
"""

from fastvq.functional import code_stats, nearest_code, vector_quantize
from fastvq.quantizers import FSQ, LFQ, FSQOutput, QuantizerOutput, ResidualVQ, VectorQuantize, VectorQuantizer

__version__ = "0.1.0"

__all__ = [
    "FSQ",
    "FSQOutput",
    "LFQ",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantize",
    "VectorQuantizer",
    "__version__",
    "code_stats",
    "nearest_code",
    "vector_quantize",
]
