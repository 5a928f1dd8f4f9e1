"""fastvq.kernels: Triton kernels and their launchers (installed from the top-level kernels/ folder).

Only this subpackage imports triton. Where triton (or a kernel) is missing it still imports:
``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why, and the functional layer falls back
to the PyTorch path for backend="auto" and raises for backend="triton".

The launchers mirror ``fastvq.ops`` one for one (same names, signatures and results):
``nearest_code``, ``vq_fwd``, ``vq_bwd``, ``code_stats``.
"""

from __future__ import annotations

import os

AVAILABLE = False
UNAVAILABLE_REASON = "the Triton kernels are not implemented yet"


def interpreter_active() -> bool:
    """True when TRITON_INTERPRET=1 is set: Triton then runs kernels on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "interpreter_active"]
