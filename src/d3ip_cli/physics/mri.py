"""Cartesian MRI per slice: single-coil and multi-coil (SENSE) on torch FFTs.

.. math::  y_{z,c} = M_z\\, F\\, (S_{z,c} \\odot x_z), \\qquad
           A^H y = \\sum_c \\overline{S_{z,c}} \\odot F^{-1}(M_z\\, y_{z,c})

``x [Z, H, W]`` (real or complex), ``y [Z, C, H, W]`` complex k-space (``C = 1`` for
single coil; unsampled entries are zero), ``M [Z, H, W]`` a binary mask per slice,
``S [Z, C, H, W]`` coil sensitivities, and ``F`` the centred orthonormal 2D DFT over the
last two axes (``fftshift(fft2(ifftshift(.), norm="ortho"))``, as sigpy's ``center=True``).

The composite is built by the factory :func:`sense` from three small operators
(:class:`Mask`, :class:`FFT2c`, :class:`CoilExpand`), so its adjoint and shape checks come
from the base class. Precision follows the input: float32/complex64 -> complex64,
float64/complex128 -> complex128. Masks and maps are buffers (``.to(device)`` moves them).
Coil maps come from :func:`birdcage_maps` (simulation) or :func:`espirit_maps` (measured
data); both return maps normalised to unit root-sum-of-squares where the signal is.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from d3ip_cli.physics.base import Compose, LinearOperator


def _complex_dtype(t: torch.Tensor) -> torch.dtype:
    if t.is_complex():
        return t.dtype
    return torch.complex128 if t.dtype == torch.float64 else torch.complex64


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a complex tensor of matching precision (a view when already complex)."""
    return x if x.is_complex() else x.to(_complex_dtype(x))


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D DFT over the last two axes."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (also its adjoint)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(y, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


class FFT2c(LinearOperator):
    """Unitary centred 2D DFT on ``shape [..., H, W]`` (complex in, complex out)."""

    complex_input = True
    complex_output = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape, shape)

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return fft2c(as_complex(x))

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifft2c(as_complex(y))

    _normal = staticmethod(as_complex)  # F^H F = I

    def select(self, index: Any) -> "FFT2c":
        from d3ip_cli.physics.base import index_count

        return FFT2c((index_count(index, self.in_shape[0]),) + self.in_shape[1:])


class Mask(LinearOperator):
    """Diagonal sampling ``y = M ⊙ k`` with ``M [Z, H, W]`` broadcast over the coil axis.

    The mask is real and binary, so the operator is self-adjoint and idempotent.
    """

    complex_input = True
    complex_output = True

    def __init__(self, mask: torch.Tensor, shape: tuple[int, ...]) -> None:
        super().__init__(shape, shape)
        self.register_buffer("mask", mask.to(torch.float32))

    def _m(self, k: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(device=k.device, dtype=k.real.dtype)
        return m[:, None] if k.ndim == m.ndim + 1 else m

    def _A(self, k: torch.Tensor) -> torch.Tensor:
        return as_complex(k) * self._m(k)

    _A_adjoint = _A

    def select(self, index: Any) -> "Mask":
        m = self.mask[index]
        return Mask(m, (m.shape[0],) + self.in_shape[1:])


class CoilExpand(LinearOperator):
    """``x [Z, H, W] -> S ⊙ x [Z, C, H, W]`` with coil maps ``S [Z, C, H, W]`` (adjoint: coil combination)."""

    complex_input = True
    complex_output = True

    def __init__(self, maps: torch.Tensor) -> None:
        z, c, h, w = maps.shape
        super().__init__((z, h, w), (z, c, h, w))
        self.register_buffer("maps", maps.to(torch.complex64) if maps.dtype != torch.complex128 else maps)

    def _s(self, t: torch.Tensor) -> torch.Tensor:
        return self.maps.to(device=t.device, dtype=_complex_dtype(t))

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        x = as_complex(x)
        return self._s(x) * x[:, None]

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        y = as_complex(y)
        return torch.sum(self._s(y).conj() * y, dim=1)

    def select(self, index: Any) -> "CoilExpand":
        return CoilExpand(self.maps[index])


class SingleCoil(LinearOperator):
    """``x [Z, H, W] -> x[:, None] [Z, 1, H, W]``: the single-coil case of :class:`CoilExpand` (maps = 1)."""

    complex_input = True
    complex_output = True

    def __init__(self, shape: tuple[int, int, int]) -> None:
        z, h, w = shape
        super().__init__((z, h, w), (z, 1, h, w))

    def _A(self, x: torch.Tensor) -> torch.Tensor:
        return as_complex(x)[:, None]

    def _A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return as_complex(y)[:, 0]

    def select(self, index: Any) -> "SingleCoil":
        from d3ip_cli.physics.base import index_count

        return SingleCoil((index_count(index, self.in_shape[0]),) + self.in_shape[1:])  # type: ignore[arg-type]


class CartesianMRI(Compose):
    """``A = M F S`` (see the module docstring); built by :func:`sense`.

    Attributes ``mask [Z, H, W]`` and ``maps [Z, C, H, W]`` (``None`` for single coil)
    are exposed for the specification and for sigpy-based reconstructions.
    """

    def __init__(self, mask: torch.Tensor, maps: torch.Tensor | None = None) -> None:
        z, h, w = mask.shape
        if maps is not None and (maps.ndim != 4 or maps.shape[0] != z or tuple(maps.shape[-2:]) != (h, w)):
            raise ValueError(f"coil maps {list(maps.shape)} do not match mask {list(mask.shape)}")
        coils: LinearOperator = SingleCoil((z, h, w)) if maps is None else CoilExpand(maps)
        super().__init__([Mask(mask, coils.out_shape), FFT2c(coils.out_shape), coils])

    @property
    def mask(self) -> torch.Tensor:
        return self.ops[0].mask

    @property
    def maps(self) -> torch.Tensor | None:
        coils = self.ops[2]
        return coils.maps if isinstance(coils, CoilExpand) else None

    @property
    def n_coils(self) -> int:
        return self.out_shape[1]

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        m, f, s = self.ops
        return s._A_adjoint(f._A_adjoint(m._A(f._A(s._A(x)))))

    def pinv(self, y: torch.Tensor, n_iter: int = 0) -> torch.Tensor:
        """Zero-filled reconstruction: :math:`(\\sum_c |S_c|^2)^{-1} \\sum_c \\bar S_c F^{-1} y_c`
        (``A^H y`` for normalised maps or a single coil)."""
        self._check(y, self.out_shape, "k-space")
        x = self._A_adjoint(y)
        if self.maps is not None:
            rss = torch.sum(self.maps.abs() ** 2, dim=1).to(device=x.device, dtype=x.real.dtype)
            x = torch.where(rss > 1e-6, x / rss.clamp_min(1e-6), torch.zeros_like(x))
        return x

    def select(self, index: Any) -> "CartesianMRI":
        maps = None if self.maps is None else self.maps[index]
        return CartesianMRI(self.mask[index], maps)

    def spec(self) -> dict[str, Any]:
        return {"modality": "MR", "operator": "cartesian-sense" if self.maps is not None else "cartesian-single-coil",
                "fft": "centred orthonormal 2D", "image_shape": list(self.in_shape), "coils": self.n_coils}

    def extra_repr(self) -> str:
        z, h, w = self.in_shape
        return f"{z}x{h}x{w}, {self.n_coils} coil(s), R={float(self.mask.numel() / self.mask.sum().clamp_min(1)):.2f}"


def sense(mask: torch.Tensor, maps: torch.Tensor | None = None) -> CartesianMRI:
    """The Cartesian MRI operator ``M F S`` (``maps=None``: single coil, ``C = 1``).

    Args:
        mask: ``[Z, H, W]`` binary sampling mask per slice.
        maps: ``[Z, C, H, W]`` complex coil sensitivities, or ``None``.

    Example::

        A = sense(uniform1d((4, 37, 31), 4.0, 0.08, generator=g), birdcage_maps((4, 8, 37, 31)))
        y = A(x)           # [4, 8, 37, 31] complex
        x0 = A.pinv(y)     # zero-filled
    """
    return CartesianMRI(mask, maps)


# ---------------------------------------------------------------------------------------
# Coil maps
# ---------------------------------------------------------------------------------------


def normalise_maps(maps: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Scale ``maps [..., C, H, W]`` so that :math:`\\sum_c |S_c|^2 = 1` wherever it is non-zero."""
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=-3, keepdims=True))
    return np.where(rss > eps, maps / np.maximum(rss, eps), 0).astype(maps.dtype)


def birdcage_maps(shape: tuple[int, int, int, int], dtype: Any = np.complex64) -> np.ndarray:
    """Simulated birdcage sensitivities ``[Z, C, H, W]`` (sigpy's 2D model, the same for every
    slice of a slab), normalised to unit root-sum-of-squares."""
    import sigpy.mri

    z, c, h, w = shape
    maps = sigpy.mri.birdcage_maps((c, h, w)).astype(dtype)
    return np.array(np.broadcast_to(normalise_maps(maps)[None], (z, c, h, w)))  # a copy: writable for any z


def espirit_maps(kspace: np.ndarray, calib_width: int = 24, *, thresh: float = 0.02, crop: float = 0.95,
                 progress: Callable | None = None) -> np.ndarray:
    """ESPIRiT coil maps ``[Z, C, H, W]`` from k-space ``[Z, C, H, W]`` (sigpy ``EspiritCalib``), per slice."""
    import sigpy.mri.app

    out = np.zeros(kspace.shape, dtype=np.complex64)
    for z in range(kspace.shape[0]):
        out[z] = sigpy.mri.app.EspiritCalib(kspace[z], calib_width=calib_width, thresh=thresh, crop=crop,
                                            show_pbar=False).run()
        if progress is not None:
            progress(z + 1, kspace.shape[0], {"stage": "espirit"})
    return normalise_maps(out)
