"""Optional CT backends discovered at run time: astra-toolbox (CPU 2D) and torch-radon (CUDA).

Both are GPL-licensed: they are never vendored or required. Each sits behind the
same :class:`~d3ip_cli.physics.ct.ParallelBeamCT` interface and geometry convention
as the native projector (astra's ``parallel`` convention, which torch-radon follows
too), so ``d3ip operators --check`` can compare them. Asking for one that is not
installed raises :class:`~d3ip_cli.core.errors.MissingComponentError` (exit 6).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from d3ip_cli.core.errors import MissingComponentError, UsageError
from d3ip_cli.physics.ct import ParallelBeamCT
from d3ip_cli.physics.geometry import ParallelBeamGeometry


@functools.lru_cache(maxsize=None)
def astra_available() -> str | None:
    """``None`` when astra-toolbox imports, else the reason it does not."""
    try:
        import astra  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"astra-toolbox is not importable ({type(exc).__name__})"
    return None


@functools.lru_cache(maxsize=None)
def torch_radon_available() -> str | None:
    """``None`` when torch-radon imports and CUDA is present, else the reason it cannot be used."""
    try:
        import torch_radon  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"torch-radon is not importable ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return "torch-radon needs CUDA, which is not available"
    return None


class AstraParallelBeam(ParallelBeamCT):
    """astra-toolbox's CPU ``linear`` (Joseph) projector; the adjoint is astra's BP with the same projector.

    Computation is float32 on the CPU, one slice at a time; inputs on another device or
    in float64 are converted and the result is returned on the input's device and dtype.
    """

    backend = "astra"

    def __init__(self, geometry: ParallelBeamGeometry, n_slices: int) -> None:
        reason = astra_available()
        if reason:
            raise MissingComponentError(f"--backend astra: {reason}; install astra-toolbox or use --backend native")
        h, w = geometry.image_shape
        dy, dx = geometry.pixel_size
        if abs(dy - dx) > 1e-9 * dx:
            raise UsageError(f"--backend astra needs square pixels, got {dy}x{dx} mm (use --backend native)")
        super().__init__(geometry, n_slices)
        import astra

        vol = astra.create_vol_geom(h, w, -w * dx / 2, w * dx / 2, -h * dy / 2, h * dy / 2)
        proj = astra.create_proj_geom("parallel", geometry.det_spacing, geometry.det_count,
                                      np.asarray(geometry.angles, dtype=np.float64))
        self._astra = astra
        self._proj_id = astra.create_projector("linear", proj, vol)
        self._W = astra.OpTomo(self._proj_id)

    def __del__(self) -> None:
        try:
            self._astra.projector.delete(self._proj_id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _run(self, t: torch.Tensor, fn: Any, out_shape: tuple[int, ...]) -> torch.Tensor:
        src = t.detach().to("cpu", torch.float32).numpy()
        out = np.stack([np.asarray(fn(np.ascontiguousarray(s))).reshape(out_shape) for s in src])
        return torch.from_numpy(out).to(device=t.device, dtype=t.dtype)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self._W.FP, self.out_shape[1:])

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        return self._run(y, self._W.BP, self.in_shape[1:])


class TorchRadonParallelBeam(ParallelBeamCT):
    """torch-radon's CUDA parallel-beam projector (square images, side a multiple of 16).

    torch-radon works in pixel units on a square grid: sinograms are scaled by the pixel
    size so line integrals are in mm, and detector spacing is passed in pixels.
    """

    backend = "torch-radon"

    def __init__(self, geometry: ParallelBeamGeometry, n_slices: int) -> None:
        reason = torch_radon_available()
        if reason:
            raise MissingComponentError(f"--backend torch-radon: {reason}; use --backend native")
        h, w = geometry.image_shape
        dy, dx = geometry.pixel_size
        if h != w or h % 16 or abs(dy - dx) > 1e-9 * dx:
            raise UsageError(f"--backend torch-radon needs square images with a side that is a multiple of 16 "
                             f"and square pixels, got {h}x{w} at {dy}x{dx} mm (use --grid or --backend native)")
        super().__init__(geometry, n_slices)
        import torch_radon

        angles = np.asarray(geometry.angles, dtype=np.float32)
        spacing = geometry.det_spacing / dx
        if hasattr(torch_radon, "Radon"):  # 1.x API
            self._radon = torch_radon.Radon(h, angles, det_count=geometry.det_count, det_spacing=spacing,
                                            clip_to_circle=False)
            self._bp = self._radon.backprojection
        else:  # 2.x API
            self._radon = torch_radon.ParallelBeam(geometry.det_count, angles, det_spacing=spacing)
            self._bp = self._radon.backward
        self._scale = dx

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._radon.forward(x.float().contiguous()).to(x.dtype) * self._scale

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._bp(y.float().contiguous()).to(y.dtype) * self._scale
