"""One registry of shapes, operations and providers, shared by `fastvq bench` and the
pytest-benchmark suite, so both measure the same things.

A provider turns (op, shape, dtype, device) into a zero-argument callable that runs the work
once, or raises ``Unavailable`` with the reason it cannot (not installed, needs CUDA, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastvq
from fastvq import kernels
from fastvq.quantizers.textbook import TextbookEMAVQ, TextbookVQ


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
# vector-quantize-pytorch's options that need every row's distance to every code
# (fastvq/quantizers/sampling.py): each is a training step (forward + backward) of a layer built
# with these keywords on both sides, the peer's defaults otherwise (EMA codebook, rotation trick).
OPTION_OPS = {
    "train_step_sample": {"stochastic_sample_codes": True, "sample_codebook_temp": 1.0},
    "train_step_ce": {"commitment_use_cross_entropy_loss": True},
    "train_step_diversity": {"codebook_diversity_loss_weight": 0.1},
}
OPS = ("search", "forward", "train_step", "ema_update", "vqvae_step", *OPTION_OPS)
PEER = "vector-quantize-pytorch"
# The option ops feed (B, N / B, D) sequences: the peer's cross-entropy commitment fails on (N, D)
# input (its 2-D path drops the axis its cross-entropy expects), and its diversity loss averages
# the code distribution over the batch axis per position. B = gcd(N, 16): 16 sequences of 1024
# tokens at the CPU shapes.
OPTION_BATCH = 16
VQVAE_BATCH = 32  # 32x32 images; the tiny VQ-VAE has 8x8 latents: 2048 vectors of D per step
VQVAE_LATENTS = 64  # code vectors per image (8x8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def search_flops(shape: Shape) -> float:
    """Multiply-adds of the distance GEMM, counted as 2 flops each (the argmin is not counted)."""
    return 2.0 * shape.n * shape.k * shape.d


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape.n, shape.d, generator=gen).to(device=device, dtype=dtype)
    codebook = torch.randn(shape.k, shape.d, generator=gen).to(device=device, dtype=dtype)
    return x, codebook


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """(N, D) rows as (B, N / B, D) sequences, B = gcd(N, OPTION_BATCH) (see OPTION_BATCH)."""
    return x.view(math.gcd(x.shape[0], OPTION_BATCH), -1, x.shape[-1])


def _vqtorch_layer(shape: Shape, **options):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as err:
        raise Unavailable("vector-quantize-pytorch is not installed (pip install '.[bench]')") from err
    # Its defaults (EMA codebook, decay 0.8, commitment 1.0) unless an option op sets a keyword:
    # what a user of it runs.
    return VectorQuantize(dim=shape.d, codebook_size=shape.k, **options)


def _option_layer(op: str, provider: str, shape: Shape):
    """The layer of an OPTION_OPS op: the same constructor keywords for the peer and for fastvq."""
    if provider == PEER:
        return _vqtorch_layer(shape, **OPTION_OPS[op])
    backend = provider.removeprefix("fastvq-")
    return fastvq.VectorQuantize(dim=shape.d, codebook_size=shape.k, backend=backend, **OPTION_OPS[op])


def _layer(op: str, provider: str, shape: Shape):
    if op in OPTION_OPS:
        return _option_layer(op, provider, shape)
    ema = op == "ema_update"
    if provider == "textbook":  # what people write today: the dense N x K distance matrix
        return TextbookEMAVQ(shape.d, shape.k) if ema else TextbookVQ(shape.d, shape.k)
    if provider == "vector-quantize-pytorch":
        return _vqtorch_layer(shape)  # its default codebook is EMA-updated in every case
    backend = {"fastvq-torch": "torch", "fastvq-triton": "triton"}[provider]
    # Pinned to the configuration the recorded results were measured with (VQ-VAE paper: gradient
    # codebook, beta 0.25, straight-through; EMA rows: decay 0.99), not to the drop-in defaults.
    if ema:
        options = {"ema_update": True, "decay": 0.99}
    else:
        options = {"ema_update": False, "learnable_codebook": True, "codebook_weight": 1.0, "codebook_init": "normal"}
    return fastvq.VectorQuantizer(
        dim=shape.d, codebook_size=shape.k, commitment_weight=0.25, rotation_trick=False, backend=backend, **options
    )


def _check_triton(device: str) -> None:
    if not kernels.AVAILABLE:
        raise Unavailable(kernels.UNAVAILABLE_REASON)
    if device != "cuda":
        raise Unavailable("the Triton kernels run on CUDA (CPU only through the slow interpreter)")


PROVIDERS = {
    "search": ("gemm-floor", "gemm-compute", "naive-cdist", "naive-addmm", "fastvq-torch", "fastvq-triton"),
    "forward": ("textbook", "vector-quantize-pytorch", "fastvq-torch", "fastvq-triton"),
    "train_step": ("textbook", "vector-quantize-pytorch", "fastvq-torch", "fastvq-triton"),
    "ema_update": ("textbook", "vector-quantize-pytorch", "fastvq-torch", "fastvq-triton"),
    "vqvae_step": ("textbook", "fastvq-torch", "fastvq-triton"),
} | {op: (PEER, "fastvq-torch", "fastvq-triton") for op in OPTION_OPS}
# The provider each row's speed-up is measured against.
GEMM_PROVIDERS = ("gemm-floor", "gemm-compute")
BASELINE = {op: "textbook" for op in OPS} | {"search": "naive-cdist"} | {op: PEER for op in OPTION_OPS}


def build(op: str, provider: str, shape: Shape, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A callable that runs ``op`` once with ``provider``; raises Unavailable if it cannot."""
    if provider == "fastvq-triton":
        _check_triton(device)
    if op == "vqvae_step":
        return _vqvae_step(provider, shape, dtype, device)
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
    layer = _layer(op, provider, shape).to(device=device, dtype=dtype).train()
    if op in OPTION_OPS:
        x = as_sequences(x)
    z = x.clone().requires_grad_(True)
    if op == "forward":
        return lambda: layer(z)
    if op == "ema_update":  # a training forward of an EMA codebook: search, loss, statistics, update
        def ema_step():
            with torch.no_grad():
                return layer(x)

        return ema_step

    def train_step():
        z.grad = None
        for p in layer.parameters():
            p.grad = None
        q, _, loss = layer(z)
        (q.float().square().mean() + loss.sum()).backward()

    return train_step


def _vqvae_step(provider: str, shape: Shape, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """One training step (forward, backward, AdamW) of the tiny VQ-VAE with K codes of size D.

    The batch is VQVAE_BATCH images (2048 code vectors), or fewer where the shape's N is smaller
    (the quick smoke shape): N // 64 images. bf16/fp16 run under autocast."""
    from fastvq.models.vqvae import VQVAE, VQVAEConfig

    if provider == "textbook":
        quantizer, kwargs = "textbook", {}
    else:
        quantizer, kwargs = "vq", {"backend": provider.removeprefix("fastvq-")}
    torch.manual_seed(0)
    cfg = VQVAEConfig.preset("tiny", codebook_size=shape.k, embed_dim=shape.d, quantizer=quantizer,
                             quantizer_kwargs=kwargs)
    model = VQVAE(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, min(VQVAE_BATCH, shape.n // VQVAE_LATENTS))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    amp = dtype != torch.float32

    def step():
        with torch.autocast(device, dtype=dtype, enabled=amp):
            loss = model.training_losses(x)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------------------
# Same work on both sides: the loss of one training forward of the peer and of fastvq from one state

PARITY_RTOL = 1e-4  # fp32 sums of N x K logits in another order; a wrong term is off by far more


@dataclass(frozen=True)
class Parity:
    """The training loss of the peer and of fastvq on one input from one state.

    ``compared`` is False where the two cannot draw the same codes (stochastic sampling over
    several row chunks: fastvq draws the noise chunk by chunk); the values are then recorded only.
    Rows given another code than the peer's are accepted when they are near-ties: fastvq's code
    meets the numerics contract (fastvq.testing) against the fp64 distances, the peer's is the
    fp32 ``cdist`` argmin, and the two differ only by rounding.
    """

    peer_loss: float
    fastvq_loss: float
    same_indices: float  # fraction of rows given the same code
    compared: bool
    other_codes_near_ties: bool = True  # rows given another code: fastvq's within the contract

    @property
    def rel_diff(self) -> float:
        return abs(self.fastvq_loss - self.peer_loss) / max(abs(self.peer_loss), 1e-12)

    @property
    def ok(self) -> bool:
        return not self.compared or (self.rel_diff <= PARITY_RTOL and self.other_codes_near_ties)

    def __str__(self) -> str:
        values = f"loss {self.fastvq_loss:.6g} vs peer {self.peer_loss:.6g}"
        if not self.compared:
            return f"not compared (stochastic draws over several chunks differ): {values}"
        verdict = "same" if self.ok else "MISMATCH"
        ties = "" if self.same_indices == 1.0 else (
            " (the others near-ties)" if self.other_codes_near_ties else " (the others NOT near-ties)"
        )
        return f"{verdict}: {values}, rel. diff {self.rel_diff:.1e}, same indices {100 * self.same_indices:.2f}%{ties}"


def peer_parity(op: str, shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> Parity:
    """One training forward of the peer and of fastvq with ``op``'s keywords, from the same state.

    The peer is built first (seeded); fastvq loads its state_dict strictly; both see the same
    input (``make_inputs``, requiring grad) and the same global seed before the forward, so the
    stochastic draw coincides where fastvq scores all rows in one chunk.

    Args:
        op: a key of OPTION_OPS.
        shape: N rows of size D, K codes.
        dtype, device: of the layers and the input.
        seed: for the constructor, the input and the draw.

    Returns:
        A Parity (losses as floats, fraction of equal indices, whether the values are comparable).

    Raises:
        ValueError: op not in OPTION_OPS.
        Unavailable: vector-quantize-pytorch is not installed.
    """
    if op not in OPTION_OPS:
        raise ValueError(f"op must be one of {sorted(OPTION_OPS)}, got {op!r}")
    from fastvq.quantizers.sampling import DEFAULT_BUDGET_BYTES, row_chunk

    torch.manual_seed(seed)
    peer = _vqtorch_layer(shape, **OPTION_OPS[op])
    ours = fastvq.VectorQuantize(dim=shape.d, codebook_size=shape.k, **OPTION_OPS[op])
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = as_sequences(make_inputs(shape, dtype, device, seed)[0])
    books = ours.codebook.detach().clone()  # the state both start from (the forwards update it)
    losses, indices = [], []
    for layer in (peer, ours):
        layer.to(device=device, dtype=dtype).train()
        torch.manual_seed(seed + 1)
        _, idx, loss = layer(x.clone().requires_grad_(True))
        losses.append(float(loss.detach().sum()))
        indices.append(idx.detach())
    one_chunk = row_chunk(shape.k, DEFAULT_BUDGET_BYTES) >= shape.n
    stochastic = OPTION_OPS[op].get("stochastic_sample_codes", False)
    same = indices[0] == indices[1]
    other = ~same.reshape(-1)
    near_ties = True
    if other.any() and not stochastic:
        from fastvq.testing import contract_excess

        rows, picks = x.reshape(-1, shape.d)[other], indices[1].reshape(-1)[other]
        near_ties = bool((contract_excess(picks, rows, books.to(rows.dtype)) <= 1).all())
    return Parity(losses[0], losses[1], same.double().mean().item(), one_chunk or not stochastic, near_ties)
