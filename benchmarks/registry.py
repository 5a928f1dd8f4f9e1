"""One registry of shapes, operations and providers, shared by `fastvq bench` and the
pytest-benchmark suite, so both measure the same things.

A provider turns (op, shape, dtype, device) into a zero-argument callable that runs the work
once, or raises ``Unavailable`` with the reason it cannot (not installed, needs CUDA, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastvq
from fastvq import kernels


class Unavailable(Exception):
    """The provider cannot run this case; the message says why (shown in the table)."""


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    k: int
    d: int

    def __str__(self) -> str:
        return f"{self.name} (N={self.n}, K={self.k}, D={self.d})"


# DESIGN.md's GPU shapes and issue 2's CPU shapes.
SHAPES = {
    "A": Shape("A", 65536, 8192, 256),
    "B": Shape("B", 262144, 1024, 64),
    "C": Shape("C", 65536, 65536, 8),
    "cpu-small": Shape("cpu-small", 16384, 1024, 64),
    "cpu-large": Shape("cpu-large", 16384, 8192, 256),
    "cpu-memory": Shape("cpu-memory", 131072, 8192, 64),
    "quick": Shape("quick", 1000, 97, 24),
}
CPU_GRID = ("cpu-small", "cpu-large")
GPU_GRID = ("A", "B", "C")
OPS = ("search", "forward", "train_step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def search_flops(shape: Shape) -> float:
    """Multiply-adds of the distance GEMM, counted as 2 flops each (the argmin is not counted)."""
    return 2.0 * shape.n * shape.k * shape.d


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape.n, shape.d, generator=gen).to(device=device, dtype=dtype)
    codebook = torch.randn(shape.k, shape.d, generator=gen).to(device=device, dtype=dtype)
    return x, codebook


# ---------------------------------------------------------------------------------------------
# baselines: what people write today


class TextbookVQ(torch.nn.Module):
    """The VQ layer of tutorials and taming-transformers: a dense N x K distance matrix,
    argmin, and ``z + (e - z).detach()`` for the straight-through estimator."""

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(codebook_size, dim))
        self.beta = beta

    def forward(self, z):
        d = (z * z).sum(1, keepdim=True) + (self.embed * self.embed).sum(1) - 2 * z @ self.embed.t()  # (N, K)
        idx = d.argmin(1)
        e = self.embed[idx]
        loss = ((e - z.detach()) ** 2).mean() + self.beta * ((e.detach() - z) ** 2).mean()
        return z + (e - z).detach(), idx, loss


def _vqtorch_layer(shape: Shape):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as err:
        raise Unavailable("vector-quantize-pytorch is not installed (pip install '.[bench]')") from err
    # Its defaults (EMA codebook, decay 0.8, commitment 1.0): what a user of it runs.
    return VectorQuantize(dim=shape.d, codebook_size=shape.k)


def _layer(provider: str, shape: Shape):
    if provider == "textbook":
        return TextbookVQ(shape.d, shape.k)
    if provider == "vector-quantize-pytorch":
        return _vqtorch_layer(shape)
    backend = {"fastvq-torch": "torch", "fastvq-triton": "triton"}[provider]
    return fastvq.VectorQuantizer(dim=shape.d, codebook_size=shape.k, backend=backend)


def _check_triton(device: str) -> None:
    if not kernels.AVAILABLE:
        raise Unavailable(kernels.UNAVAILABLE_REASON)
    if device != "cuda":
        raise Unavailable("the Triton kernels run on CUDA (CPU only through the slow interpreter)")


PROVIDERS = {
    "search": ("gemm-floor", "gemm-compute", "naive-cdist", "naive-addmm", "fastvq-torch", "fastvq-triton"),
    "forward": ("textbook", "vector-quantize-pytorch", "fastvq-torch", "fastvq-triton"),
    "train_step": ("textbook", "vector-quantize-pytorch", "fastvq-torch", "fastvq-triton"),
}
# The provider each row's speed-up is measured against.
GEMM_PROVIDERS = ("gemm-floor", "gemm-compute")
BASELINE = {"search": "naive-cdist", "forward": "textbook", "train_step": "textbook"}


def build(op: str, provider: str, shape: Shape, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A callable that runs ``op`` once with ``provider``; raises Unavailable if it cannot."""
    if provider == "fastvq-triton":
        _check_triton(device)
    x, codebook = make_inputs(shape, dtype, device)
    if op == "search":
        if provider == "gemm-floor":  # the bare GEMM as written, allocating its N x K output
            return lambda: x @ codebook.t()
        if provider == "gemm-compute":  # the same GEMM into a reused buffer: arithmetic only
            out = torch.empty(shape.n, shape.k, dtype=dtype, device=device)
            return lambda: torch.mm(x, codebook.t(), out=out)
        if provider == "naive-cdist":
            return lambda: torch.cdist(x, codebook).argmin(1)
        if provider == "naive-addmm":
            half_sq = 0.5 * (codebook.float() ** 2).sum(1)
            return lambda: torch.addmm(half_sq, x.float(), codebook.float().t(), alpha=-1).argmin(1)
        backend = provider.removeprefix("fastvq-")
        return lambda: fastvq.nearest_code(x, codebook, backend=backend)

    # Layers run as in training: train mode, an input that requires grad (an encoder's output).
    layer = _layer(provider, shape).to(device=device, dtype=dtype).train()
    z = x.clone().requires_grad_(True)
    if op == "forward":
        return lambda: layer(z)

    def train_step():
        z.grad = None
        for p in layer.parameters():
            p.grad = None
        q, _, loss = layer(z)
        (q.float().square().mean() + loss.sum()).backward()

    return train_step
