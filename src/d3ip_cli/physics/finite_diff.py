"""Finite differences as a linear operator (total variation in baselines and the engine).

.. math::  (D x)_{a,\\,i} = x_{i + e_a} - x_i \\ \\text{(zero on the last index along axis } a\\text{)}

``x [Z, H, W] -> D x [len(axes), Z, H, W]``; the adjoint is minus the divergence with
matching boundary handling, so ``D`` passes the same adjoint test as the physics.
Axis 0 is the slice axis (through-slice differences), axes 1 and 2 are in-plane.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from d3ip_cli.physics.base import LinearOperator, index_count


def _zeros_like_slab(x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[axis] = 1
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def diff_forward(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Forward difference along ``axis`` with a zero last entry (same shape as ``x``)."""
    if x.shape[axis] < 2:
        return torch.zeros_like(x)
    return torch.cat([torch.diff(x, dim=axis), _zeros_like_slab(x, axis)], dim=axis)


def diff_adjoint(g: torch.Tensor, axis: int) -> torch.Tensor:
    """Adjoint of :func:`diff_forward`: ``-div`` (the last entry of ``g`` is ignored)."""
    n = g.shape[axis]
    if n < 2:
        return torch.zeros_like(g)
    u = g.narrow(axis, 0, n - 1)
    z = _zeros_like_slab(g, axis)
    up = torch.cat([z, u, z], dim=axis)
    return up.narrow(axis, 0, n) - up.narrow(axis, 1, n)


class FiniteDifference(LinearOperator):
    """Forward differences of ``x [Z, H, W]`` along ``axes``, stacked: ``[len(axes), Z, H, W]``."""

    complex_input = True
    complex_output = True

    def __init__(self, shape: Sequence[int], axes: Sequence[int] = (1, 2)) -> None:
        shape = tuple(int(s) for s in shape)
        self.axes = tuple(int(a) for a in axes)
        super().__init__(shape, (len(self.axes),) + shape)

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([diff_forward(x, a) for a in self.axes])

    def _A_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        out = diff_adjoint(g[0], self.axes[0])
        for i, a in enumerate(self.axes[1:], start=1):
            out = out + diff_adjoint(g[i], a)
        return out

    def select(self, index: Any) -> "FiniteDifference":
        return FiniteDifference((index_count(index, self.in_shape[0]),) + self.in_shape[1:], self.axes)

    def extra_repr(self) -> str:
        return f"{list(self.in_shape)}, axes={self.axes}"
