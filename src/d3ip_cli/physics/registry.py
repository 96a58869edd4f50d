"""The registry of tasks and backends: task name + options -> operator.

=================  ========  ======================================================
task               modality  options (defaults)
=================  ========  ======================================================
``sparse-view``    CT        ``views=60`` uniform on [0, 180°)
``limited-angle``  CT        ``arc=90``: 1° steps over [0, arc)
``cs-mri``         MR        ``acceleration=4, mask=uniform1d, center_fraction=0.08, coils=1``
=================  ========  ======================================================

CT tasks take ``backend`` (``auto``, ``native``, ``torch-radon``, ``astra``); ``auto`` is
torch-radon when it is importable and the device is CUDA (and the grid suits it), else
native. :func:`operator_cases` turns every task x backend present into small test
operators (odd, non-square sizes; batches of slices), so a new task or backend is
enrolled in the property tests and in ``d3ip operators --check`` by registering it here.

An operator made here carries ``op.task`` and ``op.task_options``; :func:`operator_spec`
and :func:`operator_arrays` describe it for a measurement file and
:func:`operator_from_spec` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from d3ip_cli.core.errors import InputDataError, UsageError
from d3ip_cli.physics.base import LinearOperator
from d3ip_cli.physics.ct import NativeParallelBeam, ParallelBeamCT
from d3ip_cli.physics.ct_plugins import (
    AstraParallelBeam,
    TorchRadonParallelBeam,
    astra_available,
    torch_radon_available,
)
from d3ip_cli.physics.geometry import (
    ParallelBeamGeometry,
    default_detector,
    limited_angle_angles,
    sparse_view_angles,
)
from d3ip_cli.physics.masks import make_mask
from d3ip_cli.physics.mri import CartesianMRI, birdcage_maps, sense


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A registered task: modality, default options, and tiny options for property tests."""

    name: str
    modality: str
    defaults: dict[str, Any]
    description: str
    test_options: tuple[dict[str, Any], ...] = ()


TASKS: dict[str, TaskInfo] = {
    "sparse-view": TaskInfo("sparse-view", "CT", {"views": 60},
                            "parallel-beam CT, N views uniform on [0, 180)", ({"views": 7},)),
    "limited-angle": TaskInfo("limited-angle", "CT", {"arc": 90.0},
                              "parallel-beam CT, 1-degree steps over an arc", ({"arc": 13.0},)),
    "cs-mri": TaskInfo("cs-mri", "MR", {"acceleration": 4.0, "mask": "uniform1d", "center_fraction": 0.08, "coils": 1},
                       "Cartesian MRI per slice, single- or multi-coil (SENSE)",
                       ({"mask": "uniform1d", "coils": 1}, {"mask": "gaussian1d", "coils": 4},
                        {"mask": "poisson2d", "coils": 3, "acceleration": 2.5})),
}

CT_BACKENDS: dict[str, type[ParallelBeamCT]] = {
    "native": NativeParallelBeam,
    "astra": AstraParallelBeam,
    "torch-radon": TorchRadonParallelBeam,
}
BACKEND_CHOICES = ("auto",) + tuple(CT_BACKENDS)


def backend_status() -> dict[str, str | None]:
    """``{backend: None if usable here else the reason}``."""
    return {"native": None, "astra": astra_available(), "torch-radon": torch_radon_available()}


def resolve_backend(name: str, device: Any = "cpu", image_shape: tuple[int, int] | None = None) -> str:
    """Map ``auto`` to a concrete backend; check that an explicit one exists (exit 2 / 6)."""
    from d3ip_cli.core.errors import MissingComponentError

    name = (name or "auto").lower()
    if name not in BACKEND_CHOICES:
        raise UsageError(f"--backend {name!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if name == "auto":
        square16 = image_shape is None or (image_shape[0] == image_shape[1] and image_shape[0] % 16 == 0)
        if torch.device(device).type == "cuda" and torch_radon_available() is None and square16:
            return "torch-radon"
        return "native"
    reason = backend_status()[name]
    if reason:
        raise MissingComponentError(f"--backend {name}: {reason}")
    return name


def get_task(task: str) -> TaskInfo:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return TASKS[task]


def ct_geometry(task: str, image_shape: tuple[int, int], pixel_size: tuple[float, float] = (1.0, 1.0), *,
                views: int | None = None, arc: float | None = None, det_count: int | None = None,
                det_spacing: float | None = None) -> ParallelBeamGeometry:
    """The parallel-beam geometry of a CT task on an ``H x W`` grid with pixel size ``(dy, dx)`` mm."""
    if task == "sparse-view":
        angles = sparse_view_angles(TASKS[task].defaults["views"] if views is None else views)
    elif task == "limited-angle":
        angles = limited_angle_angles(TASKS[task].defaults["arc"] if arc is None else arc)
    else:
        raise UsageError(f"{task!r} is not a CT task")
    k, ds = default_detector(image_shape, pixel_size, det_spacing)
    return ParallelBeamGeometry(tuple(int(s) for s in image_shape), tuple(float(a) for a in angles),  # type: ignore[arg-type]
                                int(det_count or k), ds, tuple(float(p) for p in pixel_size))  # type: ignore[arg-type]


def make_operator(task: str, shape: tuple[int, int, int], *, backend: str = "auto", device: Any = "cpu",
                  pixel_size: tuple[float, float] = (1.0, 1.0), generator: torch.Generator | None = None,
                  views: int | None = None, arc: float | None = None, det_count: int | None = None,
                  det_spacing: float | None = None, acceleration: float | None = None, mask: str | None = None,
                  center_fraction: float | None = None, coils: int | None = None,
                  mask_array: torch.Tensor | None = None, coil_maps: torch.Tensor | np.ndarray | None = None
                  ) -> LinearOperator:
    """Build the operator of ``task`` for images ``shape = (Z, H, W)``.

    CT options: ``views`` | ``arc``, ``det_count``, ``det_spacing`` (mm), ``pixel_size`` (mm),
    ``backend``. MRI options: ``acceleration``, ``mask`` kind, ``center_fraction``, ``coils``
    (simulated birdcage maps when > 1), or explicit ``mask_array [Z, H, W]`` /
    ``coil_maps [Z, C, H, W]``. Random masks draw from ``generator``. The operator's
    buffers live on ``device``.

    Example::

        A = make_operator("sparse-view", (16, 128, 128), views=60)
        A = make_operator("cs-mri", (8, 96, 80), acceleration=4, coils=8, generator=g)
    """
    info = get_task(task)
    z, h, w = (int(s) for s in shape)
    if min(z, h, w) < 1:
        raise UsageError(f"image shape must be positive, got {list(shape)}")
    if info.modality == "CT":
        geom = ct_geometry(task, (h, w), pixel_size, views=views, arc=arc, det_count=det_count, det_spacing=det_spacing)
        name = resolve_backend(backend, device, (h, w))
        op: LinearOperator = CT_BACKENDS[name](geom, z)
        opts = {"views": geom.n_views} if task == "sparse-view" else {"arc": TASKS[task].defaults["arc"] if arc is None else float(arc)}
    else:
        if backend not in (None, "auto", "native"):
            raise UsageError(f"--backend {backend} applies to CT tasks; cs-mri uses torch FFTs")
        d = info.defaults
        acceleration = d["acceleration"] if acceleration is None else acceleration
        mask = d["mask"] if mask is None else mask
        center_fraction = d["center_fraction"] if center_fraction is None else center_fraction
        if mask_array is None:
            mask_array = make_mask(mask, (z, h, w), acceleration, center_fraction, generator)
        maps_t: torch.Tensor | None = None
        if coil_maps is not None:
            maps_t = torch.as_tensor(np.asarray(coil_maps) if not isinstance(coil_maps, torch.Tensor) else coil_maps)
            coils = int(maps_t.shape[1])
        else:
            coils = d["coils"] if coils is None else int(coils)
            if coils < 1:
                raise UsageError(f"--coils must be >= 1, got {coils}")
            if coils > 1:
                maps_t = torch.from_numpy(birdcage_maps((z, coils, h, w)))
        op = sense(mask_array, maps_t)
        opts = {"acceleration": float(acceleration), "mask": mask, "center_fraction": float(center_fraction),
                "coils": coils}
    op.task = task  # type: ignore[assignment]
    op.task_options = opts  # type: ignore[assignment]
    return op.to(device)


def operator_spec(op: LinearOperator) -> dict[str, Any]:
    """JSON description of a registry operator (task, options, geometry; arrays by name)."""
    spec = {"task": getattr(op, "task", None), "options": dict(getattr(op, "task_options", {}) or {}),
            "n_slices": op.n_slices, **op.spec()}
    if isinstance(op, CartesianMRI):
        spec["arrays"] = ["mask"] + (["coil_maps"] if op.maps is not None else [])
    return spec


def operator_arrays(op: LinearOperator) -> dict[str, np.ndarray]:
    """The arrays a measurement file stores beside the spec (MRI mask and coil maps)."""
    if isinstance(op, CartesianMRI):
        out = {"mask": op.mask.detach().cpu().numpy().astype(np.uint8)}
        if op.maps is not None:
            out["coil_maps"] = op.maps.detach().cpu().numpy().astype(np.complex64)
        return out
    return {}


def operator_from_spec(spec: dict[str, Any], arrays: dict[str, np.ndarray] | None = None, *,
                       backend: str | None = None, device: Any = "cpu") -> LinearOperator:
    """Rebuild an operator from :func:`operator_spec` / :func:`operator_arrays` (exit 3 when inconsistent)."""
    arrays = arrays or {}
    task = spec.get("task")
    if task not in TASKS:
        raise InputDataError(f"measurement file names an unknown task {task!r}")
    if TASKS[task].modality == "CT":
        try:
            geom = ParallelBeamGeometry.from_dict(spec)
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise InputDataError(f"measurement file has an invalid CT geometry: {exc}") from None
        name = resolve_backend(backend or "auto", device, geom.image_shape)
        op: LinearOperator = CT_BACKENDS[name](geom, int(spec.get("n_slices", 1)))
        op.task, op.task_options = task, dict(spec.get("options", {}))  # type: ignore[assignment]
        return op.to(device)
    if "mask" not in arrays:
        raise InputDataError("measurement file lacks the sampling mask of its cs-mri operator")
    mask = torch.from_numpy(np.asarray(arrays["mask"]).astype(np.float32))
    maps = arrays.get("coil_maps")
    op = sense(mask, None if maps is None else torch.from_numpy(np.asarray(maps)))
    op.task, op.task_options = task, dict(spec.get("options", {}))  # type: ignore[assignment]
    return op.to(device)


# ---------------------------------------------------------------------------------------
# Property-test cases
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OperatorCase:
    """One small operator for the property checks. ``tol`` is the float64 adjoint tolerance."""

    id: str
    build: Callable[[torch.Generator], LinearOperator]
    tol: float = 1e-5


def operator_cases(device: Any = "cpu", include_unavailable: bool = False) -> list[OperatorCase]:
    """Every registered task x backend present, at odd non-square sizes, plus the algebra.

    CT slices are square for backends that need it (torch-radon: 32x32) and
    ``3 x 37 x 31`` with anisotropic pixels for the native projector.
    """
    from d3ip_cli.physics.finite_diff import FiniteDifference

    cases: list[OperatorCase] = []
    status = backend_status()
    for task, info in TASKS.items():
        for k, opts in enumerate(info.test_options):
            if info.modality == "CT":
                for be in CT_BACKENDS:
                    if status[be] and not include_unavailable:
                        continue
                    if be == "native":
                        shape, px = (3, 37, 31), (0.8, 1.1)
                    elif be == "astra":
                        shape, px = (3, 33, 33), (0.9, 0.9)
                    else:
                        shape, px = (2, 32, 32), (1.0, 1.0)
                    fopts = dict(opts, backend=be, pixel_size=px)
                    if be != "torch-radon":
                        fopts["det_count"] = 49  # odd, not the default
                    cases.append(OperatorCase(f"{task}[{be}]", _builder(task, shape, device, fopts)))
            else:
                shape = (3, 37, 31)
                label = ",".join(f"{v}" for v in opts.values())
                cases.append(OperatorCase(f"{task}[{label}]", _builder(task, shape, device, dict(opts))))
    cases.append(OperatorCase("finite-difference[z,y,x]",
                              lambda g: FiniteDifference((3, 37, 31), (0, 1, 2)).to(device)))
    cases.append(OperatorCase("algebra[2*(cs-mri).H.H]",
                              lambda g: 2.0 * _builder("cs-mri", (2, 37, 31), device, {"coils": 2})(g).H.H))
    cases.append(OperatorCase("algebra[D@(sparse-view).H]",
                              lambda g: FiniteDifference((2, 21, 21)).to(device)
                              @ _builder("sparse-view", (2, 21, 21), device, {"views": 5, "backend": "native"})(g).H))
    return cases


def _builder(task: str, shape: tuple[int, int, int], device: Any, opts: dict[str, Any]
             ) -> Callable[[torch.Generator], LinearOperator]:
    def build(generator: torch.Generator) -> LinearOperator:
        return make_operator(task, shape, device=device, generator=generator, **opts)

    return build


def ct_backend_cases() -> list[tuple[str, str]]:
    """Pairs ``(backend, reference)`` for agreement checks among the CT backends present."""
    status = backend_status()
    return [(be, "native") for be in CT_BACKENDS if be != "native" and status[be] is None]
