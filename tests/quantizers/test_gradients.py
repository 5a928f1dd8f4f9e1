"""Gradient estimators alone: values bitwise equal to the codes, gradients against explicit
matrices built in fp64 from the paper's definition."""

import pytest
import torch

from fastvq.quantizers.gradients import directional_reparam, estimate, rotate_to, straight_through, sync_update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_value_is_the_code_and_gradient_the_identity(dtype):
    z = torch.randn(3, 7, 5, requires_grad=True)
    e = torch.randn(3, 7, 5).to(dtype).requires_grad_()
    out = straight_through(z, e)
    assert out.dtype == dtype and torch.equal(out, e)  # bitwise
    g = torch.randn(3, 7, 5).to(dtype)
    gz, ge = torch.autograd.grad(out, (z, e), g)
    assert torch.equal(gz, g.float()) and torch.equal(ge, g)  # the code's own gradient passes too


def _rotation_reference(z: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz = (||e|| / ||z||) R^T g per row, R the explicit D x D rotation taking z^ to e^ (fp64)."""
    out = torch.empty_like(g)
    d = z.shape[-1]
    for i in range(z.shape[0]):
        u, w = z[i] / z[i].norm(), e[i] / e[i].norm()
        r = (u + w) / (u + w).norm()
        rot = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(w, u)
        torch.testing.assert_close(rot @ u, w)  # it is the rotation it claims to be
        torch.testing.assert_close(rot.T @ rot, torch.eye(d, dtype=torch.float64))
        out[i] = (e[i].norm() / z[i].norm()) * rot.T @ g[i]
    return out


def test_rotate_to_value_and_gradient_on_odd_shapes():
    z = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    out = rotate_to(z, e)
    assert torch.equal(out, e)
    g = torch.randn(3, 7, 5, dtype=torch.float64)
    (gz,) = torch.autograd.grad(out, z, g)
    expected = _rotation_reference(z.detach().reshape(-1, 5), e.detach().reshape(-1, 5), g.reshape(-1, 5))
    torch.testing.assert_close(gz.reshape(-1, 5), expected)
    assert torch.autograd.grad(rotate_to(z, e).sum(), e, allow_unused=True)[0] is None  # e is detached


def test_rotate_to_keeps_the_gradient_norm_ratio():
    z = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    e = 3 * torch.randn(11, 4, dtype=torch.float64)
    g = torch.randn(11, 4, dtype=torch.float64)
    (gz,) = torch.autograd.grad(rotate_to(z, e), z, g)
    # a rotation keeps norms: ||dz|| = (||e|| / ||z||) ||g||
    torch.testing.assert_close(gz.norm(dim=-1), e.norm(dim=-1) / z.detach().norm(dim=-1) * g.norm(dim=-1))


def test_rotate_to_zero_vectors_stay_finite():
    z = torch.zeros(2, 3, requires_grad=True)
    e = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    out = rotate_to(z, e)
    assert torch.equal(out, e)
    (gz,) = torch.autograd.grad(out.sum(), z)
    assert bool(torch.isfinite(gz).all())


def test_estimate_dispatches():
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 3, dtype=torch.float64)
    g = torch.randn(6, 3, dtype=torch.float64)
    (st,) = torch.autograd.grad(estimate(z, e, rotation_trick=False), z, g)
    (rot,) = torch.autograd.grad(estimate(z, e, rotation_trick=True), z, g)
    assert torch.equal(st, g)
    torch.testing.assert_close(rot, _rotation_reference(z.detach(), e, g))


# --- DiVeQ directional reparameterisation and the synchronous update rule ---------------------


def _diveq_reference(z, e, noise, variance):
    """Value z + unit(e - z + sqrt(v) n) ||e - z|| and the hand-derived gradients, fp64, per row.

    With u the (constant) noised direction and w = (e - z) / ||e - z||: dz = g - w (u . g),
    de = w (u . g)."""
    z, e, noise = z.double(), e.double(), noise.double()
    err = e - z
    dist = err.norm(dim=-1, keepdim=True)
    noised = err + variance**0.5 * noise
    u = noised / noised.norm(dim=-1, keepdim=True)
    w = err / dist

    def grads(g):
        ug = (u * g.double()).sum(-1, keepdim=True)
        return g.double() - w * ug, w * ug

    return z + u * dist, grads


@pytest.mark.parametrize("variance", [5e-3, 0.7])
def test_directional_reparam_value_and_gradients_against_the_reference(variance):
    z = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    out = directional_reparam(z, e, variance, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(4, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    value, grads = _diveq_reference(z.detach(), e.detach(), noise, variance)
    torch.testing.assert_close(out, value)
    g = torch.randn(4, 9, 5, dtype=torch.float64)
    gz, ge = torch.autograd.grad(out, (z, e), g)
    ref_gz, ref_ge = grads(g)
    torch.testing.assert_close(gz, ref_gz)
    torch.testing.assert_close(ge, ref_ge)
    # ||out - z|| = ||e - z||: only the direction is noised
    torch.testing.assert_close((out - z).norm(dim=-1), (e - z).norm(dim=-1))


def test_directional_reparam_without_noise_is_the_code():
    z = torch.randn(31, 3)
    e = torch.randn(31, 3)
    torch.testing.assert_close(directional_reparam(z, e, 0.0), e)
    same = directional_reparam(e, e.clone(), 0.5)  # zero distance: z itself, no NaN
    assert torch.equal(same, e)


def test_directional_reparam_uses_the_global_rng_as_the_peer():
    peer = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    z, e = torch.randn(2, 13, 6), torch.randn(2, 13, 6)
    torch.manual_seed(3)
    ours = directional_reparam(z, e, 5e-3)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, peer.directional_reparam(z, e, 5e-3))


def test_directional_reparam_errors():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="variance must be a finite float >= 0"):
        directional_reparam(z, z, -1e-3)
    with pytest.raises(ValueError, match="z and e must have one shape"):
        directional_reparam(z, torch.randn(3, 5), 0.1)
    with pytest.raises(TypeError, match="e must"):
        directional_reparam(z, [1.0], 0.1)


@pytest.mark.parametrize("v", [0.0, 0.3, 1.0])
def test_sync_update_keeps_the_value_and_scales_the_gradient(v):
    z = torch.randn(5, 7, 3, requires_grad=True)
    e = torch.randn(5, 7, 3)
    q = straight_through(z, e)
    out = sync_update(q, v)
    assert torch.equal(out, e)
    g = torch.randn(5, 7, 3)
    (gz,) = torch.autograd.grad(out, z, g)
    torch.testing.assert_close(gz, (1.0 + v) * g)


def test_sync_update_rejects_v_outside_the_unit_interval():
    q = torch.randn(3)
    for v in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="v must be a float in"):
            sync_update(q, v)
