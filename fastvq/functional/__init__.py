"""fastvq's functional API: autograd, backend dispatch, and torch.library custom ops.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it without a graph break, and with its
autograd registered through ``register_autograd``. One file per op (search.py, quantize.py,
stats.py), named like the op's specification in fastvq.reference and its kernel in
fastvq.kernels; dispatch.py picks the backend ("auto" | "triton" | "torch").
"""

from fastvq.functional.dispatch import BACKENDS, METRICS, resolve_backend
from fastvq.functional.quantize import vector_quantize
from fastvq.functional.search import nearest_code
from fastvq.functional.stats import code_stats

__all__ = ["BACKENDS", "METRICS", "code_stats", "nearest_code", "resolve_backend", "vector_quantize"]
