"""Gradient estimators: how a gradient crosses the non-differentiable step from z to its code e.

Every estimator but DiVeQ returns e's value in forward (bitwise) and differs only in what backward
gives z.

* Straight-through (van den Oord et al. 2017; Bengio et al. 2013): dz = dq. ``VectorQuantizer``
  gets it from the fused op ``fastvq.functional.vector_quantize``, whose backward passes zq's
  gradient to z unchanged (together with the exact gradients of the two VQ loss terms), so no
  ``z + (e - z).detach()`` appears in the module. ``straight_through`` is the same estimator for
  code paths without the fused op (a residual stack's sum, LFQ's signs).
* Rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick"):
  ``rotate_to``; dz = s R^T dq keeps the angle between z and its code in the gradient.
* Directional reparameterisation (DiVeQ, https://openreview.net/forum?id=KRVnpTbx7R, figure 1):
  ``directional_reparam``; z moved by ||e - z|| along a noised, detached direction to e, so both
  z and the code (through the distance) get a gradient. Its value is e only up to the noise.
* Synchronous update, rule (21) of vqtorch's draft
  (https://minyoungg.github.io/vqtorch/assets/draft_050523.pdf): ``sync_update`` scales the
  gradient of any of the above by (1 + v), keeping the value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvq.checks import check_float_tensor


def straight_through(z: Tensor, e: Tensor) -> Tensor:
    """e's value with the identity gradient to z (straight-through estimator).

    Args:
        z: (..., D) float, the input to quantization. e: (..., D) its codes (any float dtype).

    Returns:
        (..., D) in e's dtype: e + (z - sg(z)), which is e bitwise in forward (z - z is exactly 0
        for finite z); d out / d z = I. e's own gradient, if any, passes too.
    """
    return e + (z - z.detach()).to(e.dtype)


def rotate_to(z: Tensor, e: Tensor) -> Tensor:
    """The rotation trick: e's value in forward, a rotation-scaling of the gradient in backward.

    f(z) = s R z with s = ||e|| / ||z|| and R the rotation taking z^ to e^, both held constant
    (Householder form R = I - 2 r r^T + 2 e^ z^T, r = (z^ + e^) / ||z^ + e^||). Forward returns
    e + (f(z) - sg(f(z))), which is e bitwise; backward gives dz = s R^T dq instead of the
    straight-through dz = dq, so the gradient keeps the angle between z and its code.

    Args:
        z: (..., D) float, the input to quantization. e: (..., D) its codes, same dtype; e's own
            gradient is not passed (it is detached), as in the paper.

    Returns:
        (..., D) equal to e. Zero vectors are clamped to norm 1e-12 (no NaN).
    """
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        e_norm = e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u, q = z / z_norm, e / e_norm
        r = F.normalize(u + q, dim=-1, eps=1e-12)
        scale = e_norm / z_norm
    rz = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * q * (u * z).sum(-1, keepdim=True)
    f = scale * rz
    return e.detach() + (f - f.detach())


def estimate(z: Tensor, e: Tensor, rotation_trick: bool) -> Tensor:
    """``rotate_to(z, e)`` if ``rotation_trick`` else ``straight_through(z, e)``; shapes as those."""
    return rotate_to(z, e) if rotation_trick else straight_through(z, e)


# vector-quantize-pytorch's l2norm eps: a zero direction stays zero instead of becoming NaN.
_NORM_EPS = 1e-6


def directional_reparam(z: Tensor, e: Tensor, variance: float, *, generator: torch.Generator | None = None) -> Tensor:
    """DiVeQ's directional reparameterisation: z + sg(unit(e - z + sqrt(variance) n)) ||e - z||.

    n is standard normal noise; the unit direction is detached, the distance ||e - z|| is not, so
    z gets dq - (e - z)/||e - z|| (u . dq) and e gets (e - z)/||e - z|| (u . dq), u the direction.
    With ``variance = 0`` the value is e (up to rounding); a zero distance gives z.

    Args:
        z: (..., D) float, the input to quantization. e: (..., D) its codes, same shape and dtype.
        variance: float >= 0, the variance of the noise on the direction (peer default 5e-3).
        generator: optional torch.Generator for the noise (else torch's global RNG); the noise is
            drawn on the generator's device and moved to z's.

    Returns:
        (..., D) in z's dtype, differentiable w.r.t. z and e.

    Raises:
        TypeError: z or e not a floating tensor. ValueError: shapes or dtypes differ; ``variance``
            negative, not finite or not a real number.
    """
    check_float_tensor(z, "z")
    check_float_tensor(e, "e")
    if z.shape != e.shape or z.dtype != e.dtype:
        raise ValueError(
            f"z and e must have one shape and dtype, got z {tuple(z.shape)} {z.dtype} and e {tuple(e.shape)} {e.dtype}"
        )
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 <= variance < math.inf:
        raise ValueError(f"variance must be a finite float >= 0, got {variance!r}")
    error = e - z  # (..., D)
    if generator is None:
        noise = torch.randn(error.shape, dtype=error.dtype, device=error.device)
    else:
        noise = torch.randn(error.shape, dtype=error.dtype, device=generator.device, generator=generator)
    direction = F.normalize(error.detach() + math.sqrt(variance) * noise.to(error.device), dim=-1, eps=_NORM_EPS)
    return z + direction * error.norm(dim=-1, keepdim=True)


def sync_update(q: Tensor, v: float) -> Tensor:
    """The synchronous update rule (21): q + v (q - sg(q)), q's value with its gradient times (1 + v).

    Applied after the estimator, it makes the codebook step "optimistic" (v > 0): the code moves as
    if the encoder's update were already taken.

    Args:
        q: (...) float, the quantizer's output (after the gradient estimator).
        v: float in [0, 1]; 0 returns q's value and gradient unchanged.

    Returns:
        Tensor like q, equal to q bitwise for finite q; d out / d q = (1 + v) I.

    Raises:
        TypeError: q not a floating tensor. ValueError: v not a real number in [0, 1].
    """
    check_float_tensor(q, "q", min_dim=0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"v must be a float in [0, 1], got {v!r}")
    return q + v * (q - q.detach())
