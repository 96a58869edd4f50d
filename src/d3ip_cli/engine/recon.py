"""The wiring point of ``d3ip simulate`` and ``d3ip reconstruct`` (library functions only).

::

    input ──► Volume ──(slab, grid, normalise)──► x_ref ──► operator ──► y (+ noise)   retrospective
    input ──► Measurement ──(slab, spec)────────────────► operator, y                   measured data
                                   │
                     method(op, y, x_init = op.pinv(y), ctx) ──► x ──(de-normalise)──► Volume ──► write
                                                                                 └──► metrics vs reference

Stages are separate functions with plain inputs and outputs:

- :func:`prepare_volume`: read, slab (``--slices A:B``), in-plane resampling (``--grid N``).
- :func:`simulate_measurement`: normalise intensities, build the operator, simulate data
  and noise, package a :class:`~d3ip_cli.io.measurement.Measurement` (used by
  ``d3ip simulate`` and by retrospective studies, so both give the same data for a seed).
- :func:`problem_from_volume` / :func:`problem_from_measurement`: a :class:`Problem`.
- :func:`run_method`: the registered method on the problem.
- :func:`reconstruct`: all of the above plus metrics; :func:`write_result` writes the
  volume, the run record sidecar and the optional report.

Nothing here picks a device or an output path on its own (both arrive as arguments;
:func:`default_output_path` is a pure helper for the CLI), and nothing imports typer/rich.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from d3ip_cli import __version__
from d3ip_cli.core.config import ReconConfig, TaskOptions, NoiseOptions, parse_slices
from d3ip_cli.core.device import make_generator
from d3ip_cli.core.errors import InputDataError, UsageError
from d3ip_cli.core.types import Volume
from d3ip_cli.engine.intensity import IntensityScale, clip_reference, scale_for_image, scale_for_volume
from d3ip_cli.io.measurement import Measurement, is_measurement_path, read_measurement
from d3ip_cli.io.volumes import read_single_frame

Progress = Callable[[int, int, dict], None]


@dataclasses.dataclass
class Problem:
    """An inverse problem ready for a method: operator, normalised data and how to map back."""

    op: Any
    y: torch.Tensor
    task: str
    scale: IntensityScale
    affine: np.ndarray
    meta: dict[str, Any]
    reference: np.ndarray | None = None
    """Reference volume in output units (``[Z, H, W]``), or ``None``."""
    retrospective: bool = False
    from_file: bool = False
    """True when the input was a measurement file (not an image volume)."""
    measurement: Measurement | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    noise: dict[str, Any] | None = None
    """The data's noise record in the units of ``y`` (``{"model": "none" | "gaussian" | "poisson", ...}``),
    ``None`` when unknown (a measured file that does not record it)."""
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra outputs of the method (``"std"``: the posterior standard deviation of ``--samples K``)."""

    @property
    def modality(self) -> str:
        from d3ip_cli.physics.registry import TASKS

        return TASKS[self.task].modality


@dataclasses.dataclass
class ReconResult:
    """What :func:`reconstruct` returns."""

    volume: Volume
    initial: Volume
    problem: Problem
    metrics: dict[str, Any] | None
    std: Volume | None = None
    """Posterior standard-deviation map (``--samples K > 1``), in output units."""


# ---------------------------------------------------------------------------------------
# Volumes: slab, grid, intensities
# ---------------------------------------------------------------------------------------


def select_slab(vol: Volume, slices: str | None) -> Volume:
    """``--slices A:B`` (0-based, half-open) of a volume; the affine origin moves with it."""
    rng = parse_slices(slices) if slices else None
    if rng is None:
        return vol
    z = vol.shape[0]
    start, stop = rng[0] or 0, z if rng[1] is None else rng[1]
    if start >= z or stop > z:
        raise UsageError(f"--slices {slices}: the volume has {z} slice(s) (0..{z - 1})")
    aff = vol.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, 0] * start
    return vol.replace(data=np.ascontiguousarray(vol.data[start:stop]), affine=aff)


def resample_inplane(data: np.ndarray, affine: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample each slice of ``data [Z, H, W]`` to ``n x n`` (linear, anti-aliased when shrinking).

    The field of view is kept: new voxel ``i`` covers old coordinates
    ``(i + 0.5) * H/n - 0.5``, so the affine gains ``diag(1, H/n, W/n)`` and a half-voxel shift.
    """
    from skimage.transform import resize

    z, h, w = data.shape
    if (h, w) == (n, n):
        return data, affine
    out = np.stack([resize(s.astype(np.float64), (n, n), order=1, anti_aliasing=(n < h or n < w),
                           preserve_range=True, mode="edge") for s in data]).astype(np.float32)
    sh, sw = h / n, w / n
    t = np.eye(4)
    t[1, 1], t[2, 2] = sh, sw
    t[1, 3], t[2, 3] = 0.5 * sh - 0.5, 0.5 * sw - 0.5
    return out, affine @ t


def prepare_volume(path: str | os.PathLike, *, slices: str | None = None, grid: int | None = None,
                   series: str | None = None, frame: int | None = None) -> Volume:
    """Read an image volume and apply ``--slices`` and ``--grid``."""
    from d3ip_cli.io.volumes import read_volume

    from d3ip_cli.io.volumes import D3ipWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", D3ipWarning)
        vol = read_volume(path, series=series, frame=frame)
    notes = [str(w.message) for w in caught if issubclass(w.category, D3ipWarning)]
    vol = cut_volume(vol, slices=slices, grid=grid)
    if notes:
        vol.meta.setdefault("problems", []).extend(notes)
    return vol


def cut_volume(vol: Volume, *, slices: str | None = None, grid: int | None = None) -> Volume:
    """``--slices`` then ``--grid`` (in-plane resampling) applied to a volume already read."""
    vol = select_slab(vol, slices)
    if grid:
        data, aff = resample_inplane(vol.data, vol.affine, int(grid))
        vol = vol.replace(data=data, affine=aff)
    return vol


def align_reference(ref: Volume, like: Volume, *, slices: str | None = None, grid: int | None = None) -> Volume:
    """A reference volume laid out as ``like`` (a reconstruction, or the input it came from): its
    axes permuted and flipped to run as ``like``'s (unless ``like`` is a NumPy array, which has no
    geometry), then cut with ``--slices`` and ``--grid`` as the input was. ``reconstruct
    --reference`` and ``d3ip metrics`` both use it."""
    from d3ip_cli.io.volumes import reorient_like

    if like.meta.get("source_format") != "npy":
        ref = reorient_like(ref, like.affine)
    return cut_volume(ref, slices=slices, grid=grid)


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a volume's metadata."""
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------


def simulate_measurement(vol: Volume, task_opts: TaskOptions, noise_opts: NoiseOptions, *, seed: int = 0,
                         device: torch.device | str = "cpu", source: str | None = None,
                         argv: list[str] | None = None) -> tuple[Measurement, Any, torch.Tensor]:
    """Simulate the measurement of ``task_opts.task`` from an image volume.

    Returns ``(measurement, operator, x_ref)`` where ``x_ref`` is the normalised image the
    data were simulated from (on ``device``). Masks and noise are drawn from
    ``make_generator(seed)`` on the CPU, so the data do not depend on the device.
    """
    from d3ip_cli.physics import noise as noise_models
    from d3ip_cli.physics.registry import TASKS, get_task, make_operator, operator_arrays, operator_spec

    task = task_opts.task
    if task is None:
        raise UsageError("--task is required to simulate a measurement from an image volume")
    info = get_task(task)
    scale = scale_for_volume(vol.data, vol.modality, str(vol.meta.get("units", "a.u.")), info.modality)
    x_ref = torch.from_numpy(scale.normalise(vol.data)).to(device)
    gen = make_generator(seed, "cpu")
    dy, dx = vol.spacing[1], vol.spacing[2]
    op = make_operator(task, vol.shape, device=device, pixel_size=(dy, dx), generator=gen,
                       **task_opts.operator_options())
    with torch.no_grad():
        y = op.A(x_ref)
    noise: dict[str, Any] = {"model": noise_opts.noise}
    if noise_opts.noise == "poisson":
        if info.modality != "CT":
            raise UsageError("--noise poisson applies to CT tasks; use --noise gaussian for cs-mri")
        y = noise_models.ct_poisson(y, noise_opts.i0, scale.mu_per_unit, gen)
        noise.update(i0=noise_opts.i0, mu_per_unit=scale.mu_per_unit)
    elif noise_opts.noise == "gaussian":
        mask = op.mask if info.modality == "MR" else None
        sigma = noise_models.relative_sigma(y, noise_opts.sigma, mask)
        y = (noise_models.complex_gaussian(y, sigma, mask, gen) if info.modality == "MR"
             else noise_models.gaussian(y, sigma, gen))
        noise.update(sigma_relative=noise_opts.sigma, sigma_absolute=sigma)
    spec = operator_spec(op)
    if TASKS[task].modality == "MR":
        spec["coil_maps"] = "stored" if op.maps is not None else "none"
    meas = Measurement(
        data=y.detach().cpu().numpy().astype(np.complex64 if y.is_complex() else np.float32),
        spec=spec, arrays=operator_arrays(op), intensity=scale.to_dict(),
        grid={"shape": list(vol.shape), "affine": vol.affine.tolist()},
        provenance={"tool": "d3ip", "version": __version__, "command": "simulate", "argv": argv,
                    "source": source, "seed": seed, "noise": noise, "retrospective": True,
                    # the slab and grid taken from the source: a --reference of the whole source
                    # volume is cut the same way when this measurement is reconstructed
                    "slices": getattr(task_opts, "slices", None), "grid": getattr(task_opts, "grid", None),
                    "note": "simulated from an image volume (a retrospective study)"},
        meta=_json_meta(vol.meta) | ({"modality": "CT", "units": "HU"} if scale.kind == "ct-attenuation" else {}))
    return meas, op, x_ref


# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------


def acceleration_note(op: Any, requested: float) -> str | None:
    """A note when a Cartesian mask cannot reach the requested ``--acceleration`` (small grids,
    a large centre fraction); ``None`` when it does (within 20 %) or ``op`` has no mask."""
    from d3ip_cli.physics.masks import acceleration_of

    mask = getattr(op, "mask", None)
    if mask is None:
        return None
    achieved = acceleration_of(mask)
    if achieved >= requested / 1.2:
        return None
    return (f"--acceleration {requested:g} cannot be reached on this k-space grid: the mask (fully sampled "
            f"centre included) undersamples by {achieved:.2f}x")


def scale_notes(vol: Volume, scale: IntensityScale) -> list[str]:
    """What the user should know about how ``vol``'s values were read (run-record warnings)."""
    notes = []
    if scale.kind == "ct-attenuation" and (vol.meta.get("units") != "HU" or vol.modality != "CT"):
        notes.append(f"the input does not record its units; its values reach HU-like air (minimum "
                     f"{float(np.min(vol.data)):g}; -500 or less in at least 1% of the voxels), so they are read as CT in HU")
    if scale.clip_min is not None and float(np.min(vol.data)) < scale.clip_min:
        notes.append(f"input values below {scale.clip_min:g} {scale.units} were clipped (outside the field of view)")
    return notes


def modality_note(vol: Volume, task: str) -> str | None:
    """The warning for a CT image simulated as MRI data or the reverse (``None`` when they agree or the
    volume's modality is unknown)."""
    from d3ip_cli.physics.registry import get_task

    task_modality = get_task(task).modality
    if vol.modality in ("CT", "MR") and vol.modality != task_modality:
        article = "an" if vol.modality == "MR" else "a"
        return (f"the input is {article} {vol.modality} image; --task {task} simulates {task_modality} data from "
                "it (a synthetic study, not this scan's acquisition)")
    return None


def problem_from_volume(vol: Volume, cfg: ReconConfig, *, device: torch.device | str = "cpu",
                        source: str | None = None) -> Problem:
    """Retrospective study: simulate from ``vol``; the volume (normalised and mapped back) is the reference."""
    meas, op, x_ref = simulate_measurement(vol, cfg, cfg, seed=cfg.seed, device=device, source=source)
    y = torch.from_numpy(meas.data).to(device)
    scale = IntensityScale.from_dict(meas.intensity)
    reference = scale.denormalise(x_ref.detach().cpu().numpy())
    notes = scale_notes(vol, scale)
    meta = dict(meas.meta)  # CT in HU where the values were read so (scale_notes)
    if note := acceleration_note(op, cfg.acceleration):
        notes.append(note)
    if note := modality_note(vol, str(cfg.task)):
        notes.append(note)
    return Problem(op=op, y=y, task=str(cfg.task), scale=scale, affine=vol.affine.copy(), meta=meta,
                   reference=reference, retrospective=True, measurement=meas, warnings=notes,
                   noise=dict(meas.provenance["noise"]))


def _mri_maps_if_needed(meas: Measurement, progress: Progress | None) -> dict[str, np.ndarray]:
    from d3ip_cli.physics.masks import calibration_width
    from d3ip_cli.physics.mri import espirit_maps

    arrays = dict(meas.arrays)
    if meas.data.shape[1] > 1 and "coil_maps" not in arrays:
        width = calibration_width(arrays["mask"])
        if width < 8:
            raise InputDataError(f"multi-coil k-space without coil maps needs a fully sampled centre of at least "
                                 f"8x8 for ESPIRiT calibration (found {width}x{width})")
        arrays["coil_maps"] = espirit_maps(meas.data, calib_width=min(width, 24), progress=progress)
    return arrays


def problem_from_measurement(meas: Measurement, cfg: ReconConfig, *, device: torch.device | str = "cpu",
                             reference: Volume | None = None, progress: Progress | None = None) -> Problem:
    """Reconstruction of measured (or previously simulated) data; reference only when given."""
    from d3ip_cli.physics.registry import TASKS, operator_from_spec

    task = meas.task
    if task not in TASKS:
        raise InputDataError(f"measurement names an unknown task {task!r}")
    if cfg.task is not None and cfg.task != task:
        raise UsageError(f"--task {cfg.task} contradicts the measurement file, which holds {task} data")
    arrays = _mri_maps_if_needed(meas, progress) if TASKS[task].modality == "MR" else meas.arrays
    spec = dict(meas.spec, n_slices=meas.data.shape[0])
    op = operator_from_spec(spec, arrays, backend=cfg.backend if TASKS[task].modality == "CT" else None,
                            device=device)
    if tuple(op.out_shape) != tuple(meas.data.shape):
        raise InputDataError(f"measurement shape {list(meas.data.shape)} contradicts its operator "
                             f"({list(op.out_shape)})")
    y = torch.from_numpy(meas.data).to(device)
    notes: list[str] = []
    noise = meas.provenance.get("noise")
    noise = dict(noise) if isinstance(noise, dict) and noise.get("model") else None
    if meas.intensity:
        scale = IntensityScale.from_dict(meas.intensity)
    else:
        with torch.no_grad():
            x0 = op.pinv(y)
        scale = scale_for_image(x0.abs().cpu().numpy(), units=str(meas.meta.get("units", "a.u.")))
        y = y / scale.scale
        if noise is not None and noise.get("sigma_absolute") is not None:
            noise["sigma_absolute"] = float(noise["sigma_absolute"]) / scale.scale
        notes.append(f"no intensity scale recorded: data divided by {scale.scale:.6g} (99.5th percentile of "
                     "the zero-filled magnitude)")
    ref = None
    if reference is not None:
        ref = np.asarray(reference.data, dtype=np.float32)
        if ref.shape != tuple(meas.image_shape):
            raise InputDataError(f"--reference has shape {list(ref.shape)}, the reconstruction grid is "
                                 f"{list(meas.image_shape)}")
        ref = clip_reference(ref, scale, notes)
    return Problem(op=op, y=y, task=task, scale=scale, affine=meas.affine, meta=dict(meas.meta),
                   reference=ref, retrospective=bool(meas.provenance.get("retrospective")), from_file=True,
                   measurement=meas, warnings=notes, noise=noise)


def load_problem(input_path: str | os.PathLike, cfg: ReconConfig, *, device: torch.device | str = "cpu",
                 reference_path: str | os.PathLike | None = None, progress: Progress | None = None) -> Problem:
    """Dispatch on the input: a measurement file, or an image volume plus ``--task``."""
    p = Path(input_path)
    if not p.exists():
        raise InputDataError(f"{p} does not exist")
    if is_measurement_path(p):
        meas = read_measurement(p, frame=cfg.frame)
        full_shape, full_affine = tuple(meas.image_shape), meas.affine
        z_full = full_shape[0]
        ref = None
        if reference_path is not None:
            from d3ip_cli.io.volumes import check_same_grid, reorient_like

            ref = read_single_frame(reference_path, "--reference", prepare_volume)
            if "affine" in (meas.grid or {}):  # the measurement's axis order and directions, before any cut
                ref = reorient_like(ref, full_affine)
            prov = meas.provenance or {}
            if ref.shape != full_shape and (prov.get("slices") or prov.get("grid")):
                # the whole volume the data were simulated from: cut it as `d3ip simulate` did
                cut = " ".join(f"--{k} {prov[k]}" for k in ("slices", "grid") if prov.get(k))
                try:
                    ref = cut_volume(ref, slices=prov.get("slices"), grid=prov.get("grid"))
                except UsageError:
                    raise InputDataError(f"--reference has shape {list(ref.shape)}: neither the measurement's grid "
                                         f"{list(full_shape)} nor a volume it was simulated from ({cut})") from None
            if ref.shape == full_shape and "affine" in (meas.grid or {}):  # a file that records where its grid is
                check_same_grid(Volume(np.zeros((1, 1, 1), np.float32), affine=full_affine), ref, what="--reference")
        if cfg.slices:
            start, stop = parse_slices(cfg.slices)  # type: ignore[misc]
            if (start or 0) >= z_full or (stop is not None and stop > z_full):
                raise UsageError(f"--slices {cfg.slices}: the measurement has {z_full} slice(s)")
            meas = meas.select_slices(slice(start, stop))
            if ref is not None and ref.shape[0] == z_full:
                ref = select_slab(ref, cfg.slices)
        return problem_from_measurement(meas, cfg, device=device, reference=ref, progress=progress)
    if cfg.task is None:
        raise UsageError(f"{p} is an image volume: give --task (sparse-view, limited-angle or cs-mri) to simulate "
                         "its measurement (a retrospective study)")
    vol = prepare_volume(p, slices=cfg.slices, grid=cfg.grid, series=cfg.series, frame=cfg.frame)
    problem = problem_from_volume(vol, cfg, device=device, source=str(p.resolve()))
    problem.warnings.extend(vol.meta.get("problems", []) or [])
    if reference_path is not None:
        from d3ip_cli.io.volumes import check_same_grid

        ref = align_reference(read_single_frame(reference_path, "--reference", prepare_volume), vol, slices=cfg.slices, grid=cfg.grid)
        if ref.shape != vol.shape:
            raise InputDataError(f"--reference has shape {list(ref.shape)}, the reconstruction grid is {list(vol.shape)}")
        check_same_grid(vol, ref, what="--reference")
        problem.reference = clip_reference(np.asarray(ref.data, dtype=np.float32), problem.scale, problem.warnings)
    return problem


# ---------------------------------------------------------------------------------------
# Running a method and packaging the result
# ---------------------------------------------------------------------------------------


def method_params(cfg: ReconConfig) -> dict[str, Any]:
    """Method parameters taken from the options (``--weight``, ``--weight-z``, ``--filter``, engine settings
    such as ``--steps``); one that the method does not take is refused by ``check_params``."""
    params: dict[str, Any] = {} if cfg.weight is None else {"weight": float(cfg.weight)}
    if cfg.weight_z is not None:
        params["weight_z"] = float(cfg.weight_z)
    if cfg.filter is not None:
        params["filter"] = cfg.filter
    for name in cfg.ENGINE_FIELDS:
        value = getattr(cfg, name)
        if value is not None:
            params[name] = value
    return params


def run_method(problem: Problem, cfg: ReconConfig, *, device: torch.device | str = "cpu",
               progress: Progress | None = None, record: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``cfg.method`` on ``problem``; returns ``(x, x_init)`` in normalised units."""
    from d3ip_cli.engine.methods import MethodContext, check_params, get_method

    method = get_method(cfg.method, problem.task)
    params = method_params(cfg)
    check_params(method, params)
    if method.classical:
        if cfg.samples > 1:
            raise UsageError(f"--samples applies to diffusion methods; {method.name} is deterministic")
        for opt, val in (("--prior", cfg.prior), ("--preset", cfg.preset), ("--checkpoint-dir", cfg.checkpoint_dir)):
            if val:
                problem.warnings.append(f"{opt} is ignored by the classical method {method.name}")
    dev = torch.device(device)
    ctx = MethodContext(device=dev, generator=make_generator(cfg.seed, dev), seed=cfg.seed, task=problem.task,
                        params=params, progress=progress, record=record, prior=cfg.prior, preset=cfg.preset,
                        samples=cfg.samples, checkpoint_dir=cfg.checkpoint_dir, resume=cfg.resume,
                        noise=problem.noise)
    with torch.no_grad():
        x_init = problem.op.pinv(problem.y)
    x = method.fn(problem.op, problem.y, x_init, ctx)
    problem.extras.update(getattr(ctx, "extras", None) or {})
    if tuple(x.shape) != tuple(problem.op.in_shape):
        raise RuntimeError(f"method {method.name} returned shape {list(x.shape)}, expected {list(problem.op.in_shape)}")
    return x, x_init


def to_volume(x: torch.Tensor, problem: Problem, description: str) -> Volume:
    """De-normalise a result (magnitude for complex MR images) into an output :class:`Volume`."""
    a = x.detach()
    a = a.abs() if a.is_complex() else a
    data = problem.scale.denormalise(a.float().cpu().numpy())
    meta = dict(problem.meta)
    meta.setdefault("modality", "CT" if problem.modality == "CT" else "MR")
    meta["units"] = problem.scale.units
    meta["description"] = description
    return Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=problem.affine.copy(), meta=meta)


def reconstruct(input_path: str | os.PathLike, cfg: ReconConfig, *, device: torch.device | str = "cpu",
                record: Any = None, progress: Progress | None = None,
                reference_path: str | os.PathLike | None = None) -> ReconResult:
    """The whole reconstruction of one input (see the module docstring); metrics when a reference exists.

    ``record`` (a :class:`~d3ip_cli.core.record.RunRecord`) receives stages, intensity
    scale, operator summary, metrics and warnings; the warnings known once the input is read are
    recorded then, before the (possibly long) reconstruction starts (a CLI's record says each as it
    is recorded).
    """
    from contextlib import nullcontext

    from d3ip_cli.bench.metrics import volume_metrics
    from d3ip_cli.physics.registry import operator_spec

    stage = record.stage if record is not None else (lambda name: nullcontext())
    with stage("load"):
        problem = load_problem(input_path, cfg, device=device, reference_path=reference_path, progress=progress)
    said = 0  # problem.warnings recorded so far

    def record_warnings() -> None:
        nonlocal said
        if record is not None:
            for w in problem.warnings[said:]:
                record.warn(w)
        said = len(problem.warnings)

    record_warnings()
    constant_reference = problem.reference is not None and np.ptp(problem.reference) == 0
    if reference_path is not None and constant_reference:
        raise InputDataError(f"--reference {reference_path} is constant: PSNR and SSIM against it are undefined")
    with stage("reconstruct"):
        x, x_init = run_method(problem, cfg, device=device, progress=progress, record=record)
    desc = " ".join(dict.fromkeys(("d3ip", cfg.method, problem.task)))  # "d3ip d3ip ..." said once
    out = to_volume(x, problem, desc)
    initial = to_volume(x_init, problem, f"d3ip initial estimate {problem.task}")
    if problem.from_file and cfg.grid:
        data, aff = resample_inplane(out.data, out.affine, int(cfg.grid))
        out = out.replace(data=data, affine=aff)
        initial = initial.replace(data=resample_inplane(initial.data, initial.affine, int(cfg.grid))[0], affine=aff)
        if problem.reference is not None:
            problem.reference = resample_inplane(problem.reference, problem.affine, int(cfg.grid))[0]
    std = None
    if "std" in problem.extras:
        s_norm = problem.extras["std"].detach().float().cpu().numpy()
        s_out = problem.scale.denormalise(s_norm) - problem.scale.denormalise(np.zeros_like(s_norm))
        std = out.replace(data=np.ascontiguousarray(np.abs(s_out), dtype=np.float32))
        std.meta["description"] = f"d3ip {cfg.method} posterior std {problem.task}"
        if isinstance(std.meta.get("dicom"), dict):  # the source's display window suits the image, not its std
            std.meta["dicom"] = {k: v for k, v in std.meta["dicom"].items() if k not in ("WindowCenter", "WindowWidth")}
        if problem.from_file and cfg.grid:
            std = std.replace(data=resample_inplane(std.data, problem.affine, int(cfg.grid))[0], affine=out.affine)
    metrics = None
    if constant_reference:
        problem.warnings.append("the input volume is constant: no PSNR/SSIM against it")  # keep the result
    elif problem.reference is not None:
        with stage("metrics"):
            metrics = volume_metrics(out.data, problem.reference)
    if record is not None:
        from d3ip_cli.engine.methods import get_method

        spec = operator_spec(problem.op)
        spec.pop("angles_deg", None)
        record["method"] = get_method(cfg.method).name
        record["task"] = problem.task
        record["seed"] = cfg.seed
        record["device"] = str(device)
        record["threads"] = torch.get_num_threads()
        record["config"] = cfg.model_dump()
        record["intensity"] = problem.scale.to_dict()
        record["operator"] = {**spec, "repr": repr(problem.op)}
        record["retrospective"] = problem.retrospective
        record["metrics"] = metrics
    record_warnings()
    return ReconResult(volume=out, initial=initial, problem=problem, metrics=metrics, std=std)


def default_output_path(input_path: str | os.PathLike, method: str, task: str,
                        format: str | None = None) -> tuple[Path, str]:
    """Beside the input, in its format (or ``format``), named after input, method and task:
    ``(path, format)``.

    ``scan.nii.gz`` -> ``scan_tv_sparse-view.nii.gz``; ``series/`` (DICOM) -> sibling
    ``series_tv_sparse-view/``; a single file ``series/x.dcm`` -> ``series_x_tv_sparse-view/``
    beside its folder (never inside it: the folder is a series and would then hold two); a
    measurement ``meas.h5`` -> ``meas_tv_sparse-view.nii.gz``. With ``format`` the suffix
    follows it (``.nii.gz``, ``.npy``, or a series folder).
    """
    p = Path(input_path)
    name = p.name.rstrip("/")
    where = p.parent
    for suffix, fmt in ((".nii.gz", "nifti"), (".nii", "nifti"), (".npy", "npy")):
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem, fmt, suffix = name, "dicom", ""
        if is_measurement_path(p):
            stem, fmt, suffix = Path(name).stem, "nifti", ".nii.gz"
        elif p.is_file():  # one DICOM file: beside its folder, prefixed with the folder's name
            folder = p.resolve().parent
            stem, where = f"{folder.name}_{Path(name).stem}", folder.parent
    if format:
        from d3ip_cli.io.volumes import normalise_format

        want = normalise_format(format)
        if want != fmt:
            fmt, suffix = want, {"nifti": ".nii.gz", "npy": ".npy", "dicom": ""}[want]
    return where / f"{stem}_{method}_{task}{suffix}", fmt


def write_result(result: ReconResult, output: str | os.PathLike, *, overwrite: bool = False,
                 format: str | None = None, record: Any = None, report: str | os.PathLike | None = None,
                 uid_seed: str = "") -> Path:
    """Write the report, the output volume and its uncertainty map; add them to ``record``;
    return the output path.

    All or nothing: when one of them cannot be written, those already written by this call
    are removed again, so a failed run never leaves an output that looks complete. The report
    goes first so that a bad ``--report`` path fails before an existing output is replaced.
    The run record sidecar itself is written by the caller once the record is finished
    (:func:`write_record`).
    """
    from d3ip_cli.io.atomic import _remove, sidecar_path
    from d3ip_cli.io.volumes import D3ipWarning, write_volume

    written: list[Path] = []
    try:
        if report is not None:
            written.append(write_report(result, report, overwrite=overwrite))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", D3ipWarning)
            path = write_volume(result.volume, output, format=format, overwrite=overwrite,
                                description=result.volume.meta.get("description"), uid_seed=uid_seed)
        written.append(Path(path))
        spath = None
        if result.std is not None:
            spath = std_output_path(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", D3ipWarning)
                write_volume(result.std, spath, format=format, overwrite=overwrite,
                             description=result.std.meta.get("description"), uid_seed=uid_seed + "|std",
                             series_base=2000)
            written.append(Path(spath))
        if record is not None:  # inside the try: an interrupt while the outputs are hashed removes them too
            for w in caught:
                if issubclass(w.category, D3ipWarning):
                    record.warn(str(w.message))
            record.add_output(path)
            if spath is not None:
                record.add_output(spath, role="uncertainty")
                record["uncertainty_output"] = str(Path(spath).resolve())
            if report is not None:
                record.add_output(report, role="report")
    except BaseException:
        for w in written:
            _remove(w)
            if w.name.lower().endswith(".npy"):  # the NumPy writer's geometry sidecar goes with it
                _remove(sidecar_path(w))
        raise
    return Path(path)


def std_output_path(output: str | os.PathLike) -> Path:
    """Where the standard-deviation map goes: ``x.nii.gz`` -> ``x_std.nii.gz``; ``series/`` -> ``series_std/``."""
    p = Path(output)
    for suffix in (".nii.gz", ".nii", ".npy"):
        if p.name.lower().endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + "_std" + suffix)
    return p.with_name(p.name + "_std")


def write_record(record: Any, output: str | os.PathLike) -> Path:
    """Finish ``record`` and write it as the sidecar ``OUTPUT.json`` (the ``--json`` document)."""
    from d3ip_cli.io.atomic import sidecar_path, write_json

    return write_json(sidecar_path(output), record.finish(), overwrite=True)


def report_orientation(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data [Z, H, W]`` reordered for viewing: in-plane in the scanners' display convention
    (:func:`~d3ip_cli.io.dicom.display_oriented`: anterior at the top, the patient's left on
    the right) and slices from superior to inferior, so that coronal and sagittal cuts show
    the head at the top whatever order the file stored them in."""
    from d3ip_cli.io.dicom import display_oriented

    out, A = display_oriented(np.asarray(data, np.float32), np.asarray(affine, float))
    return np.ascontiguousarray(out[::-1]) if A[2, 0] > 0 else out  # index grows towards superior (RAS z)


def report_stretch(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> dict[str, int]:
    """Whole factors by which the report stretches each view along z: 1, except for a slab so
    thin that its coronal or sagittal cut would be drawn under a quarter as tall as wide."""
    z, h, w = shape
    sz, sh, sw = spacing
    return {"axial": 1, "coronal": max(1, math.ceil(0.25 * w * sw / (z * sz))),
            "sagittal": max(1, math.ceil(0.25 * h * sh / (z * sz)))}


def write_report(result: ReconResult, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """A PNG with axial, coronal and sagittal central views of the initial estimate, the
    reconstruction, the reference and the error (when there is a reference), and the posterior
    standard deviation (``--samples K > 1``; its own scale, from 0 to its 99.5th percentile)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from d3ip_cli.io.atomic import atomic_output
    from d3ip_cli.io.dicom import display_oriented

    # drawn as radiologists look at them, whatever the storage order (report_orientation);
    # A: the affine of that display order, for the pixels' physical aspect
    affine = np.asarray(result.volume.affine, float)
    A = display_oriented(np.zeros((1, 1, 1), np.float32), affine)[1]
    shown = functools.partial(report_orientation, affine=affine)
    rows = [("initial", shown(result.initial.data)), ("reconstruction", shown(result.volume.data))]
    ref = result.problem.reference
    if ref is not None:
        rows += [("reference", shown(ref)), ("error", shown(result.volume.data - ref))]
    if result.std is not None and result.std.data.shape == result.volume.data.shape:
        rows.append(("posterior std", shown(result.std.data)))
    lo, hi = np.percentile(ref if ref is not None else result.volume.data, [0.5, 99.5])
    err_scale = max(float(hi - lo) * 0.25, 1e-6)
    std_top = max(float(np.percentile(result.std.data, 99.5)), 1e-6) if result.std is not None else 1.0
    # through-plane views only when there is a through-plane extent; pixels drawn at their
    # physical aspect (slice spacing against in-plane spacing)
    sz, sh, sw = (float(np.linalg.norm(A[:3, k])) or 1.0 for k in range(3))
    views_of = (("axial", lambda v: v[v.shape[0] // 2], sh / sw),
                ("coronal", lambda v: v[:, v.shape[1] // 2, :], sz / sw),
                ("sagittal", lambda v: v[:, :, v.shape[2] // 2], sz / sh))
    if result.volume.data.shape[0] < 2:
        views_of = views_of[:1]
    # a thin slab's through-plane cut would be a strip of a few pixels: stretched along z to a
    # quarter of its width at least, by a whole factor that its title names
    stretch = report_stretch(result.volume.data.shape, (sz, sh, sw))
    fig, axes = plt.subplots(len(rows), len(views_of), figsize=(2.8 * len(views_of) + 0.4, 2.6 * len(rows)),
                             squeeze=False)
    for r, (label, vol) in enumerate(rows):
        for c, (view, cut, aspect) in enumerate(views_of):
            ax = axes[r, c]
            ax.axis("off")
            aspect *= stretch[view]
            if label == "error":
                ax.imshow(cut(vol), cmap="RdBu_r", vmin=-err_scale, vmax=err_scale, aspect=aspect)
            elif label == "posterior std":
                ax.imshow(cut(vol), cmap="magma", vmin=0, vmax=std_top, aspect=aspect)
            else:
                ax.imshow(cut(vol), cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            ax.set_title(f"{label} ({view}" + (f", z ×{stretch[view]})" if stretch[view] > 1 else ")"), fontsize=8)
    m = result.metrics
    title = f"{result.volume.meta.get('description', '')}"
    if m and m.get("psnr") is not None:
        title += f"  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.3f}" if m.get("ssim") is not None else ""
    import textwrap

    width_in = fig.get_size_inches()[0]  # a one-view report (one slice) is narrow: wrap, do not cut
    fig.suptitle(textwrap.fill(title, width=max(24, int(width_in * 14))), fontsize=9)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


__all__ = ["Problem", "ReconResult", "select_slab", "resample_inplane", "prepare_volume", "simulate_measurement",
           "problem_from_volume", "problem_from_measurement", "load_problem", "run_method", "to_volume",
           "reconstruct", "default_output_path", "write_result", "write_record", "write_report", "report_orientation"]
