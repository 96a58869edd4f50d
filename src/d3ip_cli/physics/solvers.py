"""Linear solvers over the operator interface: the data-consistency building blocks.

- :func:`cg`: conjugate gradients for a self-adjoint positive (semi-)definite ``N``,
  :math:`N x = b` (``N`` is e.g. ``op.normal``). Written with out-of-place tensor ops only,
  so a fixed number of iterations is differentiable end to end with autograd.
- :func:`prox_l2`: the proximal data-consistency step
  :math:`x = \\arg\\min_x \\tfrac12\\|x - \\hat x_0\\|^2 + \\tfrac\\gamma2 \\|A x - y\\|^2`, i.e.
  :math:`(I + \\gamma A^H A)\\,x = \\hat x_0 + \\gamma A^H y`, by CG warm-started at :math:`\\hat x_0`.
- :func:`cg_normal`: CG on :math:`A^H A x = A^H y` from ``x0`` (DDS-style data consistency).
- :func:`cgls`: least squares :math:`\\min \\|Ax - y\\|^2` (CGLS, numerically safer than CG on the
  normal equations).
- :func:`cgls_discrepancy`: CGLS from a start, each slice stopped where its residual reaches the
  noise (the discrepancy principle), the crossing step shortened to land on it.
- :func:`power_norm`: the operator norm :math:`\\|A\\|_2` by power iteration.

Inner products are real parts of complex ones (the normal operators are Hermitian).
With ``per_slice=True`` every slice of a ``[Z, ...]`` batch gets its own step sizes, which
is equivalent to solving the slices independently (valid for slice-separable operators).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from d3ip_cli.physics.base import LinearOperator

Progress = Callable[[int, int, dict], None]


def _dot(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    """``<a, b>`` (real part): one scalar (``blocks = 0``), or one for each of ``blocks`` equal blocks of
    axis 0 (``blocks = Z``: one per slice)."""
    p = (a.conj() * b).real if (a.is_complex() or b.is_complex()) else a * b
    return p.reshape(blocks, -1).sum(dim=1) if blocks else p.sum()


def _bc(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar, a per-slice vector ``a [Z]`` or a per-block vector against ``t [Z, ...]``."""
    if a.ndim == 0:
        return a
    if a.shape[0] != t.shape[0]:  # one value per block of equal size
        if t.shape[0] % a.shape[0]:
            raise ValueError(f"{a.shape[0]} step sizes cannot cover {t.shape[0]} slices in equal blocks")
        a = a.repeat_interleave(t.shape[0] // a.shape[0])
    return a.reshape((-1,) + (1,) * (t.ndim - 1))


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    safe = den.abs() > torch.finfo(den.dtype).tiny
    return torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), torch.zeros_like(num))


def cg(normal: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x0: torch.Tensor | None = None,
       n_iter: int = 10, *, tol: float = 0.0, per_slice: bool = False, groups: int = 1) -> torch.Tensor:
    """Conjugate gradients for :math:`N x = b` with ``N`` self-adjoint PSD.

    Args:
        normal: ``x -> N x`` (a callable or a :class:`LinearOperator` whose application is ``N``).
        rhs: ``b``, same shape as ``x``.
        x0: start (zeros when ``None``).
        n_iter: iterations (fixed unless ``tol > 0``).
        tol: stop when :math:`\\|r\\| \\le tol \\|b\\|` (0: always run ``n_iter``; keeps the graph static).
        per_slice: separate step sizes per slice of axis 0.
        groups: separate step sizes for each of ``groups`` equal blocks of axis 0 (as many
            independent systems stacked, e.g. the samples of ``--samples``); ignored with ``per_slice``.

    Returns:
        ``x`` with ``x.shape == rhs.shape``; differentiable w.r.t. ``rhs``, ``x0`` and
        whatever ``normal`` depends on.
    """
    blocks = rhs.shape[0] if per_slice else (groups if groups > 1 else 0)  # step sizes: one, per slice, per block
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs - normal(x) if x0 is not None else rhs
    p = r
    rs = _dot(r, r, blocks)
    stop = (tol * torch.linalg.vector_norm(rhs)) ** 2 if tol > 0 else None
    # Converged to rounding level: freeze (a singular N, e.g. a Cartesian MRI projection, fits in one
    # step; iterating on the rounding noise left in r would divide noise by noise and blow x up).
    eps = torch.finfo(rs.dtype).eps
    floor = _dot(rhs, rhs, blocks).detach() * (16 * eps) ** 2
    for _ in range(int(n_iter)):
        if stop is not None and float(rs.max()) <= float(stop):
            break
        active = rs.detach() > floor
        if not bool(active.any()):
            break
        ap = normal(p)
        alpha = torch.where(active, _div(rs, _dot(p, ap, blocks)), torch.zeros_like(rs))
        x = x + _bc(alpha, p) * p
        r = r - _bc(alpha, ap) * ap
        rs_new = _dot(r, r, blocks)
        p = r + _bc(torch.where(active, _div(rs_new, rs), torch.zeros_like(rs)), p) * p
        rs = rs_new
    return x


def cg_normal(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None, n_iter: int = 5,
              *, per_slice: bool = True) -> torch.Tensor:
    """CG on the normal equations :math:`A^H A x = A^H y` started from ``x0`` (DDS data consistency)."""
    return cg(op.normal, op.A_adjoint(y), x0, n_iter, per_slice=per_slice)


def prox_l2(op: LinearOperator, y: torch.Tensor, x_hat: torch.Tensor, gamma: float, n_iter: int = 5,
            *, per_slice: bool = True) -> torch.Tensor:
    """Solve :math:`(I + \\gamma A^H A) x = \\hat x + \\gamma A^H y` by CG from ``x_hat``.

    ``gamma -> inf`` approaches the least-squares fit closest to ``x_hat``;
    ``gamma -> 0`` returns ``x_hat``.
    """
    def normal(v: torch.Tensor) -> torch.Tensor:
        return v + gamma * op.normal(v)

    rhs = x_hat + gamma * op.A_adjoint(y)
    return cg(normal, rhs, x_hat, n_iter, per_slice=per_slice)


def _cgls_start(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CGLS's start: ``x`` (zeros when ``x0`` is ``None``, complex where the gradient is), the
    residual ``r = y - A x`` and the gradient ``s = A^H r``."""
    if x0 is None:
        dtype = y.dtype if (y.is_complex() and op.complex_input) else y.real.dtype
        x = torch.zeros(op.in_shape, dtype=dtype, device=y.device)
        r = y
    else:
        x = x0
        r = y - op.A(x)
    s = op.A_adjoint(r)
    if not x.is_complex() and s.is_complex():
        x = x.to(s.dtype)
    return x, r, s


def cgls(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None, n_iter: int = 20, *,
         per_slice: bool = True, progress: Progress | None = None) -> torch.Tensor:
    """CGLS for :math:`\\min_x \\|A x - y\\|_2^2` (early stopping regularises).

    Args:
        op: the operator; ``y`` has shape ``op.out_shape``.
        x0: start (zeros when ``None``; complex zeros for complex-input operators).
        n_iter: iterations.
        per_slice: independent step sizes per slice (exact for slice-separable operators).
        progress: ``progress(step, total, info)`` after each iteration.
    """
    x, r, s = _cgls_start(op, y, x0)
    p = s
    blocks = y.shape[0] if per_slice else 0
    gamma = _dot(s, s, blocks)
    for k in range(int(n_iter)):
        q = op.A(p)
        alpha = _div(gamma, _dot(q, q, blocks))
        x = x + _bc(alpha, p) * p
        r = r - _bc(alpha, q) * q
        s = op.A_adjoint(r)
        gamma_new = _dot(s, s, blocks)
        p = s + _bc(_div(gamma_new, gamma), p) * p
        gamma = gamma_new
        if progress is not None:
            progress(k + 1, int(n_iter), {"residual": float(torch.linalg.vector_norm(r))})
    return x


def cgls_discrepancy(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor, target: torch.Tensor,
                     n_iter: int = 50) -> torch.Tensor:
    """CGLS from ``x0``, each slice stopped by the discrepancy principle (Morozov).

    Slice ``i`` iterates until :math:`\\|A_i x_i - y_i\\|^2 \\le` ``target[i]`` (e.g. :math:`\\tau^2`
    times the expected energy of the noise in ``y_i``) or for ``n_iter`` iterations. The step
    that crosses the target is shortened so that the residual lands on it: the residual along a
    CGLS step, :math:`\\|r - \\alpha q\\|^2`, is a quadratic that decreases on :math:`[0, \\alpha^*]`,
    so early stopping here is continuous in the noise level (a projection such as single-coil
    Cartesian :math:`A^HA`, which CG fits in one step, blends :math:`x_0` and the data instead of
    jumping to the exact fit). ``target = 0`` is CGLS for ``n_iter`` iterations (the exact fit
    within them). Slice-separable operators only (step sizes are per slice).

    Args:
        op: the operator; ``y`` has shape ``op.out_shape``.
        x0: the start (the prior's estimate); complex when ``op`` takes complex images.
        target: ``[Z]`` squared residual norms to stop at (non-negative).
        n_iter: the most iterations.
    """
    x, r, s = _cgls_start(op, y, x0)
    p = s
    z = y.shape[0]
    gamma = _dot(s, s, z)
    rr = _dot(r, r, z)
    target = target.to(rr.dtype).reshape(rr.shape)
    aty = op.A_adjoint(y)
    floor = _dot(aty, aty, z) * (16 * torch.finfo(gamma.dtype).eps) ** 2
    active = (rr > target) & (gamma > floor)
    for _ in range(int(n_iter)):
        if not bool(active.any()):
            break
        q = op.A(p)
        qq = _dot(q, q, z)
        alpha = _div(gamma, qq)
        # ||r - a q||^2 = rr - 2 a c + a^2 qq with c = <r, q> (= gamma in exact arithmetic); land on
        # the target if this step crosses it
        c = _dot(r, q, z)
        after = rr - 2 * alpha * c + alpha * alpha * qq
        crosses = after < target
        disc = (c * c - qq * (rr - target)).clamp_min(0)
        short = _div(c - disc.sqrt(), qq)
        alpha = torch.where(crosses, torch.minimum(short, alpha), alpha)
        alpha = torch.where(active, alpha, torch.zeros_like(alpha))
        x = x + _bc(alpha, p) * p
        r = r - _bc(alpha, q) * q
        rr = _dot(r, r, z)
        s = op.A_adjoint(r)
        gamma_new = _dot(s, s, z)
        active = active & ~crosses & (gamma_new > floor)
        p = s + _bc(_div(gamma_new, gamma), p) * p
        gamma = gamma_new
    return x


def power_norm(op: LinearOperator, n_iter: int = 30, generator: torch.Generator | None = None,
               device: Any = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """:math:`\\|A\\|_2` by power iteration on :math:`A^H A` (a slight underestimate; add a margin)."""
    if op.complex_input:
        dtype = torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64
    gdev = generator.device if generator is not None else device
    x = torch.randn(op.in_shape, dtype=dtype, generator=generator, device=gdev).to(device)
    norm = torch.linalg.vector_norm(x)
    lam = 0.0
    with torch.no_grad():
        for _ in range(int(n_iter)):
            x = x / norm
            x = op.normal(x)
            norm = torch.linalg.vector_norm(x)
            lam = float(norm)
    return lam ** 0.5
