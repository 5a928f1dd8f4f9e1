"""vector-quantize-pytorch's keywords: the few fastvq accepts only at their default, and the option
combinations the peer refuses.

Drop-in use means every peer keyword must be accepted; an option fastvq does not implement is
accepted at its default (where it changes nothing) and raises NotImplementedError otherwise, so a
model never silently trains differently from the peer. Combinations the peer refuses with an
``assert`` are refused here with a ValueError that names them.
"""

from __future__ import annotations

from typing import Any

# Peer constructor keywords of VectorQuantize not implemented here, with the peer's defaults
# (release 1.32; accepted at these values).
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "sync_affine_param": False,  # True: affine statistics summed over ranks
}

# VectorQuantize.forward keywords not implemented here, with the peer's defaults.
UNSUPPORTED_FORWARD_OPTIONS: dict[str, Any] = {}


def check_peer_combinations(
    *,
    straight_through: bool,
    rotation_trick: bool,
    directional_reparam: bool,
    threshold_ema_dead_code: float,
    learnable_codebook: bool,
    sync_update_v: float,
    vq_bridge: object,
    ema_update: bool | None,
    affine_param: bool,
    use_cosine_sim: bool,
) -> None:
    """Refuse, as ValueError, the VectorQuantize option combinations the peer refuses (by assert).

    Args: the resolved options (``rotation_trick`` and ``learnable_codebook`` after their defaults).

    Raises:
        ValueError: naming the options that conflict.
    """
    if sum(map(bool, (straight_through, rotation_trick, directional_reparam))) > 1:
        raise ValueError(
            "at most one of straight_through, rotation_trick and directional_reparam may be True (rotation_trick "
            f"defaults to True for dim > 1), got {straight_through=}, {rotation_trick=}, {directional_reparam=}"
        )
    if directional_reparam and threshold_ema_dead_code == 0:
        raise ValueError("directional_reparam=True needs dead-code revival: pass threshold_ema_dead_code > 0")
    if straight_through and learnable_codebook:
        raise ValueError("straight_through=True (Gumbel) cannot be combined with learnable_codebook=True")
    if not 0.0 <= sync_update_v <= 1.0:
        raise ValueError(f"sync_update_v must lie in [0, 1], got {sync_update_v}")
    if sync_update_v > 0 and not learnable_codebook:
        raise ValueError("sync_update_v > 0 needs learnable_codebook=True")
    if vq_bridge is not None and (not learnable_codebook or ema_update):
        raise ValueError("vq_bridge needs learnable_codebook=True and ema_update=False")
    if affine_param and use_cosine_sim:
        raise ValueError("affine_param=True works with euclidean codebooks only (use_cosine_sim=False)")


def check_unsupported(where: str, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Check peer keywords ``given`` (name -> value) against ``defaults`` (name -> peer default).

    Raises:
        TypeError: a keyword the peer does not have either (the message names ``where``).
        NotImplementedError: a peer keyword given at a value other than its default (the peer's
            option that fastvq does not implement).
    """
    for name, value in given.items():
        if name not in defaults:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        default = defaults[name]
        if value is not default and value != default:
            raise NotImplementedError(
                f"{where}: vector-quantize-pytorch's option {name}={value!r} is not implemented in fastvq "
                f"(only its default {default!r} is accepted)"
            )


def skips_ema_update(where: str, ema_update: bool | None, module_ema_update: bool, revives_dead_codes: bool) -> bool:
    """Whether a forward's ``ema_update`` keyword asks to skip this call's EMA update.

    The peer's per-call ``ema_update`` is implemented only as False on an EMA codebook without
    dead-code revival (revival runs inside the update); None or the module's own value change nothing.

    Raises:
        NotImplementedError: any other override (the message names ``where``).
    """
    skip = ema_update is not None and bool(ema_update) != module_ema_update
    if skip and (ema_update or revives_dead_codes):
        raise NotImplementedError(
            f"{where}: ema_update={ema_update!r} is implemented only as False on an EMA "
            "codebook without dead-code revival (skip this forward's update)"
        )
    return skip
