"""Slice-wise 2D parallel-beam CT: the native projector, FBP, and the shared CT base.

The forward model per slice is the line-integral (Radon) transform sampled on the
geometry of :class:`~d3ip_cli.physics.geometry.ParallelBeamGeometry`:

.. math::  (A x)_{v,k} = \\int x\\big(s_k \\vec n_v + t\\, \\vec n_v^{\\perp}\\big)\\, dt,
           \\qquad \\vec n_v = (\\cos\\theta_v, \\sin\\theta_v),

applied to every slice of ``x [Z, H, W]``, giving ``y [Z, V, K]`` (mm x image units).

The ``native`` backend discretises it with Joseph's method: along each ray, one sample
per row (or column, whichever the ray crosses more of), linearly interpolated between
the two neighbouring pixels and weighted by the step length in mm. The weights form a
sparse matrix ``P [V*K, H*W]`` built once per geometry (vectorised NumPy, cached) and
held as ``torch.sparse_csr`` together with its transpose, so that

- ``A x = P x`` and ``A^T y = P^T y`` are an exactly matched pair (the adjoint is the
  transpose, not an unfiltered inverse),
- every slice of the batch is one column of a sparse-dense product (fast on CPU and
  CUDA; the device and precision are those of the input),
- autograd works in both directions: the backward of the projection is the
  back-projection and vice versa (so double backward works too).

This is astra-toolbox's CPU ``linear`` projector (same convention, same kernel).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import numpy as np
import torch

from d3ip_cli.core.errors import UsageError
from d3ip_cli.physics.base import LinearOperator, index_count
from d3ip_cli.physics.geometry import ParallelBeamGeometry

FBP_FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


class _LinearPair(torch.autograd.Function):
    """Autograd for a black-box linear map ``fwd`` with adjoint ``adj``: backward calls ``adj``
    through this same Function, so gradients of gradients are exact too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: Callable, adj: Callable) -> torch.Tensor:  # type: ignore[override]
        ctx.pair = (fwd, adj)
        return fwd(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:  # type: ignore[override]
        fwd, adj = ctx.pair
        return _LinearPair.apply(g, adj, fwd), None, None


def linear_pair(x: torch.Tensor, fwd: Callable, adj: Callable) -> torch.Tensor:
    """Apply ``fwd`` to ``x`` with autograd through ``adj`` (see :class:`_LinearPair`)."""
    return _LinearPair.apply(x, fwd, adj)


class ParallelBeamCT(LinearOperator):
    """Base of the CT backends: ``x [Z, H, W] -> y [Z, V, K]``, real-valued.

    Subclasses implement ``_project(x)`` and ``_backproject(y)`` on detached tensors
    of the declared shapes; this class adds autograd, complex-input handling (real and
    imaginary parts separately), FBP, slice selection and the specification.
    """

    backend = "?"

    def __init__(self, geometry: ParallelBeamGeometry, n_slices: int) -> None:
        h, w = geometry.image_shape
        super().__init__((n_slices, h, w), (n_slices, geometry.n_views, geometry.det_count))
        self.geometry = geometry

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_complex():
            return torch.complex(self._A(x.real.contiguous()), self._A(x.imag.contiguous()))
        return linear_pair(x, self._project, self._backproject)

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if y.is_complex():
            return torch.complex(self._A_adjoint(y.real.contiguous()), self._A_adjoint(y.imag.contiguous()))
        return linear_pair(y, self._backproject, self._project)

    def _with_slices(self, n_slices: int) -> "ParallelBeamCT":
        return type(self)(self.geometry, n_slices)

    def select(self, index: Any) -> "ParallelBeamCT":
        """The same projector for ``len(index)`` slices (the geometry is shared by all slices)."""
        return self._with_slices(index_count(index, self.n_slices))

    def fbp(self, y: torch.Tensor, filter: str = "ram-lak") -> torch.Tensor:
        """Filtered back-projection :math:`x \\approx \\frac{\\Delta\\theta}{dx\\,dy} A^T (h * y)`.

        ``h`` is the band-limited ramp filter (Kak & Slaney's spatial form, zero-padded
        FFT) times the window ``filter`` (one of :data:`FBP_FILTERS`); ``Δθ`` is the
        angular step. With the exact back-projector ``A^T`` each pixel collects
        :math:`\\approx dx\\,dy/ds` per view, which the scaling undoes, so values come back
        in image units (e.g. attenuation per mm).
        """
        self._check(y, self.out_shape, "sinogram")
        q = filter_sinogram(y, filter)
        dy, dx = self.geometry.pixel_size
        return self.A_adjoint(q) * (self.geometry.angular_step / (dx * dy))

    def pinv(self, y: torch.Tensor, n_iter: int = 0) -> torch.Tensor:
        """The classical reconstruction for CT: :meth:`fbp` with the ram-lak filter."""
        return self.fbp(y)

    def spec(self) -> dict[str, Any]:
        return {"modality": "CT", "backend": self.backend, **self.geometry.to_dict()}

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.backend}, {self.n_slices}x{g.image_shape[0]}x{g.image_shape[1]} -> "
                f"{g.n_views} views x {g.det_count} det")


# ---------------------------------------------------------------------------------------
# Native projector: Joseph's method as a sparse matrix
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def joseph_matrix(geometry: ParallelBeamGeometry) -> tuple[Any, Any]:
    """The projection matrix ``P [V*K, H*W]`` and its transpose as SciPy CSR (float64).

    Rows are rays ``v*K + k``; columns are pixels ``i*W + j``. For a ray that crosses more
    columns than rows (per mm, scaled by pixel size) one sample is taken per column
    ``j`` at height :math:`y = (s_k - x_j\\cos\\theta)/\\sin\\theta`, split between the two
    nearest rows with weights ``(1-f, f) * dx/|sin θ|``; otherwise per row, symmetric.
    Samples falling outside the image contribute nothing (zero padding).
    """
    import scipy.sparse as sp

    h, w = geometry.image_shape
    dy, dx = geometry.pixel_size
    k_count = geometry.det_count
    s = (np.arange(k_count) - (k_count - 1) / 2.0) * geometry.det_spacing
    cols_list, vals_list, counts = [], [], []
    for theta in geometry.angles:
        c, sn = math.cos(theta), math.sin(theta)
        if abs(sn) / dx >= abs(c) / dy:  # step over columns j; interpolate between rows
            xj = (np.arange(w) - (w - 1) / 2.0) * dx
            pos = (h - 1) / 2.0 - (s[:, None] - xj[None, :] * c) / (sn * dy)  # fractional row [K, W]
            step, n_other, along = dx / abs(sn), h, np.arange(w)[None, :]
            to_col = lambda other, a: other * w + a  # noqa: E731 - (row, column) -> pixel
        else:  # step over rows i; interpolate between columns
            yi = ((h - 1) / 2.0 - np.arange(h)) * dy
            pos = (s[:, None] - yi[None, :] * sn) / (c * dx) + (w - 1) / 2.0  # fractional column [K, H]
            step, n_other, along = dy / abs(c), w, np.arange(h)[None, :]
            to_col = lambda other, a: a * w + other  # noqa: E731
        lo = np.floor(pos)
        f = pos - lo
        lo = lo.astype(np.int64)
        other = np.stack([lo, lo + 1], axis=-1)  # [K, L, 2]
        wts = np.stack([1.0 - f, f], axis=-1) * step
        ok = (other >= 0) & (other < n_other) & (wts > 0)
        pix = to_col(other, along[..., None])
        cols_list.append(pix[ok])
        vals_list.append(wts[ok])
        counts.append(ok.reshape(k_count, -1).sum(axis=1))
    counts_all = np.concatenate(counts)
    indptr = np.zeros(len(counts_all) + 1, dtype=np.int64)
    np.cumsum(counts_all, out=indptr[1:])
    mat = sp.csr_matrix((np.concatenate(vals_list), np.concatenate(cols_list), indptr),
                        shape=(geometry.n_views * k_count, h * w))
    mat.sort_indices()
    return mat, mat.T.tocsr()


def _to_torch_csr(m: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    idx = np.int32 if m.nnz < 2**31 - 1 and max(m.shape) < 2**31 - 1 else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t = torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(idx)), torch.from_numpy(m.indices.astype(idx)),
                                    torch.from_numpy(m.data).to(dtype), size=m.shape, check_invariants=False)
        return t.to(device)


class NativeParallelBeam(ParallelBeamCT):
    """Pure-torch Joseph projector with its exact transpose (CPU and CUDA, any float dtype).

    The sparse matrices are built once per geometry and converted lazily to the device
    and dtype of the first input that needs them (cached per ``(device, dtype)``; slice
    selections share the cache).

    Example::

        g = ParallelBeamGeometry((128, 128), tuple(sparse_view_angles(60)), 182)
        A = NativeParallelBeam(g, n_slices=16)
        y = A(x)                 # [16, 60, 182]
        x_fbp = A.fbp(y)         # [16, 128, 128]
    """

    backend = "native"

    def __init__(self, geometry: ParallelBeamGeometry, n_slices: int, _cache: dict | None = None) -> None:
        super().__init__(geometry, n_slices)
        self._cache: dict = {} if _cache is None else _cache

    def _with_slices(self, n_slices: int) -> "NativeParallelBeam":
        return NativeParallelBeam(self.geometry, n_slices, _cache=self._cache)

    def matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P^T)`` as torch CSR on ``device`` in ``dtype``."""
        key = (str(device), dtype)
        if key not in self._cache:
            p, pt = joseph_matrix(self.geometry)
            self._cache[key] = (_to_torch_csr(p, dtype, device), _to_torch_csr(pt, dtype, device))
        return self._cache[key]

    @staticmethod
    def _spmm(m: torch.Tensor, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        z = x.shape[0]
        cols = x.reshape(z, -1).t().contiguous()  # [n_in, Z]
        return (m @ cols).t().reshape(out_shape).contiguous()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        p, _ = self.matrices(x.device, x.dtype)
        return self._spmm(p, x, (x.shape[0],) + self.out_shape[1:])

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        _, pt = self.matrices(y.device, y.dtype)
        return self._spmm(pt, y, (y.shape[0],) + self.in_shape[1:])


# ---------------------------------------------------------------------------------------
# Filtering for FBP
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _fourier_filter(n: int, name: str) -> np.ndarray:
    """Ramp filter (spatial Kak-Slaney kernel, FFT'd) times a window, length ``n`` (unit spacing)."""
    if name not in FBP_FILTERS:
        raise UsageError(f"unknown FBP filter {name!r}: choose one of {', '.join(FBP_FILTERS)}")
    k = np.concatenate([np.arange(1, n // 2 + 1, 2), np.arange(n // 2 - 1, 0, -2)])
    h = np.zeros(n)
    h[0] = 0.25
    h[1::2] = -1.0 / (np.pi * k) ** 2
    filt = np.real(np.fft.fft(h))
    if name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(n)[1:]
        filt[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        filt *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, n, endpoint=False)))
    elif name == "hamming":
        filt *= np.fft.fftshift(np.hamming(n))
    elif name == "hann":
        filt *= np.fft.fftshift(np.hanning(n))
    return filt


def filter_sinogram(y: torch.Tensor, filter: str = "ram-lak") -> torch.Tensor:
    """Convolve each detector row of ``y [..., K]`` with the windowed ramp filter.

    The result is in units of ``y`` per detector bin (the ``1/ds`` of the continuous
    ramp cancels against the ``ds`` of the back-projection; see :meth:`ParallelBeamCT.fbp`).
    Zero-padding to a power of two at least ``2K`` avoids wrap-around.
    """
    k = y.shape[-1]
    n = max(64, int(2 ** math.ceil(math.log2(2 * k))))
    filt = torch.from_numpy(_fourier_filter(n, filter)[: n // 2 + 1]).to(device=y.device, dtype=y.real.dtype)
    spec = torch.fft.rfft(y, n=n, dim=-1) * filt
    return torch.fft.irfft(spec, n=n, dim=-1)[..., :k]
