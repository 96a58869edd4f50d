"""Registry-driven property tests: every registered operator (task x backend present, and the
algebra) is enrolled by :func:`d3ip_cli.physics.registry.operator_cases`."""

from __future__ import annotations

import pytest
import torch

from d3ip_cli.physics.base import (
    Compose,
    LinearOperator,
    adjointness_error,
    autograd_adjoint_error,
    linearity_error,
    normal_error,
)
from d3ip_cli.physics.registry import TASKS, operator_cases

CASES = operator_cases()
IDS = [c.id for c in CASES]


def test_every_task_is_enrolled():
    ids = " ".join(IDS)
    for task in TASKS:
        assert f"{task}[" in ids


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_float64(case, device, gen):
    op = case.build(gen).to(device)
    assert adjointness_error(op, dtype=torch.float64, device=device, generator=gen) < case.tol


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_float32(case, device, gen):
    op = case.build(gen).to(device)
    assert adjointness_error(op, dtype=torch.float32, device=device, generator=gen) < 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_matches_autograd(case, device, gen):
    op = case.build(gen).to(device)
    assert autograd_adjoint_error(op, dtype=torch.float64, device=device, generator=gen) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_linearity_and_normal(case, device, gen):
    op = case.build(gen).to(device)
    assert linearity_error(op, device=device, generator=gen) < 1e-6
    assert normal_error(op, device=device, generator=gen) < 1e-10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_batch_and_select(case, gen):
    op = case.build(gen)
    dtype = torch.complex128 if op.complex_input else torch.float64
    x = torch.randn(op.in_shape, dtype=dtype, generator=gen)
    y = op.A(x)
    assert tuple(y.shape) == op.out_shape and tuple(op.A_adjoint(y).shape) == op.in_shape
    assert op.H.H is op and op.H.in_shape == op.out_shape
    with pytest.raises(ValueError, match="shape"):
        op.A(x[:, :-1])
    if op.in_shape[0] > 1 and not type(op).__name__.startswith("Finite"):
        sub = op.select([0, op.in_shape[0] - 1])
        torch.testing.assert_close(sub.A(x[[0, -1]]), y[[0, -1]])


@pytest.mark.parametrize("case", [c for c in CASES if not c.id.startswith("algebra")], ids=lambda c: c.id)
def test_gradients_flow_both_ways(case, gen):
    """Autograd through A and A^H, including a gradient of a gradient (engine adaptation)."""
    op = case.build(gen)
    dtype = torch.complex128 if op.complex_input else torch.float64
    x = torch.randn(op.in_shape, dtype=dtype, generator=gen, requires_grad=True)
    y = op.A(x)
    loss = (y.abs() ** 2).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (gg,) = torch.autograd.grad((g.abs() ** 2).sum(), x)
    assert torch.isfinite(gg.abs()).all() and gg.abs().sum() > 0
    yy = torch.randn_like(y.detach()).requires_grad_(True)
    (gy,) = torch.autograd.grad((op.A_adjoint(yy).abs() ** 2).sum(), yy)
    assert gy.shape == y.shape


def test_composition_checks_shapes(gen):
    ct = operator_cases()[0].build(gen)
    with pytest.raises(ValueError, match="cannot compose"):
        Compose([ct, ct])
    assert isinstance(ct.H @ ct, LinearOperator)
    torch.testing.assert_close((ct.H @ ct).A(torch.ones(ct.in_shape, dtype=torch.float64)),
                               ct.normal(torch.ones(ct.in_shape, dtype=torch.float64)))
    scaled = 3.0 * ct
    x = torch.rand(ct.in_shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(scaled.A(x), 3.0 * ct.A(x))
