"""vector-quantize-pytorch keywords that fastvq accepts only at the peer's default value.

Drop-in use means every peer keyword must be accepted; an option fastvq does not implement is
accepted at its default (where it changes nothing) and raises NotImplementedError otherwise, so a
model never silently trains differently from the peer.
"""

from __future__ import annotations

from typing import Any

# Peer constructor keywords of VectorQuantize not implemented here, with the peer's defaults
# (release 1.32; accepted at these values).
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "sync_kmeans": True,
    "layernorm_after_project_in": False,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_codebook": None,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "route_gradients_to_input": True,
}

# VectorQuantize.forward keywords not implemented here, with the peer's defaults.
UNSUPPORTED_FORWARD_OPTIONS: dict[str, Any] = {
    "indices": None,
    "topk": None,
    "codebook_transform_fn": None,
    "ema_update_weight": None,
    "accum_ema_update": False,
}


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
