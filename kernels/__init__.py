"""fastvq.kernels: Triton kernels and their launchers (installed from the top-level kernels/ folder).

Only this subpackage imports triton. Where triton (or a kernel) is missing it still imports:
``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why, and the functional layer falls back
to the PyTorch path for backend="auto" and raises for backend="triton".

The launchers mirror ``fastvq.reference`` one for one (same names, signatures and results):
``nearest_code``, ``vq_fwd``, ``vq_bwd``, ``code_stats``. They also take keyword-only extras
(``precision=`` for the fp32 search, ``out=`` buffers) that the functional layer never passes.

Files: search.py (nearest-code search, also the forward of vq_fwd), quantize.py (vq_fwd, vq_bwd),
stats.py (code_stats), _segment.py (the sorted segmented reduction behind the codebook gradient
and the code statistics), _common.py (checks, no triton), _compile_check.py (compiles every
kernel for sm_80/sm_90 without a GPU: ``python -m fastvq.kernels._compile_check``).
"""

from __future__ import annotations

from ._common import interpreter_active

AVAILABLE = False
UNAVAILABLE_REASON = ""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing on import
    UNAVAILABLE_REASON = f"triton could not be imported: {type(exc).__name__}: {exc}"
else:
    try:
        from .quantize import vq_bwd, vq_fwd
        from .search import nearest_code
        from .stats import code_stats
    except Exception as exc:  # e.g. a triton too old for an API the kernels use
        UNAVAILABLE_REASON = f"the Triton kernels failed to load: {type(exc).__name__}: {exc}"
    else:
        AVAILABLE = True

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "interpreter_active"]
if AVAILABLE:
    __all__ += ["code_stats", "nearest_code", "vq_bwd", "vq_fwd"]
