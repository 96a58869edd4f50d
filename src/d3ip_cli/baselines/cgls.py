"""CGLS: least squares :math:`\\min_x \\|A x - y\\|_2^2`, regularised by early stopping."""

from __future__ import annotations

from typing import Any, Callable

import torch

from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.solvers import cgls as _cgls


def cgls(op: LinearOperator, y: torch.Tensor, *, n_iter: int = 20, x0: torch.Tensor | None = None,
         generator: torch.Generator | None = None, progress: Callable[[int, int, dict], None] | None = None,
         **_: Any) -> torch.Tensor:
    """``n_iter`` CGLS iterations from ``x0`` (zeros by default), each slice with its own step sizes."""
    with torch.no_grad():
        return _cgls(op, y, x0, int(n_iter), per_slice=True, progress=progress)
