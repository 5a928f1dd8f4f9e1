"""Backend dispatch for the functional ops: which implementation runs a call.

    "torch"  -> fastvq.reference, the PyTorch specification (any device).
    "triton" -> fastvq.kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
    "auto"   -> "torch" for now, CUDA included (see KERNELS_VERIFIED_ON_GPU); once the kernels have
                passed `fastvq check` on a GPU: "triton" for CUDA tensors of fp32/fp16/bf16 when the
                kernels import, else "torch".

The backend is resolved in Python from the inputs' device and dtype (static under tracing) and
passed to the custom ops as a string.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastvq import kernels, reference

BACKENDS = ("auto", "triton", "torch")
METRICS = ("l2", "cosine")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Whether "auto" may route CUDA tensors to the Triton kernels. False until the kernels have passed
# `fastvq check` on a GPU (so far they have run only through the Triton interpreter, which hides
# races and computes tf32 exactly); the commit that records a passing GPU check flips it to True.
KERNELS_VERIFIED_ON_GPU = False


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """Turn "auto" | "triton" | "torch" into the backend that will run ("triton" or "torch").

    "auto" gives "torch" unless ``KERNELS_VERIFIED_ON_GPU`` is True, the kernels import, and every
    tensor is a CUDA tensor of fp32/fp16/bf16. "triton" can always be asked for explicitly.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: "triton" asked for where it cannot run (no triton, CPU tensors without
            TRITON_INTERPRET=1, or fp64 inputs, which the kernels do not take).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in _KERNEL_DTYPES for t in tensors)
    if backend == "auto":
        verified = KERNELS_VERIFIED_ON_GPU and kernels.AVAILABLE
        return "triton" if (verified and on_cuda and kernel_dtypes) else "torch"
    if not kernels.AVAILABLE:
        raise RuntimeError(f"backend='triton' is unavailable: {kernels.UNAVAILABLE_REASON}")
    if not kernel_dtypes:
        raise RuntimeError(
            f"backend='triton' takes float32/float16/bfloat16 inputs, got {[str(t.dtype) for t in tensors]}"
        )
    if not on_cuda and not kernels.interpreter_active():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; CPU tensors run the kernels only through the "
            "Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    return "triton"


def implementation(backend: str) -> ModuleType:
    """The module (fastvq.kernels or fastvq.reference) that runs a resolved backend."""
    return kernels if backend == "triton" else reference
