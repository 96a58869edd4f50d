"""CG, proximal data consistency, CGLS and the power method."""

from __future__ import annotations

import torch

from d3ip_cli.physics.registry import make_operator
from d3ip_cli.physics.solvers import cg, cg_normal, cgls, cgls_discrepancy, power_norm, prox_l2


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def test_cg_solves_spd_system(gen):
    a = _spd(12, gen)
    b = torch.randn(1, 12, dtype=torch.float64, generator=gen)
    x = cg(lambda v: v @ a, b, n_iter=40)
    torch.testing.assert_close(x @ a, b)


def test_cg_is_differentiable(gen):
    """Fixed-iteration CG is an exact function of its inputs: gradients match finite differences."""
    a = _spd(6, gen)
    b = torch.randn(1, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda v: cg(lambda t: t @ a, v, n_iter=3), (b,))


def test_per_slice_cg_equals_independent_solves(gen):
    op = make_operator("cs-mri", (3, 16, 12), acceleration=2, coils=2, generator=gen)
    x = torch.rand(op.in_shape, dtype=torch.float64, generator=gen)
    y = op.A(x)
    both = cg_normal(op, y, n_iter=4, per_slice=True)
    one = cg_normal(op.select([1]), y[[1]], n_iter=4, per_slice=True)
    torch.testing.assert_close(both[[1]], one)


def test_cgls_reaches_least_squares(gen):
    op = make_operator("sparse-view", (2, 12, 12), views=30, det_count=17)
    x = torch.rand(op.in_shape, dtype=torch.float64, generator=gen)
    y = op.A(x)
    rec = cgls(op, y, n_iter=200)
    assert float((op.A(rec) - y).norm() / y.norm()) < 1e-6


def test_prox_l2_limits(gen):
    op = make_operator("cs-mri", (1, 16, 12), acceleration=2, generator=gen)
    x = torch.rand(op.in_shape, dtype=torch.float64, generator=gen).to(torch.complex128)
    y = op.A(x)
    x_hat = torch.zeros_like(x)
    assert float(prox_l2(op, y, x_hat, 0.0, 5).abs().max()) == 0.0
    strong = prox_l2(op, y, x_hat, 1e6, 10)
    assert float((op.A(strong) - y).norm() / y.norm()) < 1e-4


def test_power_norm(gen):
    op = make_operator("cs-mri", (1, 16, 12), acceleration=2, generator=gen)
    assert abs(power_norm(op, 30, gen) - 1.0) < 1e-3
    scaled = 2.5 * op
    assert abs(power_norm(scaled, 30, gen) - 2.5) < 1e-2


def test_cg_stays_put_on_a_singular_projection(gen):
    """Single-coil Cartesian MRI: A^H A is a projection, so CG fits y in one step; further
    iterations must not amplify the rounding noise left in the residual (float32 and float64)."""
    for dtype in (torch.complex64, torch.complex128):
        op = make_operator("cs-mri", (2, 32, 32), acceleration=4.0, generator=gen)
        truth = torch.randn(2, 32, 32, generator=gen).to(dtype)
        y = op.A(truth)
        start = torch.randn(2, 32, 32, generator=gen).to(dtype)
        one = cg(op.normal, op.A_adjoint(y), x0=start, n_iter=1, per_slice=True)
        many = cg(op.normal, op.A_adjoint(y), x0=start, n_iter=30, per_slice=True)
        assert torch.isfinite(many).all()
        torch.testing.assert_close(op.A(many), y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-4)


def test_discrepancy_cgls_with_a_zero_target_is_cg_on_the_normal_equations(gen):
    """target 0: the same iterates as CG on A^H A x = A^H y from the same start (exact arithmetic)."""
    op = make_operator("sparse-view", (3, 16, 16), views=10)
    x = torch.rand(op.in_shape, dtype=torch.float64, generator=gen)
    y = op.A(x)
    start = torch.rand(op.in_shape, dtype=torch.float64, generator=gen)
    a = cgls_discrepancy(op, y, start, torch.zeros(3), n_iter=6)
    b = cg(op.normal, op.A_adjoint(y), x0=start, n_iter=6, per_slice=True)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_discrepancy_cgls_lands_each_slice_on_its_target(gen):
    """Noisy CT data: each slice stops with ||A_i x - y_i||^2 equal to its own target (the crossing
    step is shortened), and a slice whose start already meets its target does not move."""
    op = make_operator("sparse-view", (3, 16, 16), views=10)
    x = torch.rand(op.in_shape, dtype=torch.float64, generator=gen)
    y = op.A(x) + 0.05 * torch.randn(op.out_shape, dtype=torch.float64, generator=gen)
    start = torch.zeros_like(x)
    r0 = ((op.A(start) - y) ** 2).reshape(3, -1).sum(1)
    target = torch.tensor([0.02, 0.3, 2.0]) * r0
    target[2] = 2.0 * r0[2]  # already met
    out = cgls_discrepancy(op, y, start, target, n_iter=300)
    res = ((op.A(out) - y) ** 2).reshape(3, -1).sum(1)
    torch.testing.assert_close(res[:2], target[:2].double(), rtol=1e-6, atol=0.0)
    assert torch.equal(out[2], start[2])


def test_discrepancy_cgls_blends_on_a_projection(gen):
    """Single-coil Cartesian MRI (A^H A a projection, fitted by one CG step): a positive target
    stops part-way along that step, between the start and the exact fit, instead of jumping to it."""
    op = make_operator("cs-mri", (1, 32, 32), acceleration=4.0, generator=gen)
    truth = torch.randn(1, 32, 32, generator=gen, dtype=torch.float64).to(torch.complex128)
    y = op.A(truth)
    start = torch.zeros_like(truth)
    r0 = float((y.abs() ** 2).sum())
    out = cgls_discrepancy(op, y, start, torch.tensor([0.25 * r0]), n_iter=10)
    torch.testing.assert_close(float((op.A(out) - y).abs().pow(2).sum()), 0.25 * r0, rtol=1e-6, atol=0.0)
    exact = cgls_discrepancy(op, y, start, torch.zeros(1), n_iter=10)
    torch.testing.assert_close(out, 0.5 * exact)  # the residual halves in norm at half the step
