"""Affine codebook statistics: vector-quantize-pytorch's ``affine_param`` option, on our Codebook.

Each codebook keeps running per-dimension statistics of the batch rows (mu_b, s_b^2) and of its
own codes (mu_c, s_c^2), each (books, 1, D): the first value is taken as is, then an EMA
    stat <- decay * stat + (1 - decay) * batch value,
with population variances (divide by M, not M - 1); the codebook's statistics move only in
training. With std = sqrt(clamp(variance, min=1e-5)) the codes are searched and returned in the
batch's statistics and the rows enter the codebook EMA in the codebook's statistics:

    affine_codes:  e -> (e - mu_c) * s_b / s_c + mu_b
    affine_rows:   x -> (x - mu_b) * s_c / s_b + mu_c        (the inverse map)

Buffers and their state_dict keys are the peer's: ``batch_mean`` and ``batch_variance`` start as
None buffers (absent from the state_dict until the first update), ``codebook_mean`` and
``codebook_variance`` are (books, 1, D), ``codebook_mean_needs_init`` and
``codebook_variance_needs_init`` 0-d bools. Two differences from the peer, neither changing a
trained value: the codebook statistics start at zeros instead of uninitialised memory, and the
buffers are updated in place (the peer rebinds them), so their tensors keep their identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvq.checks import check_float_tensor, is_int, positive_int

# The peer clamps variances before the square root so a constant dimension cannot divide by 0.
VARIANCE_FLOOR = 1e-5

BATCH_STATS = ("batch_mean", "batch_variance")
CODEBOOK_STATS = ("codebook_mean", "codebook_variance")


def register_affine_buffers(book: nn.Module, books: int, dim: int) -> None:
    """Register the affine statistics on ``book`` with the peer's names, shapes and initial state.

    Also registers ``load_affine_state_`` as a load_state_dict pre-hook of ``book``, so a
    state_dict that holds ``batch_mean`` / ``batch_variance`` loads (strictly) into a module
    whose batch statistics are still None.

    Args:
        book: the module that owns the codebook (our ``Codebook``); new tensors go to the device
            of its first parameter or buffer (CPU if it has none).
        books: number of codebooks (positive int). dim: D (positive int).

    Raises:
        TypeError: ``book`` is not an nn.Module. ValueError: ``books`` or ``dim`` not a positive
            int, or ``book`` already has the affine buffers.
    """
    if not isinstance(book, nn.Module):
        raise TypeError(f"book must be an nn.Module, got {type(book).__name__}")
    positive_int(books, "books")
    positive_int(dim, "dim")
    if "codebook_mean" in book._buffers:
        raise ValueError(f"book already has affine buffers (codebook_mean {tuple(book.codebook_mean.shape)})")
    device = _device_of(book)
    for name in BATCH_STATS:
        book.register_buffer(name, None)
    for name in CODEBOOK_STATS:
        book.register_buffer(name + "_needs_init", torch.tensor(True, device=device))
        book.register_buffer(name, torch.zeros(books, 1, dim, device=device))
    book.register_load_state_dict_pre_hook(load_affine_state_)


def load_affine_state_(book: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: give a None batch statistic a tensor when ``state_dict`` has one.

    nn.Module skips None buffers when loading, so a peer checkpoint's ``batch_mean`` would be
    reported as an unexpected key. An empty tensor of the saved shape and dtype, on the device of
    ``codebook_mean``, is registered first; the ordinary load then copies the values in.

    Args:
        book: a module set up by ``register_affine_buffers``. state_dict, prefix: as handed to
            ``nn.Module._load_from_state_dict``; the remaining arguments are ignored.
    """
    for name in BATCH_STATS:
        saved = state_dict.get(prefix + name)
        if book._buffers.get(name) is None and isinstance(saved, Tensor):
            device = book.codebook_mean.device
            book.register_buffer(name, torch.empty(saved.shape, dtype=saved.dtype, device=device))


def update_affine_(
    book: nn.Module,
    rows: Tensor,
    codes: Tensor,
    training: bool,
    batch_decay: float,
    codebook_decay: float,
    sync: bool = False,
) -> None:
    """One step of the running statistics, as the peer's ``Codebook.update_affine``.

    Statistics are computed in at least fp32 and detached. The codebook's statistics move only
    when ``training``; the batch's in every forward (evaluation too, as in the peer). A batch with
    no rows (M = 0, everything masked) leaves the batch statistics unchanged (the peer would store
    NaN).

    Args:
        book: a module set up by ``register_affine_buffers``; its buffers change in place.
        rows: (books, M, D) float, the valid input rows of each codebook.
        codes: (books, K, D) float, the codebook (before the affine map).
        training: whether the module is in training mode.
        batch_decay, codebook_decay: EMA decays in [0, 1] (peer defaults 0.99 and 0.9).
        sync: reduce the batch statistics over ranks; not implemented.

    Raises:
        NotImplementedError: ``sync=True``. TypeError: ``rows`` or ``codes`` not floating tensors.
        ValueError: shapes that do not match the buffers, or a decay outside [0, 1].
    """
    if sync:
        raise NotImplementedError("sync_affine_param=True (statistics over ranks) is not implemented in fastvq")
    books, _, dim = book.codebook_mean.shape
    _check_books(rows, "rows", books, dim)
    _check_books(codes, "codes", books, dim)
    for decay, name in ((batch_decay, "batch_decay"), (codebook_decay, "codebook_decay")):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name} must be a float in [0, 1], got {decay!r}")
    with torch.no_grad():
        if training:
            mean, variance = _moments(codes)
            _update_with_decay_(book, "codebook_mean", mean, codebook_decay)
            _update_with_decay_(book, "codebook_variance", variance, codebook_decay)
        if rows.shape[1] > 0:  # a static shape: no host sync
            mean, variance = _moments(rows)
            _update_with_decay_(book, "batch_mean", mean, batch_decay)
            _update_with_decay_(book, "batch_variance", variance, batch_decay)


def affine_codes(book: nn.Module, codes: Tensor, books_axis: int = 0) -> Tensor:
    """The codes mapped into the batch's statistics: (e - mu_c) * s_b / s_c + mu_b.

    Args:
        book: a module set up by ``register_affine_buffers`` and updated at least once.
        codes: (books, K, D) float (the books axis at ``books_axis``, see ``affine_rows``);
            gradient flows through (a learnable codebook).
        books_axis: the axis of ``codes`` that indexes the codebooks (not the last).

    Returns:
        Tensor like ``codes``, in its dtype (computed in the promoted dtype of codes and statistics).

    Raises:
        RuntimeError: no batch statistics yet. TypeError / ValueError: ``codes`` of a wrong type or
            shape.
    """
    mean_c, mean_b, std_c, std_b = _affine_terms(book, codes, "codes", books_axis)
    return ((codes - mean_c) * (std_b / std_c) + mean_b).to(codes.dtype)


def affine_rows(book: nn.Module, rows: Tensor, books_axis: int = 0) -> Tensor:
    """The rows mapped into the codebook's statistics: (x - mu_b) * s_c / s_b + mu_c.

    The inverse of ``affine_codes``; the peer applies it to the rows before the codebook EMA.

    Args:
        book: a module set up by ``register_affine_buffers`` and updated at least once.
        rows: float, any shape (..., D) whose axis ``books_axis`` indexes the codebooks: (books, M, D)
            with the default 0, or a quantizer's (..., H, D) rows with ``books_axis=-2``. With one
            codebook that axis may have any size (the statistics broadcast over it).
        books_axis: the axis of ``rows`` that indexes the codebooks (not the last).

    Returns:
        Tensor like ``rows``, in its dtype.

    Raises:
        RuntimeError: no batch statistics yet. TypeError / ValueError: ``rows`` of a wrong type or
            shape, or ``books_axis`` out of range or the last axis.
    """
    mean_c, mean_b, std_c, std_b = _affine_terms(book, rows, "rows", books_axis)
    return ((rows - mean_b) * (std_c / std_b) + mean_c).to(rows.dtype)


def _affine_terms(book: nn.Module, t: Tensor, name: str, books_axis: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mu_c, mu_b, s_c, s_b), viewed to broadcast against ``t`` along ``books_axis``, after checks."""
    if book._buffers.get("batch_mean") is None:
        raise RuntimeError("affine statistics have no batch values yet: call update_affine_ first")
    books, _, dim = book.codebook_mean.shape
    check_float_tensor(t, name, min_dim=2)
    ndim = t.dim()
    is_axis = is_int(books_axis) and -ndim <= books_axis < ndim
    if not is_axis or books_axis % ndim == ndim - 1:
        raise ValueError(f"books_axis must be an axis of {name} other than the last, got {books_axis!r}")
    if t.shape[-1] != dim or (books > 1 and t.shape[books_axis] != books):
        raise ValueError(
            f"{name} must have {books} codebooks on axis {books_axis} and D = {dim} last, got shape {tuple(t.shape)}"
        )
    view = [1] * ndim
    view[books_axis], view[-1] = books, dim  # (books, 1, D) statistics on t's axes
    codebook_std = book.codebook_variance.clamp(min=VARIANCE_FLOOR).sqrt()
    batch_std = book.batch_variance.clamp(min=VARIANCE_FLOOR).sqrt()
    stats = (book.codebook_mean, book.batch_mean, codebook_std, batch_std)
    return tuple(s.reshape(view) for s in stats)


def _moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per book and dimension, the mean and population variance of ``t`` (books, M, D): (books, 1, D)."""
    t = t.detach().to(torch.promote_types(t.dtype, torch.float32))
    variance, mean = torch.var_mean(t, dim=1, keepdim=True, correction=0)
    return mean, variance


def _update_with_decay_(book: nn.Module, name: str, new: Tensor, decay: float) -> None:
    """First value as is (None buffer, or its ``_needs_init`` flag set), then an in-place EMA."""
    old = book._buffers[name]
    if old is None:
        book.register_buffer(name, new.clone())
        return
    needs_init = book._buffers.get(name + "_needs_init")
    ema = old * decay + new * (1.0 - decay)
    if needs_init is not None:
        # a tensor select, not a Python branch on the flag: no host sync
        ema = torch.where(needs_init, new.to(old.dtype), ema)
        needs_init.fill_(False)
    old.copy_(ema)


def _check_books(t: object, name: str, books: int, dim: int) -> None:
    """Raise unless ``t`` is a (books, *, dim) floating tensor."""
    check_float_tensor(t, name)
    if t.dim() != 3 or t.shape[0] != books or t.shape[2] != dim:
        raise ValueError(f"{name} must have shape ({books}, *, {dim}), got {tuple(t.shape)}")


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer; CPU when it has none."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
