"""The options of vector-quantize-pytorch that need every row's logits over every code, without an N x K matrix.

The peer (``Codebook.forward``) scores each row z against each code e as ``-cdist(z, e)`` (minus the
euclidean distance, sqrt of the squared distance clamped at 1e-8) or, with ``use_cosine_sim``, as
the dot product z.e of the already l2-normalised vectors. On these logits it builds, densely:

* stochastic code choice: argmax / top-k of logits / T + Gumbel noise (``sample_codes``);
* the Gumbel straight-through estimator: value one_hot @ e, gradient through softmax(logits / T)
  (``gumbel_straight_through``);
* the cross-entropy of the logits to given codes, ignoring -1 (``cross_entropy_to_codes``);
* the codebook diversity loss -mean_n H(mean_{b,h} softmax(T * logits)) (``diversity_loss``).

Here every function walks the rows in chunks whose (rows x K) block of logits holds at most
``budget_bytes`` (``row_chunk``); a small constant number of such blocks is alive at once. The
backward passes are bounded too: each chunk's logits are recomputed in backward (activation
checkpointing, or the custom ``autograd.Function`` of the straight-through estimator), never stored.
Half-precision inputs are scored in float32 (the peer casts to float), float64 stays float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastvq.checks import FLOAT_DTYPES, is_int
from fastvq.quantizers.entropy import clamped_entropy

DEFAULT_BUDGET_BYTES = 64 << 20
_CDIST_EPS = 1e-8  # the peer's clamp of the squared distance before its sqrt
_GUMBEL_EPS = 1e-20  # the peer's clamp inside both logs of the Gumbel noise


# ------------------------------------------------------------------------------------------------
# argument checks


def _check_float(t: object, name: str, ndim: int, layout: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return t


def _check_pair(z: object, books: object, z_layout: str = "(M, D)", books_ndim: int = 2) -> None:
    """Raise unless z and books are float tensors of the given ranks with one D, dtype and device."""
    _check_float(z, "z", len(z_layout.split(",")), z_layout)
    _check_float(books, "books", books_ndim, "(K, D)" if books_ndim == 2 else "(1 or H, K, D)")
    if books.shape[-2] == 0:
        raise ValueError(f"books must hold at least one code, got shape {tuple(books.shape)}")
    if books.shape[-1] != z.shape[-1]:
        raise ValueError(
            f"z's last dimension must equal books' code dimension; got z {tuple(z.shape)}, books {tuple(books.shape)}"
        )
    if books.dtype != z.dtype:
        raise TypeError(f"z and books must have one dtype, got z {z.dtype} and books {books.dtype}")
    if books.device != z.device:
        raise ValueError(f"z is on {z.device} but books is on {books.device}")


def _check_temperature(temperature: object, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {temperature!r}")
    return float(temperature)


def _check_indices(t: object, name: str, rows: int, low: int, high: int, device: torch.device) -> Tensor:
    """Raise unless t is an int64 (rows,) tensor on ``device`` with values in [low, high)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) (one per row of z), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but z is on {device}")
    if rows and bool(((t < low) | (t >= high)).any()):
        raise ValueError(f"{name} values must lie in [{low}, {high}), got min {int(t.min())}, max {int(t.max())}")
    return t


# ------------------------------------------------------------------------------------------------
# logits and chunking


def row_chunk(num_codes: int, budget_bytes: int, element_size: int = 4) -> int:
    """Rows per chunk so that a (rows, num_codes) block of ``element_size``-byte floats fits the budget.

    Args:
        num_codes: K >= 1.
        budget_bytes: the most bytes one block may hold, >= 1.
        element_size: bytes per element (4 for float32, 8 for float64).

    Returns:
        max(1, budget_bytes // (num_codes * element_size)): one row even when it alone exceeds the budget.

    Raises:
        ValueError: num_codes, budget_bytes or element_size not a positive int.
    """
    for value, name in ((num_codes, "num_codes"), (budget_bytes, "budget_bytes"), (element_size, "element_size")):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return max(1, budget_bytes // (num_codes * element_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(books: Tensor, budget_bytes: int) -> int:
    size = torch.finfo(_compute_dtype(books.dtype)).bits // 8
    return row_chunk(books.shape[-2], budget_bytes, size)


def code_logits(z: Tensor, books: Tensor, use_cosine_sim: bool) -> Tensor:
    """The peer's logits of every row against every code, densely (one chunk, or tests).

    Args:
        z: (M, D) float rows.
        books: (K, D) codes, z's dtype and device.
        use_cosine_sim: logits z.e (both expected l2-normalised, as the peer normalises before
            scoring); otherwise -sqrt(max(||z||^2 + ||e||^2 - 2 z.e, 1e-8)), the peer's -cdist.

    Returns:
        (M, K) logits, float32 (float64 for float64 inputs), differentiable to z and books.

    Raises:
        TypeError / ValueError: z or books not float tensors of these shapes, D, dtype or device differing.
    """
    _check_pair(z, books)
    dtype = _compute_dtype(z.dtype)
    z, books = z.to(dtype), books.to(dtype)
    if use_cosine_sim:
        return z @ books.t()  # (M, K)
    # The peer's expansion and order, (||z||^2 + ||e||^2) + (-2 z.e), in one GEMM pass; -2 is exact.
    norms = (z * z).sum(-1)[:, None] + (books * books).sum(-1)[None, :]
    squared = torch.addmm(norms, z, books.t(), alpha=-2)  # (M, K)
    if _tracks_grad(z, books):
        return -squared.clamp(min=_CDIST_EPS).sqrt()
    return squared.clamp_(min=_CDIST_EPS).sqrt_().neg_()  # in place where no gradient needs the steps


def _maybe_checkpoint(recompute: bool, fn, *args):
    """fn(*args), recomputed in backward instead of storing its intermediates when ``recompute``."""
    if recompute:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _tracks_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------------
# code choice


def gumbel_noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The peer's Gumbel noise -log(-log(u)), u ~ U[0, 1), both logs' arguments clamped at 1e-20.

    Args:
        shape: the noise's shape.
        like: a tensor giving dtype and device.
        generator: drawn from when given (on ``like``'s device type), else from the global generator.

    Returns:
        (shape) noise in ``like``'s dtype.
    """
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    # in place: the noise never needs a gradient, and each step would otherwise allocate a block
    return u.clamp_(min=_GUMBEL_EPS).log_().neg_().clamp_(min=_GUMBEL_EPS).log_().neg_()


@torch.no_grad()
def sample_codes(
    z: Tensor,
    books: Tensor,
    temperature: float,
    *,
    stochastic: bool,
    use_cosine_sim: bool,
    topk: int | None = None,
    generator: torch.Generator | None = None,
    budget_bytes: int = 64 << 20,
) -> Tensor:
    """The peer's ``gumbel_sample`` indices, chunk by chunk: argmax (or top-k) of the code logits.

    Args:
        z: (M, D) float rows.
        books: (K, D) codes, z's dtype and device.
        temperature: T >= 0. With ``stochastic`` and T > 0 the scores are logits / T + Gumbel noise
            (a sample from softmax(logits / T)); otherwise the logits themselves.
        stochastic: whether to add noise (the peer's ``stochastic_sample_codes`` in training).
        use_cosine_sim: see ``code_logits``.
        topk: None for one code per row, else k in [1, K] best codes per row, best first.
        generator: the noise's source (on z's device type), for reproducible draws; else the global one.
        budget_bytes: the most bytes of one chunk's (rows, K) scores.

    Returns:
        (M,) int64 indices, or (M, topk) with ``topk``. Ties go to the lowest index (argmax). No gradient.
        The noise is drawn chunk by chunk, so one seed gives one result for one ``budget_bytes``.

    Raises:
        TypeError / ValueError: bad z / books (see ``code_logits``), temperature < 0 or not finite,
            topk not an int in [1, K], a generator on another device type, budget_bytes < 1.
    """
    _check_pair(z, books)
    temperature = _check_temperature(temperature)
    num_codes = books.shape[0]
    if topk is not None and (not is_int(topk) or not 1 <= topk <= num_codes):
        raise ValueError(f"topk must be None or an int in [1, K = {num_codes}], got {topk!r}")
    if generator is not None and generator.device.type != z.device.type:
        raise ValueError(f"generator is on {generator.device} but z is on {z.device}")
    noisy = stochastic and temperature > 0
    picks = []
    for chunk in z.split(_chunk_rows(books, budget_bytes)):
        scores = code_logits(chunk, books, use_cosine_sim)  # (rows, K)
        if noisy:
            scores = scores.div_(temperature).add_(gumbel_noise(scores.shape, scores, generator))
        picks.append(scores.argmax(dim=-1) if topk is None else scores.topk(topk, dim=-1).indices)
    return torch.cat(picks)


# ------------------------------------------------------------------------------------------------
# the Gumbel straight-through estimator


class _GumbelStraightThrough(torch.autograd.Function):
    """Value books[idx]; backward: the peer's (one_hot + p - sg(p)) @ books, p = softmax(logits / T)."""

    @staticmethod
    def forward(ctx, z, books, idx, temperature, use_cosine_sim, rows):
        ctx.save_for_backward(z, books, idx)
        ctx.temperature, ctx.use_cosine_sim, ctx.rows = temperature, use_cosine_sim, rows
        return books[idx]  # advanced indexing: a copy, bitwise the chosen codes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, books, idx = ctx.saved_tensors
        need_z, need_books = ctx.needs_input_grad[:2]
        dtype = _compute_dtype(books.dtype)
        grad_out = grad_out.to(dtype)
        grad_z = torch.zeros(z.shape, dtype=dtype, device=z.device) if need_z else None
        grad_books = torch.zeros(books.shape, dtype=dtype, device=books.device) if need_books else None
        if need_books:  # the one_hot @ books term: each chosen code gets its rows' gradient
            grad_books.index_add_(0, idx, grad_out)
        if ctx.temperature > 0:  # at T = 0 the peer drops the soft path: one_hot alone
            books_c = books.to(dtype)
            for start in range(0, z.shape[0], ctx.rows):
                rows = slice(start, start + ctx.rows)
                gz, gb = _soft_path_grads(
                    z[rows].to(dtype),
                    books_c,
                    grad_out[rows],
                    ctx.temperature,
                    ctx.use_cosine_sim,
                    need_z,
                    need_books,
                )
                if need_z:
                    grad_z[rows] += gz
                if need_books:
                    grad_books += gb
        grad_z = None if grad_z is None else grad_z.to(z.dtype)
        grad_books = None if grad_books is None else grad_books.to(books.dtype)
        return grad_z, grad_books, None, None, None, None  # no gradient to idx, T, the metric, rows


def _soft_path_grads(
    z_rows: Tensor,
    books: Tensor,
    grad_rows: Tensor,
    temperature: float,
    use_cosine_sim: bool,
    want_z: bool,
    want_books: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """One chunk's gradients (to z_rows, to books) through p = softmax(logits / T): the peer's p - sg(p) term."""
    with torch.enable_grad():
        z_leaf = z_rows.detach().requires_grad_(want_z)
        books_leaf = books.detach().requires_grad_(want_books)
        prob = (code_logits(z_leaf, books_leaf, use_cosine_sim) / temperature).softmax(dim=-1)  # (rows, K)
        grad_prob = grad_rows @ books.detach().t()  # (rows, K): d(p @ books)/dp against the incoming gradient
        leaves = [t for t in (z_leaf, books_leaf) if t.requires_grad]
        grads = list(torch.autograd.grad(prob, leaves, grad_prob))
    return (grads.pop(0) if want_z else None), (grads.pop(0) if want_books else None)


def gumbel_straight_through(
    z: Tensor,
    books: Tensor,
    idx: Tensor,
    temperature: float,
    use_cosine_sim: bool,
    budget_bytes: int = 64 << 20,
) -> Tensor:
    """The peer's Gumbel straight-through quantization: value books[idx], gradient through the softmax.

    The peer forms q = (one_hot(idx) + p - sg(p)) @ books with p = softmax(logits / T). Here the
    value is books[idx] bitwise (the peer's 1 + p - p may round), and the backward is the peer's:
    to z through p only; to books one_hot^T g (each chosen code receives its rows' gradient) plus the
    path through p. At T = 0 the soft path is dropped as in the peer (z gets a zero gradient).
    Backward recomputes each chunk's logits, so it never holds an (M, K) matrix either.

    Args:
        z: (M, D) float rows.
        books: (K, D) codes, z's dtype and device.
        idx: (M,) int64 chosen codes in [0, K) (e.g. from ``sample_codes``).
        temperature: T >= 0 of the softmax.
        use_cosine_sim: see ``code_logits``.
        budget_bytes: the most bytes of one chunk's (rows, K) logits.

    Returns:
        (M, D) in books' dtype, equal to books[idx].

    Raises:
        TypeError / ValueError: bad z / books (see ``code_logits``), idx not (M,) int64 in [0, K),
            temperature < 0 or not finite, budget_bytes < 1.
    """
    _check_pair(z, books)
    _check_indices(idx, "idx", z.shape[0], 0, books.shape[0], z.device)
    temperature = _check_temperature(temperature)
    rows = _chunk_rows(books, budget_bytes)
    return _GumbelStraightThrough.apply(z, books, idx, temperature, bool(use_cosine_sim), rows)


# ------------------------------------------------------------------------------------------------
# losses over all codes


def _cross_entropy_sum(z_rows: Tensor, books: Tensor, target: Tensor, use_cosine_sim: bool) -> Tensor:
    logits = code_logits(z_rows, books, use_cosine_sim)
    return F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")


def cross_entropy_to_codes(
    z: Tensor, books: Tensor, target: Tensor, use_cosine_sim: bool, budget_bytes: int = 64 << 20
) -> Tensor:
    """The peer's ``F.cross_entropy(logits, target, ignore_index=-1)``, chunked over rows.

    Args:
        z: (M, D) float rows.
        books: (K, D) codes, z's dtype and device.
        target: (M,) int64 code per row in [0, K), or -1 to leave the row out.
        use_cosine_sim: see ``code_logits``.
        budget_bytes: the most bytes of one chunk's (rows, K) logits.

    Returns:
        0-d float32 (float64 for float64 inputs): the mean over kept rows of logsumexp(logits) -
        logits[target], differentiable to z and books. With every row left out it is 0 with a
        gradient path (the peer's gives NaN), so a fully masked batch does not poison training.

    Raises:
        TypeError / ValueError: bad z / books (see ``code_logits``), target not (M,) int64 in [-1, K).
    """
    _check_pair(z, books)
    _check_indices(target, "target", z.shape[0], -1, books.shape[0], z.device)
    rows = _chunk_rows(books, budget_bytes)
    recompute = _tracks_grad(z, books)
    total = sum(
        _maybe_checkpoint(recompute, _cross_entropy_sum, z_rows, books, t_rows, use_cosine_sim)
        for z_rows, t_rows in zip(z.split(rows), target.split(rows), strict=True)
    )
    kept = (target != -1).sum().clamp(min=1)
    return total / kept


def _prob_sum(z_rows: Tensor, book: Tensor, temperature: float, use_cosine_sim: bool) -> Tensor:
    """sum over the leading axis of softmax(T * logits), (n, K), for z_rows (b, n, D)."""
    b, n, d = z_rows.shape
    logits = code_logits(z_rows.reshape(b * n, d), book, use_cosine_sim)  # (b n, K)
    return (logits * temperature).softmax(dim=-1).reshape(b, n, -1).sum(dim=0)


def _positions_entropy_sum(
    z_pos: Tensor, books: Tensor, temperature: float, use_cosine_sim: bool, batch_rows: int, recompute: bool
) -> Tensor:
    """sum over a block of positions z_pos (B, n, H, D) of H(mean over batch and heads of softmax(T * logits))."""
    batch, n, heads, dim = z_pos.shape
    if books.shape[0] == 1:  # heads are more rows of the one codebook: (B H, n, D)
        groups = [(z_pos.transpose(1, 2).reshape(batch * heads, n, dim), books[0])]
    else:
        groups = [(z_pos[:, :, h], books[h]) for h in range(heads)]
    acc = 0
    for z_rows, book in groups:
        for rows in z_rows.split(batch_rows):
            acc = acc + _maybe_checkpoint(recompute, _prob_sum, rows, book, temperature, use_cosine_sim)
    return clamped_entropy(acc / (batch * heads)).sum()


def diversity_loss(
    z: Tensor, books: Tensor, temperature: float, use_cosine_sim: bool, budget_bytes: int = 64 << 20
) -> Tensor:
    """The peer's codebook diversity loss: -mean_n H(mean over batch and heads of softmax(T * logits)).

    H is the peer's entropy -sum p log(max(p, 1e-5)). Positions are taken in blocks and, within a
    block, batch rows in chunks, so neither the (B N H, K) probabilities nor the (N, K) averages
    exist at once; backward recomputes them block by block (nested activation checkpointing).

    Args:
        z: (B, N, H, D) float: B batch, N positions, H heads, all >= 1.
        books: (1, K, D) codes shared by the heads, or (H, K, D) one codebook per head; z's dtype and device.
        temperature: the peer's ``codebook_diversity_temperature`` (a multiplier of the logits), >= 0.
        use_cosine_sim: see ``code_logits``.
        budget_bytes: the most bytes of one chunk's (rows, K) logits.

    Returns:
        0-d float32 (float64 for float64 inputs), differentiable to z and books.

    Raises:
        TypeError / ValueError: z not (B, N, H, D) or books not (1 or H, K, D) float with z's D, dtype
            and device; an empty axis; temperature < 0 or not finite; budget_bytes < 1.
    """
    _check_pair(z, books, "(B, N, H, D)", books_ndim=3)
    if 0 in z.shape[:3]:
        raise ValueError(f"z must have B, N, H >= 1, got shape {tuple(z.shape)}")
    batch, positions, heads, dim = z.shape
    if books.shape[0] not in (1, heads):
        raise ValueError(f"books must be (1, K, D) or (H = {heads}, K, D), got shape {tuple(books.shape)}")
    temperature = _check_temperature(temperature)
    # rows averaged per position in one codebook's group: heads share it, or each head has its own
    group_rows = batch * heads if books.shape[0] == 1 else batch
    rows = _chunk_rows(books, budget_bytes)
    batch_rows = min(group_rows, rows)
    position_rows = max(1, rows // batch_rows)
    recompute = _tracks_grad(z, books)
    total = 0
    for z_pos in z.split(position_rows, dim=1):  # (B, n, H, D)
        total = total + _maybe_checkpoint(
            recompute, _positions_entropy_sum, z_pos, books, temperature, use_cosine_sim, batch_rows, recompute
        )
    return -total / positions
