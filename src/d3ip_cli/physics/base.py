"""The one linear-operator interface every physics model speaks.

A :class:`LinearOperator` maps a batch of slices ``x`` of shape ``in_shape`` (for
images ``[Z, H, W]``) to measurements of shape ``out_shape``:

.. math::  y = A x, \\qquad x = A^H y \\ (\\text{adjoint}), \\qquad A^H A x \\ (\\text{normal}).

A subclass implements two hooks, ``_A`` and ``_A_adjoint``; the base class checks
shapes, names the operator in errors, and provides the algebra written once:

- ``op(x)`` / ``op.A(x)`` applies, ``op.A_adjoint(y)`` (alias ``op.H(y)``) applies the adjoint;
- ``op.H`` is the adjoint *operator* (cached; ``op.H.H is op``);
- ``op.normal(x) = A^H A x`` (override when a closed form is cheaper);
- ``A @ B`` composes (shapes checked when composed, not when data flows), ``c * A`` scales;
- ``op.pinv(y)``: a pseudo-inverse / classical reconstruction (CG on the normal
  equations unless the operator knows better: FBP for CT, zero-filled for MRI);
- ``op.select(index)``: the same physics restricted to some slices (minibatches).

Operators are :class:`torch.nn.Module` s: state (masks, coil maps) lives in buffers, so
``.to(device)`` moves it, and the device of a computation is the device of its input.
Everything is differentiable with autograd in both directions.

Property checks (:func:`adjointness_error`, :func:`autograd_adjoint_error`,
:func:`linearity_error`, :func:`normal_error`) are used by the test suite and by
``d3ip operators --check`` on every registered operator.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product :math:`\\mathrm{Re}\\langle a, b\\rangle = \\mathrm{Re}\\sum \\bar a\\, b` (a 0-d tensor)."""
    if a.is_complex() or b.is_complex():
        return torch.sum((a.conj() * b).real) if a.is_complex() else torch.sum(a * b.real)
    return torch.sum(a * b)


def index_count(index: Any, n: int) -> int:
    """Number of slices an index (slice, list of ints, 1-D tensor) selects out of ``n``."""
    if isinstance(index, slice):
        return len(range(*index.indices(n)))
    if isinstance(index, torch.Tensor):
        return int(index.numel()) if index.dtype != torch.bool else int(index.sum())
    return len(index)


class LinearOperator(torch.nn.Module):
    """Base class: ``in_shape -> out_shape``, linear, with an exact adjoint.

    Subclasses implement ``_A(x)`` and ``_A_adjoint(y)`` (no shape checks needed there)
    and may override ``_normal``, ``pinv``, ``select`` and ``spec``.
    """

    complex_input: bool = False
    """Whether the natural domain is complex (MRI images); real input is then accepted too."""
    complex_output: bool = False
    """Whether measurements are complex (k-space)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        self.in_shape: tuple[int, ...] = tuple(int(s) for s in in_shape)
        self.out_shape: tuple[int, ...] = tuple(int(s) for s in out_shape)

    # -- hooks ---------------------------------------------------------------------------
    def _A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._A_adjoint(self._A(x))

    # -- public API ----------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Forward: ``x [in_shape] -> A x [out_shape]``."""
        self._check(x, self.in_shape, "input")
        return self._A(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint: ``y [out_shape] -> A^H y [in_shape]``."""
        self._check(y, self.out_shape, "adjoint input")
        return self._A_adjoint(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # nn.Module.__call__
        return self.A(x)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """The normal operator :math:`A^H A x` (``in_shape -> in_shape``)."""
        self._check(x, self.in_shape, "input")
        return self._normal(x)

    @property
    def H(self) -> "LinearOperator":
        """The adjoint operator (cached; ``op.H.H is op``)."""
        adj = self.__dict__.get("_adjoint_op")
        if adj is None:
            adj = Adjoint(self)
            self.__dict__["_adjoint_op"] = adj  # not a submodule: avoids a cycle in the module tree
        return adj

    def pinv(self, y: torch.Tensor, n_iter: int = 20) -> torch.Tensor:
        """A classical reconstruction :math:`A^\\dagger y`; here CG on :math:`A^H A x = A^H y`."""
        from d3ip_cli.physics.solvers import cg

        self._check(y, self.out_shape, "measurement")
        return cg(self.normal, self._A_adjoint(y), n_iter=n_iter)

    def select(self, index: Any) -> "LinearOperator":
        """The operator restricted to the slices ``index`` of axis 0 (for slice minibatches)."""
        raise NotImplementedError(f"{self!r} cannot be restricted to a subset of slices")

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description (enough, with :meth:`arrays`, to rebuild the operator)."""
        return {"operator": type(self).__name__, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape)}

    @property
    def n_slices(self) -> int:
        return self.in_shape[0]

    # -- algebra -------------------------------------------------------------------------
    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Compose([self, other])

    def __mul__(self, c: Any) -> "LinearOperator":
        if isinstance(c, (int, float, complex)) or (isinstance(c, torch.Tensor) and c.ndim == 0):
            return Scaled(self, c)
        return NotImplemented

    __rmul__ = __mul__

    # -- helpers -------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self!r}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{self!r}: {what} has shape {list(t.shape)}, expected {list(shape)}")

    def extra_repr(self) -> str:
        return f"{list(self.in_shape)} -> {list(self.out_shape)}"

    def __repr__(self) -> str:  # one line, even for composites
        return f"{type(self).__name__}({self.extra_repr()})"


class Adjoint(LinearOperator):
    """The adjoint of an operator: ``A^H``; its adjoint is the original operator."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.out_shape, op.in_shape)
        self.op = op
        self.complex_input, self.complex_output = op.complex_output, op.complex_input
        self.__dict__["_adjoint_op"] = op

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return self.op._A_adjoint(x)

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op._A(y)

    def select(self, index: Any) -> LinearOperator:
        return self.op.select(index).H

    def extra_repr(self) -> str:
        return repr(self.op)


class Compose(LinearOperator):
    """``A_1 @ A_2 @ ... @ A_n``: applies ``A_n`` first. Shapes are checked on construction."""

    def __init__(self, ops: Sequence[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Compose) else [op])
        for left, right in zip(flat[:-1], flat[1:]):
            if left.in_shape != right.out_shape:
                raise ValueError(f"cannot compose {left!r} @ {right!r}: "
                                 f"{list(left.in_shape)} != {list(right.out_shape)}")
        super().__init__(flat[-1].in_shape, flat[0].out_shape)
        self.ops = torch.nn.ModuleList(flat)
        self.complex_input = any(op.complex_input for op in flat)
        self.complex_output = any(op.complex_output for op in flat)

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            x = op._A(x)
        return x

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            y = op._A_adjoint(y)
        return y

    def select(self, index: Any) -> LinearOperator:
        return Compose([op.select(index) for op in self.ops])

    def extra_repr(self) -> str:
        return " @ ".join(repr(op) for op in self.ops)


class Scaled(LinearOperator):
    """``c * A`` for a scalar ``c`` (adjoint ``conj(c) * A^H``)."""

    def __init__(self, op: LinearOperator, c: Any) -> None:
        super().__init__(op.in_shape, op.out_shape)
        self.op = op
        self.c = c
        self.complex_input, self.complex_output = op.complex_input, op.complex_output

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return self.op._A(x) * self.c

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        c = self.c
        if isinstance(c, torch.Tensor):
            c = c.conj()
        elif isinstance(c, complex):
            c = c.conjugate()
        return self.op._A_adjoint(y) * c

    def select(self, index: Any) -> LinearOperator:
        return Scaled(self.op.select(index), self.c)

    def extra_repr(self) -> str:
        return f"{self.c} * {self.op!r}"


class Identity(LinearOperator):
    """The identity on ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__(shape, shape)

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    _A_adjoint = _A

    def select(self, index: Any) -> LinearOperator:
        return Identity((index_count(index, self.in_shape[0]),) + self.in_shape[1:])


# ---------------------------------------------------------------------------------------
# Property checks (tests and ``d3ip operators --check``)
# ---------------------------------------------------------------------------------------


def _rand(shape: Sequence[int], dtype: torch.dtype, device: Any, generator: torch.Generator | None) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    if dtype.is_complex:
        real = torch.empty(0, dtype=dtype).real.dtype
        t = torch.complex(torch.randn(*shape, dtype=real, generator=generator, device=gdev),
                          torch.randn(*shape, dtype=real, generator=generator, device=gdev))
    else:
        t = torch.randn(*shape, dtype=dtype, generator=generator, device=gdev)
    return t.to(device)


def _dtypes(op: LinearOperator, real_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(input dtype, output dtype) for random tests of ``op`` at precision ``real_dtype``."""
    cplx = torch.complex128 if real_dtype == torch.float64 else torch.complex64
    din = cplx if getattr(op, "complex_input", False) else real_dtype
    dout = cplx if getattr(op, "complex_output", False) else real_dtype
    return din, dout


def adjointness_error(op: LinearOperator, *, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                      generator: torch.Generator | None = None) -> float:
    """Dot-product test :math:`|\\langle Ax, y\\rangle - \\langle x, A^H y\\rangle| / |\\langle Ax, y\\rangle|`
    for random ``x``, ``y`` (float64 by default; an exact adjoint gives ~1e-15)."""
    din, dout = _dtypes(op, dtype)
    x = _rand(op.in_shape, din, device, generator)
    y = _rand(op.out_shape, dout, device, generator)
    with torch.no_grad():
        lhs = inner(op.A(x), y).double()
        rhs = inner(x, op.A_adjoint(y)).double()
    return float(abs(lhs - rhs) / abs(lhs).clamp_min(1e-300))


def autograd_adjoint(op: LinearOperator, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The adjoint derived through autograd: :math:`\\nabla_x \\mathrm{Re}\\langle y, A x\\rangle = A^H y`."""
    x = torch.zeros(op.in_shape, dtype=dtype, device=y.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(inner(y, op.A(x)), x)
    return g


def autograd_adjoint_error(op: LinearOperator, *, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                           generator: torch.Generator | None = None) -> float:
    """Relative L2 distance between ``A^H y`` and the autograd adjoint (second oracle)."""
    din, dout = _dtypes(op, dtype)
    y = _rand(op.out_shape, dout, device, generator)
    ref = autograd_adjoint(op, y, din)
    with torch.no_grad():
        got = op.A_adjoint(y)
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def linearity_error(op: LinearOperator, *, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                    generator: torch.Generator | None = None) -> float:
    """Relative error of :math:`A(a x + b z) = a A x + b A z`."""
    din, _ = _dtypes(op, dtype)
    x = _rand(op.in_shape, din, device, generator)
    z = _rand(op.in_shape, din, device, generator)
    a, b = 0.7, -1.3
    with torch.no_grad():
        lhs = op.A(a * x + b * z)
        rhs = a * op.A(x) + b * op.A(z)
    return float(torch.linalg.vector_norm(lhs - rhs) / torch.linalg.vector_norm(rhs).clamp_min(1e-300))


def normal_error(op: LinearOperator, *, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                 generator: torch.Generator | None = None) -> float:
    """Relative error of ``op.normal(x)`` against ``A_adjoint(A(x))``."""
    din, _ = _dtypes(op, dtype)
    x = _rand(op.in_shape, din, device, generator)
    with torch.no_grad():
        ref = op.A_adjoint(op.A(x))
        got = op.normal(x)
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


CHECKS: dict[str, Callable[..., float]] = {
    "adjoint": adjointness_error,
    "autograd_adjoint": autograd_adjoint_error,
    "linearity": linearity_error,
    "normal": normal_error,
}
