"""Gradient estimators: how a gradient crosses the non-differentiable step from z to its code e.

Every estimator returns e's value in forward (bitwise) and differs only in what backward gives z.

* Straight-through (van den Oord et al. 2017; Bengio et al. 2013): dz = dq. ``VectorQuantizer``
  gets it from the fused op ``fastvq.functional.vector_quantize``, whose backward passes zq's
  gradient to z unchanged (together with the exact gradients of the two VQ loss terms), so no
  ``z + (e - z).detach()`` appears in the module. ``straight_through`` is the same estimator for
  code paths without the fused op (a residual stack's sum, LFQ's signs).
* Rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick"):
  ``rotate_to``; dz = s R^T dq keeps the angle between z and its code in the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
