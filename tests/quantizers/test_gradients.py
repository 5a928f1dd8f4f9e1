"""Gradient estimators alone: values bitwise equal to the codes, gradients against explicit
matrices built in fp64 from the paper's definition."""

import pytest
import torch

from fastvq.quantizers.gradients import estimate, rotate_to, straight_through


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
