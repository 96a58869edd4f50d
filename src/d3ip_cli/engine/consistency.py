r"""Data-consistency steps ``dc(x0_hat) -> x0_tilde`` built from ``(operator, y)`` (DESIGN §6).

All act on images in the engine's normalised units, ``[Z, H, W]`` (complex for MRI):

* :func:`cg_dc` — DDS-style: a few CG iterations on :math:`A^H A x = A^H y` started at
  :math:`\hat x_0` (the Krylov subspace keeps the prior's estimate where the data are silent);
* :func:`prox_dc` — the proximal form :math:`(I + \gamma A^H A)x = \hat x_0 + \gamma A^H y`
  (the MRI default);
* :func:`discrepancy_dc` — CG (in its CGLS form) from :math:`\hat x_0` until each slice's residual
  falls to a target set by the noise (:meth:`~d3ip_cli.physics.noise.NoiseLevel.target`: a
  fraction :math:`\tau^2` of the noise the data can be fitted to is left, Morozov's discrepancy
  principle at :math:`\tau = 1`; the exact fit, within a cap, for noiseless data): how far to fit
  is set by the noise, not by a fixed count of steps;
* :func:`admm_tv_z_dc` — DiffusionMBIR coupling across slices:

  .. math:: \min_x \tfrac12\|Ax - y\|^2 + \lambda \|D_z x\|_1

  by ADMM with :math:`z = D_z x`: the x-update solves
  :math:`(A^HA + \rho D_z^T D_z)x = A^H y + \rho D_z^T(z - u)` by CG from the current
  estimate, then :math:`z = \mathrm{soft}(D_z x + u, \lambda/\rho)`, :math:`u \mathrel{+}= D_z x - z`.

Each factory returns a plain callable, so the one sampler takes them interchangeably.
"""

from __future__ import annotations

from typing import Callable

import torch

from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.finite_diff import diff_adjoint, diff_forward
from d3ip_cli.physics.solvers import cg, cgls_discrepancy

DC = Callable[[torch.Tensor], torch.Tensor]


def cg_dc(op: LinearOperator, y: torch.Tensor, n_iter: int = 5, groups: int = 1) -> DC:
    """``x0 -> CG_n(A^H A x = A^H y; start x0)`` (``groups``: see :func:`~d3ip_cli.physics.solvers.cg`)."""
    rhs = op.A_adjoint(y)

    def dc(x0: torch.Tensor) -> torch.Tensor:
        if n_iter <= 0:
            return x0
        return cg(op.normal, rhs, x0=x0.to(rhs.dtype) if rhs.is_complex() else x0, n_iter=n_iter, groups=groups)

    return dc


def prox_dc(op: LinearOperator, y: torch.Tensor, gamma: float = 1.0, n_iter: int = 5, groups: int = 1) -> DC:
    """``x0 -> argmin ½‖x − x0‖² + γ/2 ‖Ax − y‖²`` by CG warm-started at ``x0`` (``groups``: see
    :func:`~d3ip_cli.physics.solvers.cg`)."""
    aty = op.A_adjoint(y)

    def dc(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(aty.dtype) if aty.is_complex() else x0
        return cg(lambda v: v + gamma * op.normal(v), x0 + gamma * aty, x0=x0, n_iter=n_iter, groups=groups)

    return dc


def discrepancy_dc(op: LinearOperator, y: torch.Tensor, target: torch.Tensor, n_iter: int = 50) -> DC:
    """``x0 -> CGLS from x0``, slice ``i`` stopped at :math:`\\|A_i x - y_i\\|^2` = ``target[i]`` (at most
    ``n_iter`` steps; see :meth:`~d3ip_cli.physics.noise.NoiseLevel.target`)."""
    t = target.to(device=y.device, dtype=y.real.dtype if y.is_complex() else y.dtype)

    def dc(x0: torch.Tensor) -> torch.Tensor:
        return cgls_discrepancy(op, y, x0, t, n_iter=n_iter)

    return dc


def _soft(v: torch.Tensor, thresh: float) -> torch.Tensor:
    if v.is_complex():
        mag = v.abs()
        return v * torch.clamp(1 - thresh / mag.clamp_min(1e-12), min=0)
    return torch.sign(v) * torch.clamp(v.abs() - thresh, min=0)


def admm_tv_z_dc(op: LinearOperator, y: torch.Tensor, *, rho: float = 0.5, lam: float = 0.01, n_admm: int = 5,
                 n_cg: int = 5, groups: int = 1) -> DC:
    """DiffusionMBIR's ADMM step with total variation along the slice axis (couples slices).

    ``groups``: the slice axis holds that many stacked volumes (posterior samples drawn together); the
    differences along z, and CG's step sizes, stay within each.
    """
    aty = op.A_adjoint(y)

    def diff_z(v: torch.Tensor) -> torch.Tensor:
        return diff_forward(v.unflatten(0, (groups, -1)), 1).flatten(0, 1)

    def diff_z_adjoint(v: torch.Tensor) -> torch.Tensor:
        return diff_adjoint(v.unflatten(0, (groups, -1)), 1).flatten(0, 1)

    def normal(v: torch.Tensor) -> torch.Tensor:
        return op.normal(v) + rho * diff_z_adjoint(diff_z(v))

    def dc(x0: torch.Tensor) -> torch.Tensor:
        x = x0.to(aty.dtype) if aty.is_complex() else x0
        z = diff_z(x)
        u = torch.zeros_like(z)
        for _ in range(n_admm):
            x = cg(normal, aty + rho * diff_z_adjoint(z - u), x0=x, n_iter=n_cg, groups=groups)
            dzx = diff_z(x)
            z = _soft(dzx + u, lam / rho)
            u = u + dzx - z
        return x

    return dc
