"""The pure-PyTorch path: the executable specification of every fastvq op.

Every function here works on flattened 2-D inputs (the functional layer does the reshaping and
validation) and runs on any device. The Triton launchers in ``fastvq.kernels`` have the same
names, signatures and results; tests hold the two against each other and an fp64 oracle.

Memory: no function holds more than ``MAX_TILE_BYTES`` of distance scores at once, whatever N is.
"""

from fastvq.reference.quantize import vq_bwd, vq_fwd
from fastvq.reference.search import MAX_TILE_BYTES, nearest_code
from fastvq.reference.stats import code_stats

__all__ = ["MAX_TILE_BYTES", "code_stats", "nearest_code", "vq_bwd", "vq_fwd"]
